#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind: a
# figure that does not move with the machine's load, for steps too small for the
# timed scripts to resolve. Each proxy (one worker) runs under callgrind in front of
# the same two stand-in servers and serves N1, then (fresh) N2 HTTP/1.1 requests from
# h2load; (count at N2 - count at N1) / (N2 - N1) leaves start-up and shutdown out.
# Only user space is counted (the kernel's share, about two thirds of the CPU, is
# not), and a rep-prefixed copy or fill counts once per byte or word, so large
# memcpy/memset weigh more here than in time.
#
#   benches/instructions.sh                 # BIN: this tree's release build; and nginx
#   A=/tmp/old/switchyard benches/instructions.sh   # also the build A, for a B/A ratio
#   N1=2000 N2=22000 CONNECTIONS=50 benches/instructions.sh
#
# Bounded: each h2load run sends a fixed number of requests; every server it starts
# is stopped on exit. Everything is on 127.0.0.1.
set -euo pipefail

N1=${N1:-2000}
N2=${N2:-12000}
CONNECTIONS=${CONNECTIONS:-50}
BASE_PORT=${BASE_PORT:-18800}
export WORKERS=1
cd "$(dirname "$0")/.."
source benches/common.sh
require_tools valgrind h2load
use_bin_or_release_build

UP1=$((BASE_PORT + 1)); UP2=$((BASE_PORT + 2)); PROXY=$((BASE_PORT + 10))
"$BIN" stand-in --listen "127.0.0.1:$UP1" --name up1 & PIDS+=($!)
"$BIN" stand-in --listen "127.0.0.1:$UP2" --name up2 & PIDS+=($!)
wait_port "$UP1"; wait_port "$UP2"

# The instructions one proxy ran to serve $2 requests (its start and stop included).
# $1: "nginx", or the switchyard executable.
count() {
    local target=$1 requests=$2 log="$WORK/callgrind.log" pid
    local wrap="valgrind --tool=callgrind --callgrind-out-file=/dev/null --log-file=$log"
    if [[ $target == nginx ]]; then
        NGINX_NAME="nginx-$requests" NGINX_MAIN="master_process off;" NGINX_WRAP="$wrap" \
            start_nginx "$PROXY" ";" ""
        pid=${PIDS[-1]}
    else
        switchyard_config counted "$PROXY"
        RUST_LOG=warn $wrap "$target" run --config "$WORK/counted.toml" & PIDS+=($!)
        pid=$!
        wait_port "$PROXY"
    fi
    local out
    out=$(h2load --h1 -n "$requests" -c "$CONNECTIONS" -m 1 "http://127.0.0.1:$PROXY/")
    grep -q "$requests succeeded, 0 failed" <<<"$out" ||
        { echo "$target: not every request succeeded:" >&2; grep "requests:" <<<"$out" >&2; exit 1; }
    # Both stop gracefully on these and callgrind writes its count at exit.
    if [[ $target == nginx ]]; then kill -QUIT "$pid"; else kill -TERM "$pid"; fi
    wait "$pid" 2>/dev/null || true
    awk '/Collected/ {gsub(",", "", $4); print $4}' "$log"
}

per_request() {
    local first second
    first=$(count "$1" "$N1")
    second=$(count "$1" "$N2")
    echo $(((second - first) / (N2 - N1)))
}

declare -A PER
TARGETS=(switchyard)
PER[switchyard]=$(per_request "$BIN")
if [[ -n "${A:-}" ]]; then
    TARGETS+=(A)
    PER[A]=$(per_request "$A")
fi
if command -v nginx >/dev/null; then
    TARGETS+=(nginx)
    PER[nginx]=$(per_request nginx)
fi

echo "user-space instructions per request (callgrind; h2load --h1, $CONNECTIONS connections, $N1 and $N2 requests)"
for target in "${TARGETS[@]}"; do
    printf '%-12s %10s\n' "$target" "${PER[$target]}"
done
[[ -n "${PER[A]:-}" ]] && awk -v b="${PER[switchyard]}" -v a="${PER[A]}" 'BEGIN {printf "switchyard / A: %.3f\n", b / a}'
[[ -n "${PER[nginx]:-}" ]] && awk -v s="${PER[switchyard]}" -v n="${PER[nginx]}" 'BEGIN {printf "switchyard / nginx: %.2fx\n", s / n}'
exit 0
