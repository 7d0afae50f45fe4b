#!/usr/bin/env bash
# Traffic latency while the control plane works: one worker (`workers = 1`), a pool of
# N stand-in backends (default 1000, weights 1-10, round robin), wrk keep-alive load
# through it, and a burst of admin changes (a canary set and moved, each one a new
# routing table) during the run. Prints p50/p99/max of the traffic without and with
# the burst, and how long each admin change took.
#
#   benches/admin_burst.sh                       # this tree's release build
#   OLD_BIN=/path/to/old/switchyard benches/admin_burst.sh   # and another binary,
#                                                # alternating rounds, same machine
#   BIN=/path/to/switchyard benches/admin_burst.sh   # a given binary, no build
#   N=2000 CHANGES=300 ROUNDS=3 benches/admin_burst.sh
#
# Everything runs on 127.0.0.1 and stops by itself: wrk runs for DURATION, the burst
# makes CHANGES calls, every process started is stopped on exit.
set -euo pipefail
N=${N:-1000}
CHANGES=${CHANGES:-200}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-50}
BASE=${BASE_PORT:-21000}
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }
if [[ -n "${BIN:-}" ]]; then
    NEW_BIN=$BIN
else
    cargo build --release --quiet
    NEW_BIN=$PWD/target/release/switchyard
fi
source benches/common.sh

"$NEW_BIN" stand-in --listen "127.0.0.1:$BASE" --count "$N" --name app & PIDS+=($!)
"$NEW_BIN" stand-in --listen "127.0.0.1:$((BASE + N))" --count 2 --name green & PIDS+=($!)
wait_port "$BASE"; wait_port "$((BASE + N))"

PROXY=$((BASE - 10)); ADMIN=$((BASE - 9))
write_config() {
    {
        echo '[proxy]'; echo "listen = \"127.0.0.1:$PROXY\""; echo 'workers = 1'
        echo '[admin]'; echo "listen = \"127.0.0.1:$ADMIN\""
        echo '[state]'; echo "path = \"$WORK/state-$1.json\""
        echo '[pools.big]'; echo 'balance = "round_robin"'
        printf 'backends = ['
        for i in $(seq 0 $((N - 1))); do
            printf '{ addr = "127.0.0.1:%d", weight = %d },' $((BASE + i)) $((1 + i % 10))
        done
        echo ']'
        echo '[pools.green]'
        echo "backends = [\"127.0.0.1:$((BASE + N))\", \"127.0.0.1:$((BASE + N + 1))\"]"
        echo '[services.app]'; echo 'active = "big"'
    } >"$WORK/switchyard-$1.toml"
}

# One wrk run; with a burst when $2 = burst. Prints "p50 p99 max" in ms, and for a
# burst the admin calls' median and max in ms on a second line.
measure() {
    local bin=$1 mode=$2 tag=$3
    write_config "$tag"
    RUST_LOG=warn "$bin" run --config "$WORK/switchyard-$tag.toml" & local sy=$!
    for _ in $(seq 1 300); do
        curl -fs "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "http://127.0.0.1:$PROXY/" >"$WORK/wrk.txt" &
    local wrk_pid=$!
    : >"$WORK/admin.txt"
    if [[ $mode == burst ]]; then
        sleep 1
        for i in $(seq 1 "$CHANGES"); do
            curl -fs -o /dev/null -w '%{time_total}\n' -X PUT \
                -d "{\"pool\": \"green\", \"weight\": $((i % 50 + 1)), \"force\": true}" \
                "http://127.0.0.1:$ADMIN/api/v1/services/app/canary" >>"$WORK/admin.txt"
        done
    fi
    wait "$wrk_pid"
    kill "$sy"; wait "$sy" 2>/dev/null || true
    local p50 p99 max
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$WORK/wrk.txt")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$WORK/wrk.txt")")
    max=$(to_ms "$(awk '$1 == "Latency" {print $4}' "$WORK/wrk.txt")")
    echo "$p50 $p99 $max"
    if [[ $mode == burst ]]; then
        sort -g "$WORK/admin.txt" | awk '{a[NR] = $1 * 1000} END {
            if (NR == 0) { print "no admin call succeeded"; exit }
            printf "%.1f %.1f %d\n", a[int((NR + 1) / 2)], a[NR], NR }'
    fi
}

declare -A P99 MAX ADMIN_MED ADMIN_MAX
BINS=(new)
[[ -n "${OLD_BIN:-}" ]] && BINS+=(old)
for round in $(seq 1 "$ROUNDS"); do
    for which in "${BINS[@]}"; do
        bin=$NEW_BIN; [[ $which == old ]] && bin=$OLD_BIN
        for mode in quiet burst; do
            out=$(measure "$bin" "$mode" "$which-$mode-$round")
            read -r _ p99 max <<<"$(head -1 <<<"$out")"
            P99[$which-$mode]+=" $p99"; MAX[$which-$mode]+=" $max"
            if [[ $mode == burst ]]; then
                read -r med amax calls <<<"$(tail -1 <<<"$out")"
                ADMIN_MED[$which]+=" $med"; ADMIN_MAX[$which]+=" $amax"
                echo "round $round $which: traffic p99 ${p99} ms max ${max} ms during $calls admin changes (median ${med} ms, slowest ${amax} ms)" >&2
            else
                echo "round $round $which: traffic p99 ${p99} ms max ${max} ms, no admin changes" >&2
            fi
        done
    done
done

echo
echo "$N backends in one round-robin pool, workers = 1, wrk -c$CONNECTIONS -d$DURATION, medians of $ROUNDS rounds"
printf '%-6s %14s %14s %14s %14s %16s %16s\n' binary "p99 quiet" "p99 burst" "max quiet" "max burst" "admin median" "admin slowest"
for which in "${BINS[@]}"; do
    printf '%-6s %11s ms %11s ms %11s ms %11s ms %13s ms %13s ms\n' "$which" \
        "$(median "${P99[$which-quiet]}")" "$(median "${P99[$which-burst]}")" \
        "$(median "${MAX[$which-quiet]}")" "$(median "${MAX[$which-burst]}")" \
        "$(median "${ADMIN_MED[$which]}")" "$(median "${ADMIN_MAX[$which]}")"
done
