#!/usr/bin/env bash
# Where a proxied request's CPU goes: user and kernel time per request (utime and stime
# from /proc, apart) for switchyard and nginx, one worker each, in front of the same two
# stand-in servers; wrk runs interleaved, ROUNDS rounds. Syscalls per request are about
# the same for both, so a gap in user time is what the proxy's own code costs.
#
#   benches/cpu_split.sh                    # BIN: this tree's release build
#   BIN=/tmp/switchyard ROUNDS=5 DURATION=5s benches/cpu_split.sh
#
# Bounded: every wrk run stops after DURATION; every server it starts is stopped on
# exit. Everything is on 127.0.0.1.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-3s}
CONNECTIONS=${CONNECTIONS:-50}
BASE_PORT=${BASE_PORT:-18300}
cd "$(dirname "$0")/.."
source benches/common.sh
require_tools wrk nginx
use_bin_or_release_build
HZ=$(getconf CLK_TCK)

UP1=$((BASE_PORT + 1)); UP2=$((BASE_PORT + 2)); SY=$((BASE_PORT + 10)); NGX=$((BASE_PORT + 20))
"$BIN" stand-in --listen "127.0.0.1:$UP1" --name up1 & PIDS+=($!)
"$BIN" stand-in --listen "127.0.0.1:$UP2" --name up2 & PIDS+=($!)
wait_port "$UP1"; wait_port "$UP2"
switchyard_config switchyard "$SY"
RUST_LOG=warn "$BIN" run --config "$WORK/switchyard.toml" & PIDS+=($!)
declare -A PID_OF=([switchyard]=$!) PORT_OF=([switchyard]=$SY [nginx]=$NGX)
wait_port "$SY"
start_nginx "$NGX" ";" ""
# The worker does the work; the master only waits.
PID_OF[nginx]=$(pgrep -P "${PIDS[-1]}" | head -1)

for round in $(seq 1 "$ROUNDS"); do
    for target in switchyard nginx; do
        pid=${PID_OF[$target]}
        read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
        requests=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:${PORT_OF[$target]}/" | awk '/requests in/ {print $1}')
        read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
        awk -v t="$target" -v r="$round" -v n="$requests" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$HZ" \
            'BEGIN {printf "round %d %-10s %8d requests  user %6.2f us  kernel %6.2f us per request\n", r, t, n, u / hz / n * 1e6, s / hz / n * 1e6}'
    done
done
