#!/usr/bin/env bash
# A fleet on one etcd, measured: three switchyard instances (A, B, C) with [cluster],
# two stand-in app servers (blue, green).
#
# 1. Propagation: ROUNDS switches through A (no ?wait); for each, the time from sending
#    the call to the first request that B, and C, route to the new pool (each polled
#    over its own keep-alive connection).
# 2. Convergence: ROUNDS switches through A with ?wait=converged; the call's duration.
# 3. Per-request cost: wrk (1 thread, 50 connections, 5 s, 3 rounds) against B (with
#    [cluster]) and against D (the same config without it), CPU time per request from
#    /proc/PID/stat, medians side by side.
#
#   benches/cluster.sh                  (builds the release binary)
#   BIN=target/release/switchyard ROUNDS=20 benches/cluster.sh
#
# Needs etcd (Debian etcd-server), wrk and python3. Everything on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/common.sh
ROUNDS=${ROUNDS:-20}
use_bin_or_release_build
require_tools etcd wrk python3

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ETCD_C=$(port); ETCD_P=$(port); BLUE=$(port); GREEN=$(port)
etcd --data-dir "$WORK/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_C" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_C" --listen-peer-urls "http://127.0.0.1:$ETCD_P" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_P" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_P" >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
"$BIN" stand-in --listen "127.0.0.1:$BLUE" --name blue >/dev/null 2>&1 &
PIDS+=($!)
"$BIN" stand-in --listen "127.0.0.1:$GREEN" --name green >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$ETCD_C"; wait_port "$BLUE"; wait_port "$GREEN"

declare -A PROXY ADMIN PID
for name in A B C D; do
    PROXY[$name]=$(port); ADMIN[$name]=$(port)
    cluster=""
    [[ $name != D ]] && cluster="[cluster]
etcd = [\"http://127.0.0.1:$ETCD_C\"]
name = \"$name\"
"
    cat >"$WORK/$name.toml" <<TOML
[proxy]
listen = "127.0.0.1:${PROXY[$name]}"
workers = 1
[admin]
listen = "127.0.0.1:${ADMIN[$name]}"
[state]
path = "$WORK/$name.state.json"
[metrics]
enabled = true
[pools.blue]
backends = ["127.0.0.1:$BLUE"]
[pools.green]
backends = ["127.0.0.1:$GREEN"]
[services.app]
active = "blue"
$cluster
TOML
    RUST_LOG=warn "$BIN" run --config "$WORK/$name.toml" >/dev/null 2>"$WORK/$name.log" &
    PID[$name]=$!
    PIDS+=($!)
done
for name in A B C D; do wait_port "${PROXY[$name]}"; wait_port "${ADMIN[$name]}"; done

python3 - "${ADMIN[A]}" "${PROXY[B]}" "${PROXY[C]}" "$ROUNDS" <<'PY'
import http.client, json, sys, time
admin_a, proxy_b, proxy_c, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def upstream(conn):
    conn.request("GET", "/")
    r = conn.getresponse(); r.read()
    return r.getheader("x-upstream")

def switch(to, wait):
    c = http.client.HTTPConnection("127.0.0.1", admin_a)
    path = "/api/v1/services/app/switch" + ("?wait=converged" if wait else "")
    c.request("POST", path, json.dumps({"to": to}), {"content-type": "application/json"})
    r = c.getresponse(); body = r.read()
    assert r.status == 200, body

def median(xs):
    xs = sorted(xs); return xs[len(xs) // 2]

time.sleep(1)
b = http.client.HTTPConnection("127.0.0.1", proxy_b)
c = http.client.HTTPConnection("127.0.0.1", proxy_c)
seen = {"B": [], "C": []}
for i in range(rounds):
    to = "green" if i % 2 == 0 else "blue"
    start = time.perf_counter()
    switch(to, False)
    for name, conn in (("B", b), ("C", c)):
        while not upstream(conn).startswith(to):
            pass
        seen[name].append((time.perf_counter() - start) * 1000)
converge = []
for i in range(rounds):
    to = "green" if i % 2 == 0 else "blue"
    start = time.perf_counter()
    switch(to, True)
    converge.append((time.perf_counter() - start) * 1000)
print(f"| switch on A, first request on the new pool | median | max |\n|---|---:|---:|")
for name in ("B", "C"):
    print(f"| through {name} | {median(seen[name]):.1f} ms | {max(seen[name]):.1f} ms |")
print(f"| ?wait=converged, 3 instances | {median(converge):.1f} ms | {max(converge):.1f} ms |")
PY

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A CPU
for round in 1 2 3; do
    for name in B D; do
        before=$(cpu_ticks "${PID[$name]}")
        out=$(wrk -t1 -c50 -d5s "http://127.0.0.1:${PROXY[$name]}/" 2>&1)
        after=$(cpu_ticks "${PID[$name]}")
        requests=$(awk '/requests in/ {print $1}' <<<"$out")
        hz=$(getconf CLK_TCK)
        CPU[$name]+="$(awk -v t=$((after - before)) -v n="$requests" -v hz="$hz" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}') "
    done
done
echo
echo "| instance | CPU per request (µs, median of 3) |"
echo "|---|---:|"
echo "| B, [cluster] on | $(median "${CPU[B]}") |"
echo "| D, no [cluster] | $(median "${CPU[D]}") |"
