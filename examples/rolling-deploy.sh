#!/usr/bin/env bash
# Rolling deploy through switchyard: one backend of a pool at a time, with no failed
# requests and no sleeping.
#
#   examples/rolling-deploy.sh POOL -- DEPLOY_COMMAND [ARGS...]
#
# For every backend of POOL, in the order `switchyard ctl status` lists them:
#
#   1. drain it and wait until nothing is in flight on it (ctl drain --wait);
#   2. run DEPLOY_COMMAND with the backend's address in $BACKEND (and the pool's name
#      in $POOL). This script does not know how to deploy: that is your command, e.g.
#        examples/rolling-deploy.sh blue -- sh -c 'ssh "deploy@${BACKEND%:*}" sudo systemctl restart app'
#      It must return once the new version has been started (or has failed to);
#   3. poll http://$BACKEND$HEALTH_PATH directly until it answers 2xx;
#   4. wait until switchyard's own health check reports the backend `healthy`;
#   5. put it back in rotation (ctl enable).
#
# Any failure stops the script with a non-zero status and leaves the backend it was
# working on drained: it takes no traffic, the rest of the pool keeps serving, and the
# message says how to put it back. Backends an operator has `disabled` are skipped.
# Before draining a backend the script checks that another backend of the pool is in
# rotation and healthy, so it never empties a pool (ALLOW_EMPTY=1 overrides that, for
# a one-backend standby pool that takes no traffic).
#
# Environment:
#   SWITCHYARD        path to the switchyard binary       (default: `switchyard` on PATH)
#   SWITCHYARD_ADMIN  admin API URL, read by `switchyard ctl` (default http://127.0.0.1:9901)
#   SWITCHYARD_TOKEN  admin API token, read by `switchyard ctl` (never put on a command line)
#   HEALTH_PATH       the app's health path on each backend (default /health)
#   HEALTH_TIMEOUT    how long to wait for a backend to turn healthy (default 60s;
#                     a whole number of seconds, or with s/m: 90, 90s, 2m)
#   DRAIN_TIMEOUT     how long to wait for in-flight requests to finish (default 60s)
#   ALLOW_EMPTY       1: drain even when no other backend of the pool is healthy
#
# Needs bash, curl, and jq (preferred) or python3.

set -euo pipefail

usage() {
    echo "usage: $0 POOL -- DEPLOY_COMMAND [ARGS...]" >&2
    echo "  DEPLOY_COMMAND runs once per backend of POOL, with the address in \$BACKEND" >&2
    exit 2
}

[[ $# -ge 3 && $2 == "--" ]] || usage
POOL=$1
shift 2
DEPLOY=("$@")

SWITCHYARD=${SWITCHYARD:-switchyard}
HEALTH_PATH=${HEALTH_PATH:-/health}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-60s}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-60s}
ALLOW_EMPTY=${ALLOW_EMPTY:-0}

START=$SECONDS
log() { printf '[%4ds] %s\n' "$((SECONDS - START))" "$*"; }
die() {
    printf '[%4ds] ERROR: %s\n' "$((SECONDS - START))" "$*" >&2
    exit 1
}

# "90", "90s", "2m" -> seconds.
to_seconds() {
    case $1 in
        *[!0-9sm]* | "") return 1 ;;
        *m) [[ ${1%m} =~ ^[0-9]+$ ]] && echo $((${1%m} * 60)) ;;
        *s) [[ ${1%s} =~ ^[0-9]+$ ]] && echo "${1%s}" ;;
        *) [[ $1 =~ ^[0-9]+$ ]] && echo "$1" ;;
    esac
}
health_secs=$(to_seconds "$HEALTH_TIMEOUT") ||
    die "HEALTH_TIMEOUT=$HEALTH_TIMEOUT: use whole seconds, e.g. 60, 60s or 2m"
[[ $HEALTH_PATH == /* ]] || die "HEALTH_PATH=$HEALTH_PATH must start with /"

command -v "$SWITCHYARD" >/dev/null 2>&1 ||
    die "switchyard binary \`$SWITCHYARD\` not found (set SWITCHYARD=/path/to/switchyard)"
command -v curl >/dev/null 2>&1 || die "curl is required"
if command -v jq >/dev/null 2>&1; then
    JSON=jq
elif command -v python3 >/dev/null 2>&1; then
    JSON=python3
else
    die "jq or python3 is required to read \`switchyard ctl --json status\`"
fi

ctl() { "$SWITCHYARD" ctl "$@"; }

# One line per backend of $POOL: "ADDR STATE HEALTH". Fails if the pool does not exist.
pool_backends() {
    local status
    status=$(ctl --json status) || return 1
    if [[ $JSON == jq ]]; then
        jq -er --arg pool "$POOL" '
            [.pools[] | select(.name == $pool)] | if length == 0 then error("no pool") else .[0] end
            | .backends[] | "\(.addr) \(.state) \(.health)"' <<<"$status" 2>/dev/null
    else
        python3 -c '
import json, sys
pools = [p for p in json.load(sys.stdin)["pools"] if p["name"] == sys.argv[1]]
if not pools:
    sys.exit(1)
for b in pools[0]["backends"]:
    print(b["addr"], b["state"], b["health"])
' "$POOL" <<<"$status"
    fi
}

# "STATE HEALTH" of backend $1 of $POOL, or nothing if it is no longer in the pool.
backend_status() {
    local listing
    listing=$(pool_backends) || return 1
    awk -v me="$1" '$1 == me { print $2, $3 }' <<<"$listing"
}

# How many backends of $POOL other than $1 are in rotation and healthy.
healthy_others() {
    local listing
    listing=$(pool_backends) || return 1
    awk -v me="$1" '$1 != me && $2 == "active" && $3 == "healthy"' <<<"$listing" | wc -l
}

# The backend being worked on; on a failure exit the trap says it is left drained.
CURRENT=""
on_exit() {
    local code=$?
    if [[ $code -ne 0 && -n $CURRENT ]]; then
        echo >&2
        echo "$POOL $CURRENT is left DRAINED (no traffic goes to it; the rest of the pool serves)." >&2
        echo "Fix it, then put it back with:  $SWITCHYARD ctl enable $POOL $CURRENT" >&2
        echo "or run this script again: it starts over with the first backend." >&2
    fi
}
trap on_exit EXIT

listing=$(pool_backends) || die "cannot read pool \`$POOL\` from \`$SWITCHYARD ctl --json status\` (wrong pool name, SWITCHYARD_ADMIN or SWITCHYARD_TOKEN?)"
mapfile -t lines <<<"$listing"
total=${#lines[@]}
log "rolling deploy of pool $POOL: $total backends; deploy command: ${DEPLOY[*]}"

n=0
for line in "${lines[@]}"; do
    read -r addr state _ <<<"$line"
    n=$((n + 1))
    if [[ $state == disabled ]]; then
        log "($n/$total) $addr is disabled by an operator: skipped"
        continue
    fi

    # Never empty the pool: another backend must be in rotation and healthy.
    if [[ $ALLOW_EMPTY != 1 ]]; then
        others=$(healthy_others "$addr") || die "cannot read pool $POOL from switchyard"
        [[ $others -gt 0 ]] ||
            die "($n/$total) no other backend of $POOL is active and healthy: draining $addr would leave the pool nothing to serve with (ALLOW_EMPTY=1 to do it anyway)"
    fi

    log "($n/$total) $addr: draining (waiting up to $DRAIN_TIMEOUT for in-flight requests)"
    CURRENT=$addr
    ctl drain "$POOL" "$addr" --wait --timeout "$DRAIN_TIMEOUT" >/dev/null ||
        die "($n/$total) $addr: drain failed (error above; 408 means requests were still in flight after DRAIN_TIMEOUT=$DRAIN_TIMEOUT)"
    log "($n/$total) $addr: drained, nothing in flight"

    log "($n/$total) $addr: deploying: ${DEPLOY[*]}"
    deploy_start=$SECONDS
    if ! BACKEND=$addr POOL=$POOL "${DEPLOY[@]}"; then
        die "($n/$total) $addr: the deploy command failed"
    fi
    log "($n/$total) $addr: deploy command done in $((SECONDS - deploy_start))s"

    log "($n/$total) $addr: checking http://$addr$HEALTH_PATH directly (up to ${health_secs}s)"
    deadline=$((SECONDS + health_secs))
    while :; do
        code=$(curl -gsS --max-time 2 -o /dev/null -w '%{http_code}' "http://$addr$HEALTH_PATH" 2>/dev/null) || true
        [[ $code == 2[0-9][0-9] ]] && break
        [[ $code == 000 ]] && code="no answer"
        [[ $SECONDS -lt $deadline ]] ||
            die "($n/$total) $addr: $HEALTH_PATH did not answer 2xx within $HEALTH_TIMEOUT (last answer: $code)"
        sleep 1
    done
    log "($n/$total) $addr: $HEALTH_PATH answers 2xx"

    log "($n/$total) $addr: waiting for switchyard's health check to report it healthy"
    while :; do
        now=$(backend_status "$addr") || die "($n/$total) cannot read pool $POOL from switchyard"
        [[ -n $now ]] || die "($n/$total) $addr is no longer a backend of $POOL"
        read -r _ now_health <<<"$now"
        [[ $now_health == healthy ]] && break
        [[ $SECONDS -lt $deadline ]] ||
            die "($n/$total) $addr: switchyard still reports it $now_health after $HEALTH_TIMEOUT (check [pools.$POOL.health] and that switchyard can reach $addr)"
        sleep 0.5
    done

    ctl enable "$POOL" "$addr" >/dev/null || die "($n/$total) $addr: enable failed"
    CURRENT=""
    log "($n/$total) $addr: healthy and back in rotation"
done

log "rolling deploy of pool $POOL done: $n backends"
ctl status
