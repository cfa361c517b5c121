"""Clients that vanish at the worst moments: halfway through writing a buffer or a frame, while
their job runs, while their results are being read, before a single event of theirs was read.
Each time the daemon removes exactly what was theirs, the others go on, and nothing is left.
(SIGTERM and SIGKILL of the daemon itself mid-job are in test_daemon.py.)"""

import mmap
import os
import re
import socket
import struct
import subprocess
import sys
import time

import numpy as np

from conftest import PYTHON_ADAPTERS
from harness import Daemon
from test_bad_input import alloc, greeted, recv, send
from test_daemon import upload

TESTS = os.path.dirname(os.path.abspath(__file__))


def wait_until(check, timeout=10, what="the condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s" % what)


def vanish(s):
    """Closes a socket at once, unsent data dropped (RST): as a killed editor does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_a_client_vanishing_mid_upload_and_mid_frame(tmp_path):
    with Daemon(tmp_path / "rt") as d, d.client(client="other") as other:
        mine = upload(other, np.full((8, 8, 3), 9), "u8")
        s = greeted(d.socket)
        buf = alloc(s, 1500, 1000, 3, rid=2)
        path = os.path.join(d.buffers, os.path.basename(buf["path"]))
        with open(path, "r+b") as f:
            m = mmap.mmap(f.fileno(), 0)
            m[: len(m) // 2] = b"\x7f" * (len(m) // 2)  # half the pixels written
        # Then half a submit frame (its length says 200 bytes; 20 come), and gone.
        s.sendall(struct.pack("<I", 200) + b'{"type":"submit","id')
        vanish(s)
        wait_until(lambda: not os.path.exists(path), what="the vanished client's buffer to go")
        m.close()  # the editor's mapping stayed valid until it let go
        assert os.listdir(d.buffers) == [os.path.basename(mine.path)]
        (layer,) = other.submit("classic", 2, mine).wait(timeout=60)
        assert layer.buffer.layout["width"] == 16


# An editor's process, killed outright at a point it reports on stdout: the kernel closes its
# socket as a crash or `kill -9` of GIMP or Krita does.
EDITOR = r"""
import sys, time
import numpy as np
from tessera_client import Client
from test_daemon import as_array, big_job, first_progress, upload
c = Client.connect(socket=sys.argv[1], client="doomed", autostart=False)
if sys.argv[2] == "mid-job":
    _, job = big_job(c, side=3200)  # about 2 s alone
    first_progress(job)
else:
    src = upload(c, np.random.default_rng(1).integers(0, 255, (300, 200, 3)), "u8")
    (layer,) = c.submit("classic", 4, src, output_sample="u8").wait(timeout=60)
    head = np.array(as_array(layer.buffer)[:100])  # a third of the result read
print("ready", flush=True)
time.sleep(600)
"""


def killed_editor(d, stage):
    """Runs EDITOR up to `stage`, then kills it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PYTHON_ADAPTERS, TESTS]))
    p = subprocess.Popen([sys.executable, "-c", EDITOR, d.socket, stage], env=env, stdout=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if line.strip() == "ready":
                break
        else:
            raise AssertionError("the editor process ended before %s" % stage)
    finally:
        p.kill()
        p.wait()


def test_an_editor_killed_mid_job_frees_the_worker_and_leaves_nothing(tmp_path):
    with Daemon(tmp_path / "rt") as d, d.client(client="other") as other:
        mine = upload(other, np.full((8, 8, 3), 9), "u8")
        killed_editor(d, "mid-job")
        # Its big job is cancelled, not run to its end, and the same worker takes the next one.
        (layer,) = other.submit("classic", 2, mine).wait(timeout=60)
        assert layer.buffer.layout["width"] == 16
        log = d.log()
        assert re.search(r"job \d+ was cancelled", log) and log.count("job done") == 1, log
        ours = sorted(os.path.basename(p) for p in (mine.path, layer.buffer.path))
        wait_until(lambda: sorted(os.listdir(d.buffers)) == ours, what="only the other client's buffers to be left")
        assert other.list()["workers"][0]["restarts"] == 0  # cancelled, not killed


def test_an_editor_killed_while_it_reads_its_results(tmp_path):
    with Daemon(tmp_path / "rt") as d, d.client(client="other") as other:
        mine = upload(other, np.full((8, 8, 3), 9), "u8")
        killed_editor(d, "mid-read")
        wait_until(lambda: os.listdir(d.buffers) == [os.path.basename(mine.path)],
                   what="the killed editor's input and result buffers to go")
        (layer,) = other.submit("classic", 2, mine).wait(timeout=60)
        assert layer.buffer.layout["width"] == 16


def test_a_client_that_never_reads_a_reply_then_vanishes(tmp_path):
    """Events for a client that left before reading one: written into a dead socket, which
    must cost the daemon nothing (no SIGPIPE, no stuck writer)."""
    with Daemon(tmp_path / "rt") as d, d.client(client="other") as other:
        mine = upload(other, np.full((8, 8, 3), 9), "u8")
        for round_ in range(20):
            s = greeted(d.socket)
            buf = alloc(s, 64, 64, 3, rid=2)
            for i in range(5):
                send(s, {"type": "submit", "id": 10 + i, "model": "classic", "scale": 2, "input": buf["id"]})
            vanish(s)
        wait_until(lambda: os.listdir(d.buffers) == [os.path.basename(mine.path)], timeout=30,
                   what="every vanished client's buffers to go")
        (layer,) = other.submit("classic", 2, mine).wait(timeout=60)
        assert layer.buffer.layout["width"] == 16
        assert "panicked" not in d.log()

