#!/usr/bin/env bash
# Routing at scale: N services, each with one host (or path prefix) and its own pool
# of the same two stand-in app servers; wrk sends every request to the last service.
# For each mode and N it prints, one worker:
#   - CPU per request from /proc/PID/stat: raw, and net of the CPU the proxy spends
#     idle (health checks of 2N backends) over the same time;
#   - p99 quiet, and p99 while another service's canary changes every 100 ms;
#   - RSS, and RSS per service against N=1 of the same mode;
#   - one canary change (admin call, median of 5), a /metrics scrape (time and size);
#   - `switchyard check` and start (to the first proxied 200) in seconds.
# Modes: exact (`sN.example.com`), suffix (`*.sN.example.com`), catchall (N-1 exact
# hosts and one `*` service that gets the traffic), prefix (one host, N path prefixes).
#
#   benches/scale.sh                              # N = 1 1000 10000, every mode
#   COUNTS="1 10000" MODES=exact benches/scale.sh
#   BIN=/tmp/old/switchyard benches/scale.sh      # another build, for before/after
#   HEALTH_INTERVAL=60s benches/scale.sh          # checks rarely: the routing alone
#
# By default every pool keeps the default health check (TCP, every 2 s). The 2N
# backends are the same two servers checked alike, so they share two checks (see
# config/README.md, "How a backend's health is decided"); the net figure takes out what
# the proxy spends idle anyway.
#
# Everything runs on 127.0.0.1, every wrk run stops after DURATION seconds, and every
# process it starts is stopped on exit.
set -euo pipefail
COUNTS=${COUNTS:-"1 1000 10000"}
PREFIX_COUNTS=${PREFIX_COUNTS:-"1 1000"}
MODES=${MODES:-"exact suffix catchall prefix"}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
IDLE=${IDLE:-5}
CONNECTIONS=${CONNECTIONS:-50}
BASE_PORT=${BASE_PORT:-19000}
# Builds whose scrape grows with services × pools never finish one at 10,000: skip it
# above this many services (before/after runs of such a build).
SCRAPE_MAX=${SCRAPE_MAX:-1000000}
cd "$(dirname "$0")/.."
source benches/common.sh
require_tools wrk
use_bin_or_release_build

UP1=$((BASE_PORT + 1)); UP2=$((BASE_PORT + 2))
SY=$((BASE_PORT + 10)); ADMIN=$((BASE_PORT + 11))
"$BIN" stand-in --listen "127.0.0.1:$UP1" --name up1 & PIDS+=($!)
"$BIN" stand-in --listen "127.0.0.1:$UP2" --name up2 & PIDS+=($!)
wait_port "$UP1"; wait_port "$UP2"
HZ=$(getconf CLK_TCK)

# Writes the config for mode $1 and $2 services; sets HOST and URL_PATH for wrk.
write_config() {
    local mode=$1 n=$2 last=$(($2 - 1))
    case $mode in
        exact) HOST="s$last.example.com"; URL_PATH=/ ;;
        suffix) HOST="www.s$last.example.com"; URL_PATH=/ ;;
        catchall) HOST="nobody.example.org"; URL_PATH=/ ;;
        prefix) HOST="app.example.com"; URL_PATH="/p$last/x" ;;
    esac
    {
        printf '[proxy]\nlisten = "127.0.0.1:%d"\nworkers = 1\n' "$SY"
        printf '[admin]\nlisten = "127.0.0.1:%d"\n' "$ADMIN"
        printf '[state]\npath = "%s/state.json"\n' "$WORK"
        printf '[pools.spare]\nbackends = ["127.0.0.1:%d", "127.0.0.1:%d"]\n' "$UP1" "$UP2"
        awk -v n="$n" -v mode="$mode" -v health="${HEALTH_INTERVAL:-}" -v up1="$UP1" -v up2="$UP2" 'BEGIN {
            for (i = 0; i < n; i++) {
                printf "[pools.p%d]\nbackends = [\"127.0.0.1:%d\", \"127.0.0.1:%d\"]\n", i, up1, up2
                if (health != "") printf "[pools.p%d.health]\ninterval = \"%s\"\n", i, health
                printf "[services.s%d]\nactive = \"p%d\"\n", i, i
                if (mode == "exact" || (mode == "catchall" && i < n - 1))
                    printf "hosts = [\"s%d.example.com\"]\n", i
                else if (mode == "suffix") printf "hosts = [\"*.s%d.example.com\"]\n", i
                else if (mode == "prefix") printf "hosts = [\"app.example.com\"]\npath_prefix = \"/p%d/\"\n", i
            }
        }'
    } >"$WORK/switchyard.toml"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; }

# The canary of service s0 between 10% and 20% of the spare pool; prints ms.
CHANGE=0
canary_change() {
    CHANGE=$((CHANGE + 1))
    curl -fsS -o /dev/null -w '%{time_total}\n' -X PUT -H 'content-type: application/json' \
        -d "{\"pool\": \"spare\", \"weight\": $((10 + CHANGE % 2 * 10))}" \
        "http://127.0.0.1:$ADMIN/api/v1/services/s0/canary" | awk '{printf "%.1f", $1 * 1000}'
}

# One wrk run; prints "requests p99_ms".
run_wrk() {
    wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Host: $HOST" \
        "http://127.0.0.1:$SY$URL_PATH" >"$WORK/wrk.out"
    local requests p99
    requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
    p99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk.out")
    if grep -q 'Non-2xx\|Socket errors' "$WORK/wrk.out"; then
        echo "wrk saw errors:" >&2; cat "$WORK/wrk.out" >&2; exit 1
    fi
    echo "$requests $(to_ms "$p99")"
}

declare -A RSS_ONE
printf '%-8s %6s | %8s %9s %9s | %8s %8s | %7s %8s | %8s %9s %9s | %7s %7s\n' \
    mode services req/s "µs/req" "net µs" "p99 ms" "p99 chg" "RSS MB" "KB/svc" \
    "chg ms" "scrape ms" "scrape MB" "check s" "start s"
for mode in $MODES; do
    counts=$COUNTS
    [[ $mode == prefix ]] && counts=$PREFIX_COUNTS
    for n in $counts; do
        write_config "$mode" "$n"
        rm -f "$WORK/state.json"
        t0=$(now)
        "$BIN" check --config "$WORK/switchyard.toml" >/dev/null
        check_s=$(elapsed "$t0" "$(now)")

        t0=$(now)
        RUST_LOG=warn "$BIN" run --config "$WORK/switchyard.toml" >"$WORK/proxy.log" 2>&1 & proxy=$!
        PIDS+=($proxy)
        started=""
        for _ in $(seq 1 6000); do
            code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $HOST" "http://127.0.0.1:$SY$URL_PATH" || true)
            if [[ $code == 200 ]]; then started=$(elapsed "$t0" "$(now)"); break; fi
            kill -0 "$proxy" 2>/dev/null || { cat "$WORK/proxy.log" >&2; exit 1; }
            sleep 0.01
        done
        [[ -n $started ]] || { echo "$mode $n: no 200 within 60 s" >&2; exit 1; }

        # Idle: what the proxy spends with no client (health checks, samplers).
        sleep 1
        c0=$(cpu_ticks "$proxy"); t0=$(now); sleep "$IDLE"; c1=$(cpu_ticks "$proxy"); t1=$(now)
        idle_rate=$(awk -v c="$((c1 - c0))" -v hz="$HZ" -v t="$(elapsed "$t0" "$t1")" 'BEGIN {print c / hz / t}')

        rates=""; raws=""; nets=""; p99s=""
        for _ in $(seq 1 "$ROUNDS"); do
            c0=$(cpu_ticks "$proxy"); t0=$(now)
            read -r requests p99 <<<"$(run_wrk)"
            c1=$(cpu_ticks "$proxy"); t1=$(now)
            secs=$(elapsed "$t0" "$t1")
            rates+=" $(awk -v r="$requests" -v s="$DURATION" 'BEGIN {printf "%.0f", r / s}')"
            raws+=" $(awk -v c="$((c1 - c0))" -v hz="$HZ" -v r="$requests" 'BEGIN {printf "%.2f", c / hz / r * 1e6}')"
            nets+=" $(awk -v c="$((c1 - c0))" -v hz="$HZ" -v r="$requests" -v i="$idle_rate" -v s="$secs" \
                'BEGIN {printf "%.2f", (c / hz - i * s) / r * 1e6}')"
            p99s+=" $p99"
        done
        rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$proxy/status")
        [[ $n == 1 ]] && RSS_ONE[$mode]=$rss_kb
        per_service="-"
        if [[ $n -gt 1 && -n ${RSS_ONE[$mode]:-} ]]; then
            per_service=$(awk -v r="$rss_kb" -v o="${RSS_ONE[$mode]}" -v n="$n" 'BEGIN {printf "%.1f", (r - o) / (n - 1)}')
        fi

        changes=""
        for _ in 1 2 3 4 5; do changes+=" $(canary_change)"; done
        scrapes=""; scrape_bytes=0
        [[ $n -gt $SCRAPE_MAX ]] && scrapes="-"
        for _ in $( [[ $n -gt $SCRAPE_MAX ]] || echo 1 2 3); do
            read -r secs bytes <<<"$(curl -fsS -o /dev/null -w '%{time_total} %{size_download}' "http://127.0.0.1:$ADMIN/metrics")"
            scrapes+=" $(awk -v s="$secs" 'BEGIN {printf "%.1f", s * 1000}')"; scrape_bytes=$bytes
        done

        # Traffic while the canary of s0 changes every 100 ms (bounded: DURATION * 10).
        (for _ in $(seq 1 $((DURATION * 10))); do canary_change >/dev/null; sleep 0.1; done) & changer=$!
        read -r _ p99_changing <<<"$(run_wrk)"
        wait "$changer"

        kill "$proxy"; wait "$proxy" 2>/dev/null || true
        printf '%-8s %6d | %8s %9s %9s | %8s %8s | %7.1f %8s | %8s %9s %9s | %7s %7s\n' \
            "$mode" "$n" "$(median "$rates")" "$(median "$raws")" "$(median "$nets")" \
            "$(median "$p99s")" "$p99_changing" "$(awk -v r="$rss_kb" 'BEGIN {print r / 1024}')" "$per_service" \
            "$(median "$changes")" "$(median "$scrapes")" "$(awk -v b="$scrape_bytes" 'BEGIN {printf "%.2f", b / 1048576}')" \
            "$check_s" "$started"
    done
done
