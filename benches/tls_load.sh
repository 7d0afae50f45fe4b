#!/usr/bin/env bash
# HTTPS side by side on 127.0.0.1: TLS termination in switchyard, nginx and HAProxy
# (when installed), same ECDSA P-256 certificate, same two plain-HTTP upstream app
# servers, one worker/thread each. HTTP/1.1 over TLS with wrk, HTTP/2 over TLS (ALPN
# h2) with h2load; fixed connections and duration, alternating rounds, medians.
#
#   benches/tls_load.sh                         # 3 rounds of 10 s, 50 connections
#   ROUNDS=5 DURATION=20 CONNECTIONS=100 STREAMS=10 benches/tls_load.sh
#   INSTALL=1 benches/tls_load.sh               # apt-get install the tools first
#   BIN=/tmp/old/switchyard benches/tls_load.sh # another build than this tree's
#
# Connections are opened once and kept (wrk and h2load reuse them), so this measures
# steady-state TLS record and HTTP work, not handshakes. Bounded: every run stops after
# DURATION seconds; every server it starts is stopped on exit.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}
STREAMS=${STREAMS:-10}
BASE_PORT=${BASE_PORT:-18100}
cd "$(dirname "$0")/.."

if [[ "${INSTALL:-0}" == 1 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client nginx-light haproxy openssl >/dev/null
fi
source benches/common.sh
TOOLS_HINT="INSTALL=1 installs it" require_tools wrk h2load openssl
use_bin_or_release_build

UP1=$((BASE_PORT + 1)); UP2=$((BASE_PORT + 2))
SY=$((BASE_PORT + 10)); SY_TLS=$((BASE_PORT + 12)); SY_ADMIN=$((BASE_PORT + 11))
NGX=$((BASE_PORT + 20)); HAP=$((BASE_PORT + 21))

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=bench.test -addext subjectAltName=DNS:bench.test,IP:127.0.0.1 \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/bundle.pem"

"$BIN" stand-in --listen "127.0.0.1:$UP1" --name up1 & PIDS+=($!)
"$BIN" stand-in --listen "127.0.0.1:$UP2" --name up2 & PIDS+=($!)
wait_port "$UP1"; wait_port "$UP2"

switchyard_config switchyard "$SY" "[proxy.tls]
listen = \"127.0.0.1:$SY_TLS\"
certificates = [{ cert = \"$WORK/cert.pem\", key = \"$WORK/key.pem\" }]"
RUST_LOG=warn "$BIN" run --config "$WORK/switchyard.toml" & PIDS+=($!)
wait_port "$SY_TLS"
TARGETS=(switchyard)
declare -A PORT=([switchyard]=$SY_TLS)

if command -v nginx >/dev/null; then
    start_nginx "$NGX" " ssl http2;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        http2_max_concurrent_streams 100;" "            proxy_set_header X-Forwarded-Proto https;"
    TARGETS+=(nginx)
    PORT[nginx]=$NGX
else
    echo "nginx not installed: skipped (INSTALL=1 installs it)" >&2
fi

if command -v haproxy >/dev/null; then
    start_haproxy "$HAP" "ssl crt $WORK/bundle.pem alpn h2,http/1.1 ssl-min-ver TLSv1.2" \
        "    http-request set-header X-Forwarded-Proto https"
    TARGETS+=(haproxy)
    PORT[haproxy]=$HAP
else
    echo "haproxy not installed: skipped (INSTALL=1 installs it)" >&2
fi

# One run: prints "req/s latency-ms" (p99 for wrk, mean for h2load, which has no
# percentiles) and complains about any failed request.
run_wrk() {
    local out
    out=$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "https://127.0.0.1:$1/")
    if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
        grep "Non-2xx\|Socket errors" <<<"$out" | sed "s/^/wrk $2: /" >&2
    fi
    echo "$(awk '/^Requests\/sec:/ {print $2}' <<<"$out") $(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")"
}

run_h2load() {
    local out failed
    out=$(h2load -t1 -c"$CONNECTIONS" -m"$STREAMS" -D"$DURATION" "https://127.0.0.1:$1/" 2>&1)
    grep -q "Application protocol: h2" <<<"$out" || { echo "h2load $2: did not negotiate h2" >&2; }
    failed=$(awk '/^requests:/ {print $10 + $12 + $14}' <<<"$out")
    [[ "${failed:-0}" == 0 ]] || echo "h2load $2: $failed requests failed/errored/timed out" >&2
    echo "$(awk '/^finished in/ {print $4}' <<<"$out") $(to_ms "$(awk '/^time for request:/ {print $6}' <<<"$out")")"
}

declare -A RPS LAT
for round in $(seq 1 "$ROUNDS"); do
    n=${#TARGETS[@]}
    for k in $(seq 0 $((n - 1))); do
        target=${TARGETS[$(((k + round - 1) % n))]}
        for tool in wrk h2load; do
            read -r rps lat < <("run_$tool" "${PORT[$target]}" "$target")
            RPS[$target/$tool]+="$rps "; LAT[$target/$tool]+="$lat "
            printf 'round %d %-10s %-6s %10.0f req/s  %s %7s ms\n' "$round" "$target" "$tool" "$rps" \
                "$([[ $tool == wrk ]] && echo p99 || echo mean)" "$lat"
        done
    done
done

echo
echo "median of $ROUNDS rounds; ${DURATION}s runs, $CONNECTIONS connections (h2load: $STREAMS streams each); $(nproc) cores"
printf '%-12s %-22s %12s %12s\n' target protocol "req/s" "latency ms"
declare -A MR
for target in "${TARGETS[@]}"; do
    for tool in wrk h2load; do
        MR[$target/$tool]=$(median "${RPS[$target/$tool]}")
        printf '%-12s %-22s %12.0f %12s\n' "$target" \
            "$([[ $tool == wrk ]] && echo 'HTTPS/1.1 (wrk, p99)' || echo 'HTTPS/2 (h2load, mean)')" \
            "${MR[$target/$tool]}" "$(median "${LAT[$target/$tool]}")"
    done
done
for peer in nginx haproxy; do
    [[ -n "${MR[$peer/wrk]:-}" ]] || continue
    awk -v s1="${MR[switchyard/wrk]}" -v n1="${MR[$peer/wrk]}" -v s2="${MR[switchyard/h2load]}" -v n2="${MR[$peer/h2load]}" -v peer="$peer" \
        'BEGIN { printf "switchyard / %s req/s: HTTPS/1.1 %.2fx, HTTPS/2 %.2fx\n", peer, s1 / n1, s2 / n2 }'
done
