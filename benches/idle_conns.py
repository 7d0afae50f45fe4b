#!/usr/bin/env python3
"""Opens N keep-alive connections to 127.0.0.1:PORT, sends one GET on each and reads
its answer, then holds them all idle until stdin closes or a line arrives; prints
"ready" once every connection has had its answer. With PACE_MS, waits that long after
each answer before opening the next (clients arriving over time rather than at once).
Used by benches/load.sh to measure what an idle keep-alive connection costs a proxy.

    idle_conns.py PORT N [PACE_MS]"""
import socket
import sys
import time

port, count = int(sys.argv[1]), int(sys.argv[2])
pace = float(sys.argv[3]) / 1000 if len(sys.argv) > 3 else 0.0
conns = []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: idle.example\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"connection closed before an answer ({len(conns)} open)")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        sys.exit(f"unexpected answer: {head[:40]!r}")
    conns.append(s)
    if pace:
        time.sleep(pace)
print("ready", flush=True)
sys.stdin.readline()
for s in conns:
    s.close()
