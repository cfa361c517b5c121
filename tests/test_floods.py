"""Per-connection caps and floods: a client that asks for too much is refused, one that floods
and never reads is dropped, alone; the others are served all along. (How long the polite
client waits during a flood is measured by tests/bench/flood.py, not here.)"""

import os
import socket
import threading
import time

import numpy as np
import pytest
from tessera_client import TesseraError

from harness import Daemon
from test_bad_input import greeted, recv, send
from test_daemon import first_progress, upload


def test_buffer_and_job_caps_name_the_limit(tmp_path):
    with Daemon(tmp_path / "rt", ["--max-client-buffers", "6", "--max-client-jobs", "2"]) as d:
        s = greeted(d.socket)
        for i in range(6):
            send(s, {"type": "alloc", "id": 10 + i, "layout": {"width": 4, "height": 4, "channels": 3, "sample": "u8"}})
            assert recv(s)["type"] == "allocated"
        send(s, {"type": "alloc", "id": 20, "layout": {"width": 4, "height": 4, "channels": 3, "sample": "u8"}})
        ev = recv(s)
        assert ev["code"] == "limit_exceeded" and "limit of 6" in ev["message"], ev
        s.close()

        with d.client() as c:
            # A long job runs, a second waits; a third is one too many, and nothing of it is made.
            src = upload(c, np.zeros((2400, 2400, 3)), "u8")
            running = c.submit("classic", 4, src, output_sample="u8")
            first_progress(running)
            small = upload(c, np.zeros((4, 4, 3)), "u8")
            waiting = c.submit("classic", 2, small)
            before = set(os.listdir(d.buffers))
            with pytest.raises(TesseraError) as e:
                c.submit("classic", 2, small)
            assert e.value.code == "limit_exceeded" and "2 jobs queued or running" in e.value.message
            assert set(os.listdir(d.buffers)) == before
            c.cancel(running)
            waiting.wait(timeout=60)
            # Under the cap again: accepted.
            (layer,) = c.submit("classic", 2, small).wait(timeout=60)
            assert layer.buffer.layout["width"] == 8


def test_a_client_that_floods_and_never_reads_is_dropped_alone(tmp_path):
    with Daemon(tmp_path / "rt") as d, d.client(client="polite") as polite:
        mine = upload(polite, np.full((16, 16, 3), 7), "u8")
        flooder = greeted(d.socket)
        flooder.settimeout(60)
        served = []

        def keep_working():
            while len(served) < 20:
                (layer,) = polite.submit("classic", 2, mine).wait(timeout=60)
                served.append(layer.buffer.layout["width"])
                polite.release(layer.buffer)

        worker = threading.Thread(target=keep_working)
        worker.start()
        request = b""
        sent = 0
        try:
            for i in range(10000):
                send(flooder, {"type": "alloc", "id": 100 + i, "layout": {"width": 4, "height": 4, "channels": 3, "sample": "u8"}})
                sent += 1
        except OSError:
            pass  # dropped while still sending
        worker.join(timeout=120)
        assert served == [32] * 20
        # The flooder read nothing: past 4096 unread replies it was disconnected, and what it
        # had allocated is gone.
        deadline = time.time() + 30
        while "left 4096 events unread" not in d.log() and time.time() < deadline:
            time.sleep(0.1)
        assert "left 4096 events unread" in d.log(), d.log()[-2000:]
        got, closed = 0, False
        try:
            while True:
                ev = recv(flooder)
                got += 1
                assert ev["type"] in ("allocated", "error"), ev
                if ev["type"] == "error":
                    assert ev["code"] == "limit_exceeded"
        except (EOFError, ConnectionResetError, socket.timeout):
            closed = True
        assert closed and got < sent
        flooder.close()
        deadline = time.time() + 10
        while len(os.listdir(d.buffers)) > 1 and time.time() < deadline:
            time.sleep(0.05)
        assert os.listdir(d.buffers) == [os.path.basename(mine.path)]
        assert polite.ping()["type"] == "pong"


def test_one_clients_many_jobs_do_not_hold_back_anothers_one(tmp_path):
    """Jobs start in turn across clients (the oldest job of the client served longest ago),
    not first come first served: a client's single job waits for one of a busy client's, not
    for all of them."""
    with Daemon(tmp_path / "rt") as d, d.client(client="busy") as busy, d.client(client="polite") as polite:
        big = upload(busy, np.zeros((1200, 1200, 3)), "u8")
        jobs = [busy.submit("classic", 2, big, output_sample="u8") for _ in range(12)]
        first_progress(jobs[0])
        small = upload(polite, np.zeros((8, 8, 3)), "u8")
        polite.submit("classic", 2, small).wait(timeout=120)
        # Most of the busy client's jobs are still waiting when the polite one is done.
        assert busy.list()["workers"][0]["queued"] >= 8
        for job in jobs:
            job.wait(timeout=300)
