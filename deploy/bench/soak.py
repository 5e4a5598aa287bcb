#!/usr/bin/env python3
"""The soak: concurrent sessions doing turns for a long time, sampling each process's resident
memory (RSS), to show whether anything grows.

It starts `mm up` (the muse, the majordomo and the orchestrator as child processes) on free
ports, then runs `--sessions` workers against the HTTP API. Each worker holds a session for
`--turns` turns (its transcript grows, as in real use), then starts a new one, until
`--minutes` have passed. Every `--every` seconds it reads VmRSS of the three services from
/proc and prints a line; at the end one JSON document with the whole curve.

    python3 deploy/bench/soak.py [--minutes 30] [--sessions 8] [--turns 6] [--every 60]

Standard library only. Needs `cargo build --release` first (it runs target/release/mm).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

PROMPTS = [
    "Write a haiku about the sea.",
    "Describe a lighthouse at dawn in two sentences.",
    "Tell me a very short story about a lost key.",
    "What does the wind say to the mountains?",
    "Write two lines about autumn rain.",
    "Describe the smell of an old library.",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(parent):
    """The services `mm up` started: name -> pid."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent:
            found[os.path.basename(argv[0].decode())] = int(pid)
    return found


def chat(base, session, text):
    body = {"model": "", "messages": [{"role": "user", "content": text}], "max_tokens": 48}
    headers = {"content-type": "application/json"}
    if session:
        headers["x-session-id"] = session
    req = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                                 headers)
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.headers.get("x-session-id"), json.load(r)


def worker(base, turns, stop, counts, errors, n):
    i = n
    while not stop.is_set():
        session = None
        for _ in range(turns):
            if stop.is_set():
                return
            try:
                session, _ = chat(base, session, PROMPTS[i % len(PROMPTS)])
                counts[n] += 1
            except Exception as e:  # a failed turn is counted and reported, not fatal
                errors.append(str(e)[:200])
                time.sleep(1)
            i += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6, help="turns per session before a new one")
    ap.add_argument("--every", type=float, default=60, help="seconds between RSS samples")
    ap.add_argument("--mm", default="target/release/mm")
    a = ap.parse_args()

    store = tempfile.mkdtemp(prefix="mm-soak-")
    http = f"127.0.0.1:{free_port()}"
    up = subprocess.Popen([a.mm, "up", "--listen", f"127.0.0.1:{free_port()}", "--http", http,
                           "--store", f"{store}/sessions.redb"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    try:
        # `mm up` prints the orchestrator's address on stdout once everything is up.
        if not up.stdout.readline():
            sys.exit("mm up ended before it was ready")
        procs = children(up.pid)
        base = f"http://{http}"
        stop, counts, errors = threading.Event(), [0] * a.sessions, []
        threads = [threading.Thread(target=worker, args=(base, a.turns, stop, counts, errors, n))
                   for n in range(a.sessions)]
        for t in threads:
            t.start()
        curve, t0 = [], time.time()
        while True:
            sample = {"minute": round((time.time() - t0) / 60, 2), "turns": sum(counts),
                      "errors": len(errors)}
            sample.update({name: round(rss_mib(pid), 1) for name, pid in procs.items()})
            curve.append(sample)
            print(json.dumps(sample), flush=True)
            if time.time() - t0 >= a.minutes * 60:
                break
            time.sleep(min(a.every, max(0.0, a.minutes * 60 - (time.time() - t0))))
        stop.set()
        for t in threads:
            t.join()
        print(json.dumps({"sessions": a.sessions, "turns_per_session": a.turns,
                          "minutes": a.minutes, "turns": sum(counts), "errors": errors[:5],
                          "curve": curve}))
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=30)


if __name__ == "__main__":
    main()
