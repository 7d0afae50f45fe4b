# Shared by the load scripts: process cleanup, port waits, unit conversion, medians.
# Source it after `cd` to the repo root; it sets WORK (a temporary directory) and PIDS.

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2; exit 1
}

# wrk and h2load latency figures come as 1.23us / 4.56ms / 1.2s; print them in ms.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000;
        printf "%.3f", n }'
}

# CPU ticks (utime + stime) of process $1 and its children: nginx's master and worker.
tree_cpu_ticks() {
    local total=0 pid ticks
    for pid in "$1" $(pgrep -P "$1" || true); do
        ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + ticks))
    done
    echo "$total"
}

# Resident memory in KB of process $1 and its children.
tree_rss_kb() {
    local total=0 pid kb
    for pid in "$1" $(pgrep -P "$1" || true); do
        kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# nginx wants writable temp paths even when nothing is buffered to disk.
nginx_temp_paths() {
    local dir=$1
    cat <<EOF
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
EOF
}

# Writes $WORK/$1.toml: switchyard on 127.0.0.1:$2 (admin on $2 + 1) in front of UP1
# and UP2, WORKERS workers (default 1); $3: more lines for the [proxy] table.
switchyard_config() {
    local name=$1 port=$2 proxy_lines=${3:-}
    cat >"$WORK/$name.toml" <<EOT
[proxy]
listen = "127.0.0.1:$port"
workers = ${WORKERS:-1}
$proxy_lines
[admin]
listen = "127.0.0.1:$((port + 1))"
[state]
path = "$WORK/$name.state.json"
[pools.app]
backends = ["127.0.0.1:$UP1", "127.0.0.1:$UP2"]
[services.app]
active = "app"
EOT
}

# nginx in front of UP1 and UP2 on 127.0.0.1:$1, WORKERS workers (default 1). $2: more lines for the
# server block (after `listen 127.0.0.1:$1`, so `$2` may start with " ssl http2;").
# $3: more lines for the location. NGINX_NAME (default nginx) names its config and
# directory under WORK, so several can run; NGINX_BALANCE (e.g. "least_conn;") goes
# into the upstream block (default: nginx's round robin). NGINX_MAIN: more lines for the
# main context; NGINX_WRAP: a command nginx runs under (e.g. valgrind).
start_nginx() {
    local port=$1 server_lines=$2 location_lines=$3 name=${NGINX_NAME:-nginx}
    mkdir -p "$WORK/$name"
    cat >"$WORK/$name.conf" <<EOF
worker_processes ${WORKERS:-1};
daemon off;
${NGINX_MAIN:-}
pid $WORK/$name/nginx.pid;
error_log $WORK/$name/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    # The default (1000) closes each connection after 1000 requests: clients have to
    # reconnect (h2load counts failures); the other proxies have no such limit.
    keepalive_requests 1000000;
$(nginx_temp_paths "$WORK/$name")
    upstream app {
        ${NGINX_BALANCE:-}
        server 127.0.0.1:$UP1;
        server 127.0.0.1:$UP2;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$port$server_lines
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
$location_lines
        }
    }
}
EOF
    ${NGINX_WRAP:-} nginx -c "$WORK/$name.conf" -p "$WORK/$name" & PIDS+=($!)
    wait_port "$port"
}

# HAProxy in front of UP1 and UP2 on 127.0.0.1:$1, WORKERS threads (default 1). $2: more `bind`
# options; $3: more frontend lines. HAPROXY_BALANCE: its balancer (default leastconn);
# HAPROXY_NAME (default haproxy) names its config under WORK.
start_haproxy() {
    local port=$1 bind_options=$2 frontend_lines=$3 name=${HAPROXY_NAME:-haproxy}
    cat >"$WORK/$name.cfg" <<HAPROXY
global
    nbthread ${WORKERS:-1}
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
frontend fe
    bind 127.0.0.1:$port $bind_options
    option forwardfor
$frontend_lines
    default_backend app
backend app
    balance ${HAPROXY_BALANCE:-leastconn}
    server up1 127.0.0.1:$UP1
    server up2 127.0.0.1:$UP2
HAPROXY
    haproxy -f "$WORK/$name.cfg" -db & PIDS+=($!)
    wait_port "$port"
}

# Exits unless each named tool is installed; TOOLS_HINT, if set, says how to get them.
require_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null ||
            { echo "$tool is not installed${TOOLS_HINT:+ ($TOOLS_HINT)}" >&2; exit 1; }
    done
}

# BIN: the switchyard build to measure; unset, this tree's release build, built now.
use_bin_or_release_build() {
    if [[ -z "${BIN:-}" ]]; then
        cargo build --release --quiet
        BIN=target/release/switchyard
    fi
}
