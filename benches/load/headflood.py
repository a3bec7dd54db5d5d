#!/usr/bin/env python3
# Memory under a flood of unfinished request heads (BENCHMARKS.md, "Unfinished request heads").
# Usage: python3 benches/load/headflood.py CONNECTIONS HEAD_BYTES   (after cargo build --release;
# raise `ulimit -n` above CONNECTIONS first). Loopback only; it starts and stops its own demo.
import socket, subprocess, sys, time, re, os
N = int(sys.argv[1]); SIZE = int(sys.argv[2])
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
gw = subprocess.Popen([os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "convocore-gateway"), "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
port = None
for line in gw.stdout:
    m = re.search(r"gateway\s+http://127\.0\.0\.1:(\d+)", line)
    if m: port = int(m.group(1)); break
def rss():
    for l in open(f"/proc/{gw.pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) // 1024
time.sleep(0.5)
base = rss()
head = b"GET /v3/agents/a/convos/c/export HTTP/1.1\r\nhost: gw\r\nx-padding: " + b"a" * SIZE
socks = []
for i in range(N):
    s = socket.socket(); s.setblocking(True)
    try:
        s.connect(("127.0.0.1", port)); s.settimeout(0.5)
        try: s.sendall(head)
        except Exception: pass
        socks.append(s)
    except Exception as e:
        print("connect failed at", i, e); break
time.sleep(3)
peak = rss()
alive = 0
for s in socks:
    try:
        s.setblocking(False)
        d = s.recv(1)
        if d: alive += 1
    except BlockingIOError: alive += 1
    except Exception: pass
print(f"connections {len(socks)} x {SIZE} B partial heads: VmRSS {base} MiB before, {peak} MiB with them; {alive} still open")
gw.terminate(); gw.wait()
