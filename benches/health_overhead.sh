#!/usr/bin/env bash
# Cost of active health checks at scale: one pool of N backends (default 1000) checked
# every second over HTTP, no client traffic. Prints the proxy's CPU share and memory
# over a fixed window. Everything runs on 127.0.0.1 and stops by itself.
#
#   benches/health_overhead.sh            # N=1000, 30 s window
#   N=2000 WINDOW=60 benches/health_overhead.sh
#   BIN=/tmp/old/switchyard benches/health_overhead.sh   # another build
set -euo pipefail
N=${N:-1000}
WINDOW=${WINDOW:-30}
BASE=${BASE_PORT:-20000}
cd "$(dirname "$0")/.."
if [[ -z "${BIN:-}" ]]; then
    cargo build --release --quiet
    BIN=target/release/switchyard
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

"$BIN" stand-in --listen "127.0.0.1:$BASE" --count "$N" --name app & PIDS+=($!)
{
    echo '[proxy]'; echo "listen = \"127.0.0.1:$((BASE - 10))\""; echo 'workers = 1'
    echo '[admin]'; echo "listen = \"127.0.0.1:$((BASE - 9))\""
    echo '[state]'; echo "path = \"$WORK/state.json\""
    echo '[pools.big]'
    printf 'backends = ['
    for i in $(seq 0 $((N - 1))); do printf '"127.0.0.1:%d",' $((BASE + i)); done
    echo ']'
    echo '[pools.big.health]'; echo 'path = "/health"'; echo 'interval = "1s"'; echo 'timeout = "500ms"'
    echo '[services.app]'; echo 'active = "big"'
} >"$WORK/switchyard.toml"
RUST_LOG=warn "$BIN" run --config "$WORK/switchyard.toml" & SY=$!; PIDS+=($SY)

for _ in $(seq 1 200); do
    curl -fs "http://127.0.0.1:$((BASE - 9))/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fs "http://127.0.0.1:$((BASE - 9))/readyz" >/dev/null || { echo "proxy never became ready" >&2; exit 1; }

ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$SY/stat"; }
sleep 2
c0=$(cpu); t0=$(date +%s.%N)
sleep "$WINDOW"
c1=$(cpu); t1=$(date +%s.%N)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$SY/status")
healthy=$(curl -fs "http://127.0.0.1:$((BASE - 9))/api/v1/state" | grep -o '"health":"healthy"' | wc -l)
awk -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" -v hz="$ticks" -v n="$N" -v rss="$rss" -v ok="$healthy" 'BEGIN {
    share = (c1 - c0) / hz / (t1 - t0) * 100
    printf "health checks: %d backends, HTTP check every 1s, %d healthy\n", n, ok
    printf "proxy CPU: %.1f%% of one core over %.0f s (%.1f checks/s)\n", share, t1 - t0, n
    printf "proxy RSS: %.1f MiB\n", rss / 1024
}'
