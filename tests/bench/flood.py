"""How long a polite client's small job takes while another client floods the daemon.

    cargo build --workspace && python3 tests/bench/flood.py [--jobs 200]

A polite client runs small classic jobs (64² → 128²) one after another and times each, from
submit to result; alone, then while a second client sends 10 000 requests and reads nothing:
`alloc` (the daemon refuses past --max-client-buffers and drops the client once 4096 replies
lie unread), then `submit` of a small job (refused past --max-client-jobs). Prints p50, p99
and max of the polite client's latency, and what became of the flooder."""

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "adapters", "python"))

from harness import Daemon  # noqa: E402
from test_bad_input import greeted, recv, send  # noqa: E402
from test_daemon import upload  # noqa: E402


def polite_latencies(client, buf, jobs):
    out = []
    for _ in range(jobs):
        t = time.perf_counter()
        (layer,) = client.submit("classic", 2, buf).wait(timeout=120)
        out.append(time.perf_counter() - t)
        client.release(layer.buffer)
    return np.array(out) * 1000


def flood(path, kind, n, report):
    s = greeted(path)
    if kind == "submit":
        # One small input of its own, then n submits of it.
        send(s, {"type": "alloc", "id": 2, "layout": {"width": 8, "height": 8, "channels": 3, "sample": "u8"}})
        own = recv(s)["buffer"]["id"]
    sent = 0
    try:
        for i in range(n):
            if kind == "alloc":
                send(s, {"type": "alloc", "id": 10 + i, "layout": {"width": 4, "height": 4, "channels": 3, "sample": "u8"}})
            else:
                send(s, {"type": "submit", "id": 10 + i, "model": "classic", "scale": 2, "input": own})
            sent += 1
    except OSError as e:
        report["dropped"] = "dropped after %d requests (%s)" % (sent, type(e).__name__)
    report.setdefault("dropped", "sent all %d" % sent)
    report["socket"] = s


def row(name, ms):
    return "| %s | %.1f | %.1f | %.1f |" % (name, np.percentile(ms, 50), np.percentile(ms, 99), ms.max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Daemon(os.path.join(tmp, "rt")) as d, d.client(client="polite") as c:
        buf = upload(c, np.random.default_rng(0).integers(0, 255, (64, 64, 3)), "u8")
        polite_latencies(c, buf, 10)  # warm up
        rows = [row("alone", polite_latencies(c, buf, args.jobs))]
        notes = []
        for kind in ("alloc", "submit"):
            report = {}
            t = threading.Thread(target=flood, args=(d.socket, kind, 10000, report))
            t.start()
            ms = polite_latencies(c, buf, args.jobs)
            t.join()
            rows.append(row("while another client sends 10 000 `%s` and reads nothing" % kind, ms))
            notes.append("%s flood: the flooder was %s" % (kind, report["dropped"]))
            report["socket"].close()
        print("polite client, classic 64² → 128², %d jobs each" % args.jobs)
        print("| | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|")
        print("\n".join(rows))
        print("\n".join(notes))
        unread = d.log().count("events unread")
        print("daemon log: %d client(s) disconnected for unread events" % unread)


if __name__ == "__main__":
    main()
