#!/usr/bin/env bash
# Rolling deploy through switchyard: one backend of a pool at a time, with no failed
# requests and no sleeping. A thin wrapper around `switchyard ctl roll`, which does the
# whole sequence for every backend of POOL:
#
#   1. refuse to start on a backend if no other backend of the pool is healthy and in
#      rotation (the pool is never emptied);
#   2. drain it and wait until nothing is in flight on it;
#   3. run DEPLOY_COMMAND with SWITCHYARD_POOL, SWITCHYARD_BACKEND (ADDR:PORT),
#      SWITCHYARD_BACKEND_HOST and SWITCHYARD_BACKEND_PORT set; it must return once the
#      new version has been started (or has failed to);
#   4. wait until switchyard's own health check, run after the command, passes;
#   5. put it back in rotation.
#
# The first failure stops the roll with a non-zero status: that backend stays drained
# (no traffic; the rest of the pool serves), the ones not yet reached are untouched, and
# the message says how to resume (--start-at ADDR). Ctrl-C stops after the backend in
# hand is back; a second Ctrl-C leaves it drained.
#
#   examples/rolling-deploy.sh blue 'ssh "deploy@$SWITCHYARD_BACKEND_HOST" sudo systemctl restart app'
#
# Environment: SWITCHYARD_ADMIN (admin API URL) and SWITCHYARD_TOKEN (its token), read by
# `switchyard ctl`; DRAIN_TIMEOUT (default 60s), HEALTH_TIMEOUT (default 120s),
# MAX_UNAVAILABLE (default 1).

set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 POOL DEPLOY_COMMAND" >&2
    exit 2
fi

exec "${SWITCHYARD:-switchyard}" ctl roll "$1" --exec "$2" \
    --max-unavailable "${MAX_UNAVAILABLE:-1}" \
    --drain-timeout "${DRAIN_TIMEOUT:-60s}" \
    --health-timeout "${HEALTH_TIMEOUT:-120s}"
