#!/usr/bin/env bash
# Two switchyard builds side by side: both run at once on the same two stand-in
# servers, and wrk loads them in turn, A B B A A B ..., so the machine's drift between runs
# falls on both alike. Prints CPU per request (utime + stime from /proc over each run,
# divided by the requests it served) for each round and the medians. One worker each.
#
#   A=/tmp/old/switchyard benches/ab.sh                 # B: this tree's release build
#   A=old/switchyard B=new/switchyard ROUNDS=9 benches/ab.sh
#   WORKERS=2 A=… benches/ab.sh                        # `workers = 2` for both
#   H2C=1 A=… benches/ab.sh                            # HTTP/2 (h2c) with h2load,
#                                                      # STREAMS per connection (10)
#
# Bounded: every wrk run stops after DURATION; every server it starts is stopped on
# exit. Everything is on 127.0.0.1.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-50}
BASE_PORT=${BASE_PORT:-19000}
cd "$(dirname "$0")/.."
H2C=${H2C:-0}
STREAMS=${STREAMS:-10}
if [[ $H2C == 1 ]]; then
    command -v h2load >/dev/null || { echo "h2load is not installed (nghttp2-client)" >&2; exit 1; }
else
    command -v wrk >/dev/null || { echo "wrk is not installed" >&2; exit 1; }
fi
[[ -n "${A:-}" ]] || { echo "A=path/to/switchyard is required (the build to compare with)" >&2; exit 1; }
if [[ -z "${B:-}" ]]; then
    cargo build --release --quiet
    B=target/release/switchyard
fi
source benches/common.sh
HZ=$(getconf CLK_TCK)

UP1=$((BASE_PORT + 1)); UP2=$((BASE_PORT + 2))
"$B" stand-in --listen "127.0.0.1:$UP1" --name up1 & PIDS+=($!)
"$B" stand-in --listen "127.0.0.1:$UP2" --name up2 & PIDS+=($!)
wait_port "$UP1"; wait_port "$UP2"

declare -A PID_OF PORT_OF
start() { # name binary port
    switchyard_config "$1" "$3" "$([[ $H2C == 1 ]] && echo "h2c = true")"
    RUST_LOG=warn "$2" run --config "$WORK/$1.toml" & PIDS+=($!)
    PID_OF[$1]=$!; PORT_OF[$1]=$3
    wait_port "$3"
}
start A "$A" $((BASE_PORT + 10))
start B "$B" $((BASE_PORT + 20))

declare -A SAMPLES=([A]="" [B]="") USER_SAMPLES=([A]="" [B]="")
for round in $(seq 1 "$ROUNDS"); do
    # A B, then B A: whichever runs second in a round measured up to 5% cheaper here,
    # so each build takes each place equally often.
    order="A B"
    ((round % 2)) || order="B A"
    for which in $order; do
        pid=${PID_OF[$which]}
        read -r user_before before < <(awk '{print $14, $14 + $15}' "/proc/$pid/stat")
        if [[ $H2C == 1 ]]; then
            out=$(h2load -c"$CONNECTIONS" -m"$STREAMS" -D"${DURATION%s}" "http://127.0.0.1:${PORT_OF[$which]}/" 2>/dev/null)
            read -r user_after after < <(awk '{print $14, $14 + $15}' "/proc/$pid/stat")
            requests=$(awk '/^requests:/ {print $8}' <<<"$out")
        else
            out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:${PORT_OF[$which]}/")
            read -r user_after after < <(awk '{print $14, $14 + $15}' "/proc/$pid/stat")
            requests=$(awk '/requests in/ {print $1}' <<<"$out")
        fi
        us=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
        user_us=$(awk -v t=$((user_after - user_before)) -v hz="$HZ" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
        SAMPLES[$which]+="$us "
        USER_SAMPLES[$which]+="$user_us "
        echo "round $round $which  $requests requests  $us us CPU/req ($user_us us user)"
    done
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
a=$(median "${SAMPLES[A]}"); b=$(median "${SAMPLES[B]}")
echo "median CPU per request: A $a us ($A), B $b us ($B), B/A $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", b / a}')"
a=$(median "${USER_SAMPLES[A]}"); b=$(median "${USER_SAMPLES[B]}")
echo "median user CPU per request (what the proxy's own code costs; steadier when only that changed): A $a us, B $b us, B/A $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", b / a}')"
