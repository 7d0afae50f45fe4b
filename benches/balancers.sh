#!/usr/bin/env bash
# Latency by balancer, side by side: switchyard with `p2c` and with `round_robin`,
# nginx with its round robin and with `least_conn`, HAProxy with `leastconn` and with
# `roundrobin`, all one worker/thread, in front of the same two stand-in servers, wrk
# with fixed connections, alternating rounds; prints p50, p90, p99 per target and the
# medians. It answers whether a fatter p99 comes with least-loaded balancing as such
# or with one proxy's implementation of it (see the README's performance section).
#
#   benches/balancers.sh                    # BIN: this tree's release build
#   BIN=/tmp/switchyard ROUNDS=7 DURATION=5s benches/balancers.sh
#   WORKERS=2 benches/balancers.sh
#
# Bounded: every wrk run stops after DURATION; every server it starts is stopped on
# exit. Everything is on 127.0.0.1.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-4s}
CONNECTIONS=${CONNECTIONS:-50}
BASE_PORT=${BASE_PORT:-18700}
export WORKERS=${WORKERS:-1}
cd "$(dirname "$0")/.."
source benches/common.sh
require_tools wrk nginx haproxy
use_bin_or_release_build

UP1=$((BASE_PORT + 1)); UP2=$((BASE_PORT + 2))
"$BIN" stand-in --listen "127.0.0.1:$UP1" --name up1 & PIDS+=($!)
"$BIN" stand-in --listen "127.0.0.1:$UP2" --name up2 & PIDS+=($!)
wait_port "$UP1"; wait_port "$UP2"

declare -A PORT
TARGETS=(sy-p2c sy-rr ngx-rr ngx-leastconn hap-leastconn hap-rr)
PORT=([sy-p2c]=$((BASE_PORT + 10)) [sy-rr]=$((BASE_PORT + 12)) [ngx-rr]=$((BASE_PORT + 20))
      [ngx-leastconn]=$((BASE_PORT + 21)) [hap-leastconn]=$((BASE_PORT + 22)) [hap-rr]=$((BASE_PORT + 23)))
for balance in p2c rr; do
    switchyard_config "sy-$balance" "${PORT[sy-$balance]}"
    [[ $balance == rr ]] && sed -i 's/^\[pools.app\]$/&\nbalance = "round_robin"/' "$WORK/sy-rr.toml"
    RUST_LOG=warn "$BIN" run --config "$WORK/sy-$balance.toml" & PIDS+=($!)
    wait_port "${PORT[sy-$balance]}"
done
NGINX_NAME=ngx-rr start_nginx "${PORT[ngx-rr]}" ";" ""
NGINX_NAME=ngx-leastconn NGINX_BALANCE="least_conn;" start_nginx "${PORT[ngx-leastconn]}" ";" ""
HAPROXY_NAME=hap-leastconn HAPROXY_BALANCE=leastconn start_haproxy "${PORT[hap-leastconn]}" "" ""
HAPROXY_NAME=hap-rr HAPROXY_BALANCE=roundrobin start_haproxy "${PORT[hap-rr]}" "" ""

declare -A P50 P90 P99
for round in $(seq 1 "$ROUNDS"); do
    n=${#TARGETS[@]}
    for k in $(seq 0 $((n - 1))); do
        target=${TARGETS[$(((k + round - 1) % n))]}
        out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "http://127.0.0.1:${PORT[$target]}/")
        if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
            echo "round $round $target: errors reported by wrk:" >&2
            grep "Non-2xx\|Socket errors" <<<"$out" >&2
        fi
        p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
        p90=$(to_ms "$(awk '$1 == "90%" {print $2}' <<<"$out")")
        p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
        P50[$target]+="$p50 "; P90[$target]+="$p90 "; P99[$target]+="$p99 "
        printf 'round %d %-14s p50 %7s ms  p90 %7s ms  p99 %7s ms\n' "$round" "$target" "$p50" "$p90" "$p99"
    done
done

echo
echo "median of $ROUNDS rounds; wrk -t1 -c$CONNECTIONS -d$DURATION; $WORKERS worker(s) each; $(nproc) cores"
printf '%-14s %10s %10s %10s   %s\n' target "p50 ms" "p90 ms" "p99 ms" "p99 of each round"
for target in "${TARGETS[@]}"; do
    printf '%-14s %10s %10s %10s   %s\n' "$target" "$(median "${P50[$target]}")" \
        "$(median "${P90[$target]}")" "$(median "${P99[$target]}")" "${P99[$target]}"
done
