#!/usr/bin/env bash
# Side-by-side HTTP/1.1 load test on 127.0.0.1: the same two upstream app servers,
# reached directly, through switchyard, and through nginx and HAProxy (when
# installed), one worker/thread each, wrk with fixed connections and duration,
# alternating rounds, medians.
#
#   benches/load.sh                      # 3 rounds of 10 s, 50 connections
#   ROUNDS=5 DURATION=20s CONNECTIONS=100 benches/load.sh
#   INSTALL=1 benches/load.sh            # apt-get install wrk and nginx first
#   WORKERS=2 benches/load.sh            # two workers/processes/threads each
#   OBSERVABILITY=1 benches/load.sh      # also switchyard with metrics off, and with
#                                        # the JSON access log on (to /dev/null)
# Always measures switchyard twice: with its default balancer (p2c) and as sy-rr,
# with `balance = "round_robin"`. nginx runs its default round robin; HAProxy runs
# `balance leastconn` (common.sh), a least-loaded balancer like p2c.
#
# Prints requests/s, p50, p99 and CPU per request per target (the server's utime +
# stime over each run, from /proc, divided by the requests it served: steadier than
# req/s when wrk, the upstreams and the proxy share two cores), then what one idle
# keep-alive connection costs each proxy in RSS (IDLE_CONNS connections, default
# 3,000, each after one request), and switchyard's ratios to nginx and HAProxy.
# Bounded: every wrk run stops after DURATION; every server it starts is stopped on
# exit.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-50}
BASE_PORT=${BASE_PORT:-18000}
IDLE_CONNS=${IDLE_CONNS:-3000}
# switchyard's `workers`, nginx's `worker_processes`, HAProxy's `nbthread`.
export WORKERS=${WORKERS:-1}
cd "$(dirname "$0")/.."

if [[ "${INSTALL:-0}" == 1 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light haproxy >/dev/null
fi
source benches/common.sh
TOOLS_HINT="INSTALL=1 installs it" require_tools wrk
use_bin_or_release_build
# Every server started below inherits room for the idle connections (and HAProxy
# asks for twice its maxconn of 4096).
FDS=$((IDLE_CONNS * 2 + 1024)); ((FDS >= 16384)) || FDS=16384
ulimit -n "$FDS"
HZ=$(getconf CLK_TCK)

UP1=$((BASE_PORT + 1)); UP2=$((BASE_PORT + 2))
SY=$((BASE_PORT + 10)); SY_ADMIN=$((BASE_PORT + 11)); NGX=$((BASE_PORT + 20)); HAP=$((BASE_PORT + 21))

"$BIN" stand-in --listen "127.0.0.1:$UP1" --name up1 & PIDS+=($!)
"$BIN" stand-in --listen "127.0.0.1:$UP2" --name up2 & PIDS+=($!)
wait_port "$UP1"; wait_port "$UP2"
declare -A PID_OF=([direct]=${PIDS[0]})

switchyard_config switchyard "$SY"
RUST_LOG=warn "$BIN" run --config "$WORK/switchyard.toml" & PIDS+=($!)
PID_OF[switchyard]=$!
wait_port "$SY"

TARGETS=(direct switchyard)
declare -A URL=([direct]="http://127.0.0.1:$UP1/" [switchyard]="http://127.0.0.1:$SY/")

# A copy of switchyard's config for a variant: proxy on $2, admin on $2 + 1, its own
# state file.
variant_config() { # name port
    sed -e "s/127.0.0.1:$SY\"/127.0.0.1:$2\"/" -e "s/127.0.0.1:$SY_ADMIN\"/127.0.0.1:$(($2 + 1))\"/" \
        -e "s#$WORK/switchyard.state.json#$WORK/$1.state.json#" "$WORK/switchyard.toml" >"$WORK/$1.toml"
}
start_variant() { # name port [log sink]
    RUST_LOG=warn "$BIN" run --config "$WORK/$1.toml" >"${3:-/dev/stderr}" & PIDS+=($!)
    PID_OF["sy-$1"]=$!
    wait_port "$2"
    TARGETS+=("sy-$1")
    URL["sy-$1"]="http://127.0.0.1:$2/"
}

# The default balancer is power of two choices. With two backends its second draw is
# the other backend, so it always takes the one with fewer requests in flight, and
# switchyard's count still includes answers that wait unread in its own sockets: a
# burst of requests goes to one backend, a fatter p99 (see the README). sy-rr is the
# like-for-like row for nginx; HAProxy's leastconn is the one for p2c.
port=$((BASE_PORT + 30))
variant_config rr "$port"
sed -i 's/^\[pools.app\]$/&\nbalance = "round_robin"/' "$WORK/rr.toml"
start_variant rr "$port"

if [[ "${OBSERVABILITY:-0}" == 1 ]]; then
    # Same proxy config on other ports: metrics off; and metrics on plus access log.
    for variant in nometrics accesslog; do
        port=$((BASE_PORT + 30 + ${#TARGETS[@]} * 2))
        variant_config "$variant" "$port"
        if [[ $variant == nometrics ]]; then
            printf '[metrics]\nenabled = false\n' >>"$WORK/$variant.toml"
        else
            printf '[log]\naccess = "stdout"\nformat = "json"\n' >>"$WORK/$variant.toml"
        fi
        start_variant "$variant" "$port" /dev/null
    done
fi

if command -v nginx >/dev/null; then
    start_nginx "$NGX" ";" ""
    PID_OF[nginx]=${PIDS[-1]}
    TARGETS+=(nginx)
    URL[nginx]="http://127.0.0.1:$NGX/"
else
    echo "nginx not installed: comparing direct and switchyard only (INSTALL=1 installs it)" >&2
fi

if command -v haproxy >/dev/null; then
    start_haproxy "$HAP" "" ""
    PID_OF[haproxy]=${PIDS[-1]}
    TARGETS+=(haproxy)
    URL[haproxy]="http://127.0.0.1:$HAP/"
else
    echo "haproxy not installed: skipped (INSTALL=1 installs it)" >&2
fi

declare -A RPS P50 P99 CPU
for round in $(seq 1 "$ROUNDS"); do
    # Each round starts one target later, so no target always runs right after the
    # same neighbour (the direct run leaves the upstreams and the CPU warm).
    n=${#TARGETS[@]}
    for k in $(seq 0 $((n - 1))); do
        target=${TARGETS[$(((k + round - 1) % n))]}
        c0=$(tree_cpu_ticks "${PID_OF[$target]}")
        out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "${URL[$target]}")
        c1=$(tree_cpu_ticks "${PID_OF[$target]}")
        if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
            echo "round $round $target: errors reported by wrk:" >&2
            grep "Non-2xx\|Socket errors" <<<"$out" >&2
        fi
        rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
        requests=$(awk '/requests in/ {print $1}' <<<"$out")
        p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
        p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
        cpu=$(awk -v c="$((c1 - c0))" -v hz="$HZ" -v r="$requests" 'BEGIN {printf "%.2f", c / hz / r * 1e6}')
        RPS[$target]+="$rps "; P50[$target]+="$p50 "; P99[$target]+="$p99 "; CPU[$target]+="$cpu "
        printf 'round %d %-12s %10.0f req/s  p50 %7s ms  p99 %7s ms  %6s us CPU/req\n' "$round" "$target" "$rps" "$p50" "$p99" "$cpu"
    done
done

# What an idle keep-alive connection costs: RSS with IDLE_CONNS idle connections open
# (each after one answer) minus RSS before, per connection.
declare -A IDLE_KB
idle_kb() { # pid port pace_ms -> prints KB per connection, or "-"
    local pid=$1 port=$2 pace=$3 before after holder
    before=$(tree_rss_kb "$pid")
    mkfifo "$WORK/idle.in"
    python3 benches/idle_conns.py "$port" "$IDLE_CONNS" "$pace" <"$WORK/idle.in" >"$WORK/idle.out" & holder=$!
    exec 4>"$WORK/idle.in"
    for _ in $(seq 1 1200); do
        grep -q ready "$WORK/idle.out" 2>/dev/null && break
        kill -0 "$holder" 2>/dev/null || break
        sleep 0.1
    done
    if grep -q ready "$WORK/idle.out"; then
        after=$(tree_rss_kb "$pid")
        awk -v a="$after" -v b="$before" -v n="$IDLE_CONNS" 'BEGIN {printf "%.2f", (a - b) / n}'
    else
        echo "port $port: $IDLE_CONNS idle connections could not be opened" >&2
        printf -- "-"
    fi
    echo >&4; exec 4>&-
    wait "$holder" 2>/dev/null || true
    rm -f "$WORK/idle.in" "$WORK/idle.out"
}
for target in "${TARGETS[@]}"; do
    [[ $target == direct || $target == sy-* ]] && continue
    port=${URL[$target]#http://127.0.0.1:}; port=${port%/}
    IDLE_KB[$target]=$(idle_kb "${PID_OF[$target]}" "$port" 0)
done
# switchyard gives a plain HTTP/1.1 connection's hyper buffers up after 50 ms idle, so
# opened back to back, the last of them still hold theirs (and the
# allocator keeps what the others freed). Clients arriving over time, IDLE_PACE_MS apart,
# on a fresh instance (one that has not already grown its heap for the run above):
IDLE_PACE_MS=${IDLE_PACE_MS:-1}
PACED=$((BASE_PORT + 40))
variant_config paced "$PACED"
RUST_LOG=warn "$BIN" run --config "$WORK/paced.toml" & PIDS+=($!)
wait_port "$PACED"
IDLE_KB_PACED=$(idle_kb "${PIDS[-1]}" "$PACED" "$IDLE_PACE_MS")

echo
echo "median of $ROUNDS rounds; wrk -t1 -c$CONNECTIONS -d$DURATION; $WORKERS worker(s) each; $(nproc) cores; $(uname -m)"
echo "balancers: switchyard p2c, sy-rr round robin, nginx round robin, haproxy leastconn"
printf '%-12s %12s %10s %10s %12s %16s\n' target "req/s" "p50 ms" "p99 ms" "CPU us/req" "KB/idle conn"
declare -A MR MP99 MCPU
for target in "${TARGETS[@]}"; do
    MR[$target]=$(median "${RPS[$target]}")
    MP99[$target]=$(median "${P99[$target]}")
    MCPU[$target]=$(median "${CPU[$target]}")
    printf '%-12s %12.0f %10s %10s %12s %16s\n' "$target" "${MR[$target]}" "$(median "${P50[$target]}")" \
        "${MP99[$target]}" "${MCPU[$target]}" "${IDLE_KB[$target]:--}"
done
if [[ -n "${MR[sy-nometrics]:-}" ]]; then
    awk -v on="${MR[switchyard]}" -v off="${MR[sy-nometrics]}" -v withlog="${MR[sy-accesslog]}" \
        'BEGIN { printf "metrics on vs off: %.1f%% req/s; access log on: %.1f%% req/s vs metrics-only\n", (on / off - 1) * 100, (withlog / on - 1) * 100 }'
fi
echo "switchyard, idle connections opened ${IDLE_PACE_MS} ms apart: $IDLE_KB_PACED KB/idle conn"
for sy in switchyard sy-rr; do
    for peer in nginx haproxy; do
        if [[ -n "${MR[$peer]:-}" ]]; then
            awk -v s="${MR[$sy]}" -v n="${MR[$peer]}" -v sp="${MP99[$sy]}" -v np="${MP99[$peer]}" \
                -v sc="${MCPU[$sy]}" -v nc="${MCPU[$peer]}" -v sk="${IDLE_KB[switchyard]:-}" -v nk="${IDLE_KB[$peer]:-}" \
                -v sy="$sy" -v peer="$peer" \
                'BEGIN { printf "%s / %s: req/s %.2fx, p99 %.2fx, CPU/req %.2fx", sy, peer, s / n, sp / np, sc / nc;
                         if (sy == "switchyard" && sk + 0 > 0 && nk + 0 > 0) printf ", KB/idle conn %.1fx", sk / nk; print "" }'
        fi
    done
done
