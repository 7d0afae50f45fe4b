#!/usr/bin/env bash
# Where switchyard's CPU goes under load: perf record (DWARF call graphs) of one
# switchyard, one worker, in front of two stand-in servers while wrk loads it, then
# the share of samples by binary (kernel, switchyard, libc), by crate for switchyard's
# own code, and the top kernel and user-space symbols by self time.
#
#   benches/profile.sh                          # BIN: this tree's release build
#   BIN=/tmp/old/switchyard SECONDS_=5 benches/profile.sh
#   KEEP=/tmp/sy.perf benches/profile.sh        # keep perf.data for `perf report -i`
#
# Bounded: wrk and perf stop after SECONDS_ (default 4); every server it starts is
# stopped on exit. Everything is on 127.0.0.1.
set -euo pipefail

SECONDS_=${SECONDS_:-4}
CONNECTIONS=${CONNECTIONS:-50}
BASE_PORT=${BASE_PORT:-18400}
TOP=${TOP:-15}
cd "$(dirname "$0")/.."
source benches/common.sh
require_tools wrk perf python3
use_bin_or_release_build

UP1=$((BASE_PORT + 1)); UP2=$((BASE_PORT + 2)); SY=$((BASE_PORT + 10))
"$BIN" stand-in --listen "127.0.0.1:$UP1" --name up1 & PIDS+=($!)
"$BIN" stand-in --listen "127.0.0.1:$UP2" --name up2 & PIDS+=($!)
wait_port "$UP1"; wait_port "$UP2"
switchyard_config switchyard "$SY"
RUST_LOG=warn "$BIN" run --config "$WORK/switchyard.toml" & PIDS+=($!)
pid=$!
wait_port "$SY"
# Warm up: pooled upstream connections, allocator arenas.
wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$SY/" >/dev/null
data=${KEEP:-$WORK/perf.data}
perf record -q -F 999 --call-graph dwarf,16384 -o "$data" -p "$pid" -- sleep "$SECONDS_" 2>/dev/null &
perf_pid=$!
wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_}s" "http://127.0.0.1:$SY/" | awk '/Requests\/sec/ {print "wrk: " $2 " req/s while recording"}'
wait "$perf_pid" || true

perf report -i "$data" --no-children --sort dso,symbol -g none --stdio 2>/dev/null |
    BIN_NAME=$(basename "$BIN") TOP="$TOP" python3 -c '
import collections, os, re, sys
by_dso, by_crate, top = collections.Counter(), collections.Counter(), []
for line in sys.stdin:
    m = re.match(r"\s+([0-9.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$", line)
    if not m:
        continue
    share, dso, kind, symbol = float(m.group(1)), m.group(2), m.group(3), m.group(4)
    dso = "kernel" if kind == "k" else dso
    by_dso[dso] += share
    if dso == os.environ["BIN_NAME"]:
        by_crate[re.split(r"::|<| ", symbol.lstrip("<"))[0]] += share
    top.append((share, dso, symbol))
print("samples by binary:")
for dso, share in by_dso.most_common(6):
    print(f"  {share:6.2f}%  {dso}")
print("switchyard binary, by crate:")
for crate, share in by_crate.most_common(10):
    print(f"  {share:6.2f}%  {crate}")
for title, pick in (("kernel", lambda d: d == "kernel"), ("user space", lambda d: d != "kernel")):
    print(f"top {title} symbols (self time):")
    for share, dso, symbol in [t for t in top if pick(t[1])][: int(os.environ["TOP"])]:
        print(f"  {share:6.2f}%  {dso[:14]:14s} {symbol[:110]}")
'
