"""tesserad end to end: the real daemon, driven by the real Python client.

Two clients at once, a 4000×3000 job through shared memory, parity of the classic engine with
Pillow, cancel, a worker killed mid-job, SIGTERM clean-up, and the buffer lifecycle.
"""

import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from harness import Daemon
from tessera_client import TesseraError

DTYPES = {"u8": np.uint8, "u16": np.uint16, "f16": np.float16, "f32": np.float32}


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "rt")
    yield d
    d.stop()


def as_array(buf):
    """A buffer's pixels as an (h, w, c) array view (tight layouts only)."""
    lay = buf.layout
    arr = np.frombuffer(buf.view, dtype=DTYPES[lay["sample"]], count=lay["width"] * lay["height"] * lay["channels"])
    return arr.reshape(lay["height"], lay["width"], lay["channels"])


def upload(client, pixels, sample, alpha=None, encoding="srgb"):
    h, w, c = pixels.shape
    buf = client.alloc(w, h, c, sample=sample, alpha=alpha, encoding=encoding)
    as_array(buf)[...] = pixels.astype(DTYPES[sample])
    return buf


def pillow_float(plane, size, filt):
    """Pillow's resampling of one f32 plane (mode F: double-precision coefficients)."""
    return np.asarray(Image.fromarray(plane.astype(np.float32)).resize(size, filt), dtype=np.float64)


FILTERS = {"bicubic": Image.Resampling.BICUBIC, "lanczos3": Image.Resampling.LANCZOS}


@pytest.mark.parametrize("filt", ["bicubic", "lanczos3"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_classic_matches_pillow_in_float(daemon, filt, scale):
    rng = np.random.default_rng(scale)
    src = rng.random((23, 37, 3)).astype(np.float32)
    with daemon.client() as c:
        buf = upload(c, src, "f32")
        (layer,) = c.submit("classic", scale, buf, params={"filter": filt}).wait(timeout=60)
        assert layer.role == "base" and layer.blend == "normal" and layer.offset == 0
        out = as_array(layer.buffer).astype(np.float64)
        assert out.shape == (23 * scale, 37 * scale, 3)
        for ch in range(3):
            ref = pillow_float(src[:, :, ch], (37 * scale, 23 * scale), FILTERS[filt])
            assert np.abs(out[:, :, ch] - ref).max() <= 1e-5


def test_alpha_is_resampled_apart_with_premultiplied_colour(daemon):
    rng = np.random.default_rng(7)
    src = rng.random((19, 29, 4)).astype(np.float32)
    src[:, :10, 3] = 0.0  # a transparent stripe whose colour must not bleed
    with daemon.client() as c:
        buf = upload(c, src, "f32")
        (layer,) = c.submit("classic", 2, buf, params={"filter": "bicubic"}).wait(timeout=60)
        out = as_array(layer.buffer).astype(np.float64)
    size = (58, 38)
    alpha = np.clip(pillow_float(src[:, :, 3], size, FILTERS["bicubic"]), 0, 1)
    assert np.abs(out[:, :, 3] - alpha).max() <= 1e-5
    for ch in range(3):
        premul = pillow_float(src[:, :, ch] * src[:, :, 3], size, FILTERS["bicubic"])
        with np.errstate(divide="ignore", invalid="ignore"):
            ref = np.where(alpha > 1 / 65536, np.clip(premul / alpha, 0, 1), 0.0)
        assert np.abs(out[:, :, ch] - ref).max() <= 1e-4


@pytest.mark.parametrize("sample", ["u8", "u16", "f16"])
def test_every_sample_type_in_and_out(daemon, sample):
    rng = np.random.default_rng(3)
    top = {"u8": 255, "u16": 65535}.get(sample, 1.0)
    src = rng.random((16, 24, 2)) * top
    with daemon.client() as c:
        buf = upload(c, src, sample)
        (layer,) = c.submit("classic", 1, buf, output_sample=sample).wait(timeout=60)
        # ×1 is an exact copy, in any sample type.
        assert np.array_equal(as_array(layer.buffer), as_array(buf))


def test_two_clients_and_a_4000x3000_job(daemon):
    """A 4000×3000 RGB ×2 job through shared memory while a second client keeps working."""
    rng = np.random.default_rng(1)
    h, w = 3000, 4000
    yy, xx = np.mgrid[0:h, 0:w]
    src = ((np.sin(xx / 37.0) * np.cos(yy / 23.0) + 1) * 110 + rng.integers(0, 30, (h, w))).astype(np.uint8)
    src = np.stack([src, src[::-1], src[:, ::-1]], axis=-1)
    other_results = []

    def second_client():
        with daemon.client(client="second") as c2:
            for _ in range(5):
                c2.ping()
                small = upload(c2, rng.random((8, 8, 3)), "f32")
                other_results.append(c2.submit("classic", 2, small).wait(timeout=120)[0].buffer.layout["width"])

    with daemon.client(client="first") as c1:
        buf = upload(c1, src, "u8")
        job = c1.submit("classic", 2, buf, output_sample="u8")
        t = threading.Thread(target=second_client)
        t.start()
        progress = []
        (layer,) = job.wait(progress=progress.append, timeout=300)
        t.join(120)
        assert other_results == [16] * 5
        assert len(progress) >= 2 and progress[-1]["done"] == progress[-1]["total"]
        out = as_array(layer.buffer)
        assert out.shape == (6000, 8000, 3)
        # Reference: Pillow's float path, rounded once (its 8-bit path rounds and clips
        # between the two passes, which we deliberately do not).
        for ch in range(3):
            ref = pillow_float(src[:, :, ch], (8000, 6000), FILTERS["lanczos3"])
            ref = np.clip(np.floor(ref + 0.5), 0, 255)
            assert np.abs(out[:, :, ch].astype(int) - ref.astype(int)).max() <= 1
        c1.release(layer)
        c1.release(buf)


def big_job(client, side=2400):
    """A job that runs long enough (tens of bands) to be interrupted."""
    src = np.random.default_rng(5).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = upload(client, src, "u8")
    return buf, client.submit("classic", 4, buf, output_sample="u8")


def wait_for_new_worker(c, old_pid, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        w = c.list()["workers"][0]
        if w["pid"] not in (None, old_pid) and w["state"] == "idle":
            return w
        time.sleep(0.05)
    raise AssertionError("no new worker replaced %d" % old_pid)


def first_progress(job, timeout=60):
    for ev in job.events(timeout=timeout):
        if ev["type"] == "progress" and ev["done"] >= 1:
            return ev
    raise AssertionError("the job finished before it could be interrupted")


def test_cancel_running_and_queued_jobs(daemon):
    with daemon.client() as c:
        buf, running = big_job(c)
        small = upload(c, np.zeros((4, 4, 3)), "f32")
        queued = c.submit("classic", 2, small)
        assert queued.position == 1
        queued.cancel()
        with pytest.raises(TesseraError) as e:
            queued.wait(timeout=10)
        assert e.value.code == "cancelled"

        ev = first_progress(running)
        assert ev["done"] < ev["total"]
        t0 = time.monotonic()
        running.cancel()
        with pytest.raises(TesseraError) as e:
            running.wait(timeout=30)
        assert e.value.code == "cancelled"
        # Stops within one band (a few hundred ms here), not at the end of the job.
        assert time.monotonic() - t0 < 5
        with pytest.raises(TesseraError) as e:
            running.cancel()
        assert e.value.code == "unknown_job"
        # The cancelled jobs' outputs are gone; the input stays usable.
        assert sorted(os.listdir(daemon.buffers)) == sorted(
            os.path.basename(b.path) for b in (buf, small))
        (layer,) = c.submit("classic", 2, small).wait(timeout=30)
        assert layer.buffer.layout["width"] == 8


def test_killed_worker_fails_its_job_and_is_restarted(daemon):
    with daemon.client(client="bystander") as other, daemon.client(client="victim") as c:
        worker = c.list()["workers"][0]
        assert worker["state"] == "idle" and worker["restarts"] == 0
        buf, job = big_job(c)
        first_progress(job)
        os.kill(worker["pid"], signal.SIGKILL)
        with pytest.raises(TesseraError) as e:
            job.wait(timeout=30)
        assert e.value.code == "worker_crashed"
        assert "died" in e.value.message and "signal 9" in e.value.message
        # No client was disconnected, a new worker took over, and the next job succeeds.
        other.ping()
        w = wait_for_new_worker(c, worker["pid"], timeout=10)
        assert w["restarts"] == 1
        (layer,) = c.submit("classic", 2, buf, output_sample="u8").wait(timeout=120)
        assert layer.buffer.layout["width"] == 4800


def test_disconnect_deletes_the_clients_buffers_only(daemon):
    with daemon.client() as keeper:
        kept = keeper.alloc(8, 8, 3)
        c = daemon.client()
        gone = c.alloc(8, 8, 3)
        assert os.path.exists(gone.path)
        c.close()
        deadline = time.time() + 5
        while os.path.exists(gone.path) and time.time() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(gone.path)
        assert os.path.exists(kept.path)
        keeper.ping()


def test_buffers_are_private(daemon):
    with daemon.client() as c:
        buf = c.alloc(4, 4, 1, sample="u8")
        assert os.stat(daemon.runtime).st_mode & 0o777 == 0o700
        assert os.stat(daemon.buffers).st_mode & 0o777 == 0o700
        assert os.stat(daemon.socket).st_mode & 0o777 == 0o600
        assert os.stat(buf.path).st_mode & 0o777 == 0o600


def test_sigterm_cancels_jobs_and_removes_socket_and_buffers(tmp_path):
    d = Daemon(tmp_path / "rt")
    c = d.client()
    buf, job = big_job(c)
    first_progress(job)
    assert d.stop(signal.SIGTERM) == 0
    with pytest.raises(TesseraError) as e:
        job.wait(timeout=10)
    assert e.value.code in ("shutting_down", "disconnected")
    assert not os.path.exists(d.socket)
    assert not os.path.exists(d.buffers)
    c.close()


def test_after_sigkill_the_next_daemon_removes_what_was_left_and_says_so(tmp_path, pisa_store):
    """A daemon killed outright leaves its socket, its buffers and the inputs of the jobs it kept
    for exact renders; the next one removes them all before it serves, and logs each."""
    rt, env = tmp_path / "rt", {"TESSERA_MODEL_DIR": str(pisa_store)}
    first = Daemon(rt, env=env)
    with first.client() as c:
        src = upload(c, np.full((8, 8, 3), 100), "u8")
        c.submit("pisa", 4, src).wait(timeout=300)  # PiSA-SR renders exactly: its input is kept
        left = sorted(os.listdir(first.buffers))
        assert any(f.startswith("kept-") for f in left) and any(f.endswith(".buf") for f in left), left
        first.stop(signal.SIGKILL)
    assert os.path.exists(first.socket)
    with Daemon(rt, env=env) as second:
        assert os.listdir(second.buffers) == []
        log = second.log()
        assert "removed a stale socket at %s" % second.socket in log
        line = next(l for l in log.splitlines() if "stale file(s)" in l)
        assert ("removed %d stale file(s)" % len(left)) in line and all(f in line for f in left), line
        with second.client() as c:
            c.ping()


def test_a_second_daemon_refuses_and_the_first_goes_on(daemon):
    import subprocess
    from harness import exe
    with daemon.client() as c:
        buf = c.alloc(4, 4, 3)
        r = subprocess.run([exe("tesserad")], env=daemon.env, capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "already running on %s" % daemon.socket in r.stderr, r.stderr
        # Nothing of the first one's was touched.
        assert os.path.exists(buf.path)
        (layer,) = c.submit("classic", 2, buf).wait(timeout=30)
        assert layer.buffer.layout["width"] == 8


def test_of_two_daemons_started_at_the_same_instant_one_serves(tmp_path):
    """Two editors starting their daemon together: one runs, the other refuses before it
    touches the socket or the buffers, every time."""
    import subprocess
    from harness import exe
    for round_ in range(10):
        rt = tmp_path / ("rt%d" % round_)
        os.makedirs(rt)
        env = dict(os.environ, TESSERA_RUNTIME_DIR=str(rt))
        env.pop("TESSERA_SOCKET", None)
        procs = [subprocess.Popen([exe("tesserad")], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        deadline = time.time() + 20
        while sum(p.poll() is not None for p in procs) < 1 and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        running = [p for p in procs if p.poll() is None]
        refused = [p for p in procs if p.poll() is not None]
        assert len(running) == 1 and len(refused) == 1, [p.poll() for p in procs]
        err = refused[0].stderr.read()
        assert refused[0].returncode != 0 and "already running on" in err, err
        from tessera_client import Client
        with Client.connect(socket=str(rt / "tesserad.sock"), autostart=False) as c:
            buf = c.alloc(4, 4, 3)
            (layer,) = c.submit("classic", 2, buf).wait(timeout=30)
            assert layer.buffer.layout["width"] == 8
        running[0].send_signal(signal.SIGTERM)
        assert running[0].wait(timeout=20) == 0


def test_python_client_starts_the_daemon(tmp_path, monkeypatch):
    import socket as socketlib
    import struct
    from harness import bin_dir
    from tessera_client import Client
    monkeypatch.setenv("TESSERA_RUNTIME_DIR", str(tmp_path / "auto"))
    monkeypatch.setenv("TESSERA_BIN_DIR", bin_dir())
    c = Client.connect(autostart=True, timeout=30)
    # The daemon outlives its client; find it through the socket and stop it as a user would.
    peer = c._sock.getsockopt(socketlib.SOL_SOCKET, socketlib.SO_PEERCRED, struct.calcsize("3i"))
    daemon_pid = struct.unpack("3i", peer)[0]
    try:
        assert "classic" in [p["id"] for p in c.welcome["plugins"]]
        assert c.list()["workers"][0]["pid"]
    finally:
        c.close()
        os.kill(daemon_pid, signal.SIGTERM)
    deadline = time.time() + 10
    while os.path.exists("/proc/%d" % daemon_pid) and _state(daemon_pid) != "Z" and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(str(tmp_path / "auto" / "tesserad.sock"))


def _state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_an_engine_that_ignores_cancel_is_stopped_by_restarting_its_worker(tmp_path):
    with Daemon(tmp_path / "rt", ["--cancel-grace", "1"]) as d, d.client() as c:
        worker = c.list()["workers"][0]["pid"]
        buf, job = big_job(c)
        first_progress(job)
        os.kill(worker, signal.SIGSTOP)  # a hung engine: it will never look at the cancel flag
        t0 = time.monotonic()
        job.cancel()
        with pytest.raises(TesseraError) as e:
            job.wait(timeout=30)
        assert e.value.code == "cancelled" and "restarted" in e.value.message
        assert time.monotonic() - t0 < 10
        small = upload(c, np.zeros((4, 4, 3)), "f32")
        (layer,) = c.submit("classic", 2, small).wait(timeout=30)
        assert layer.buffer.layout["width"] == 8
        assert c.list()["workers"][0]["pid"] != worker


def test_a_hung_worker_is_found_without_a_cancel_and_its_job_fails_clearly(tmp_path):
    with Daemon(tmp_path / "rt", ["--heartbeat-timeout", "2"]) as d, d.client() as c:
        worker = c.list()["workers"][0]["pid"]
        buf, job = big_job(c)
        first_progress(job)
        os.kill(worker, signal.SIGSTOP)  # hung: not a thread of it runs, nobody cancels
        t0 = time.monotonic()
        with pytest.raises(TesseraError) as e:
            job.wait(timeout=60)
        assert time.monotonic() - t0 < 15
        assert e.value.code == "worker_crashed" and "stopped answering" in e.value.message, e.value.message
        assert wait_for_new_worker(c, worker)["restarts"] == 1
        (layer,) = c.submit("classic", 2, upload(c, np.zeros((4, 4, 3)), "u8")).wait(timeout=30)
        assert layer.buffer.layout["width"] == 8


def test_a_hung_idle_worker_is_replaced_before_the_next_job(tmp_path):
    with Daemon(tmp_path / "rt", ["--heartbeat-timeout", "2"]) as d, d.client() as c:
        worker = c.list()["workers"][0]["pid"]
        os.kill(worker, signal.SIGSTOP)
        wait_for_new_worker(c, worker)
        assert "stopped answering" in d.log()
        (layer,) = c.submit("classic", 2, upload(c, np.zeros((4, 4, 3)), "u8")).wait(timeout=30)
        assert layer.buffer.layout["width"] == 8


def test_a_job_without_progress_past_the_stall_timeout_fails_and_its_worker_is_replaced(tmp_path):
    # The heartbeat's limit far away: only the job's silence can trip here.
    with Daemon(tmp_path / "rt", ["--heartbeat-timeout", "120", "--stall-timeout", "2"]) as d, d.client() as c:
        worker = c.list()["workers"][0]["pid"]
        buf, job = big_job(c)
        first_progress(job)
        os.kill(worker, signal.SIGSTOP)
        with pytest.raises(TesseraError) as e:
            job.wait(timeout=60)
        assert e.value.code == "worker_crashed" and "no progress for" in e.value.message, e.value.message
        wait_for_new_worker(c, worker)


def open_files(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024.0


def test_a_hundred_worker_kills_while_two_clients_submit(tmp_path):
    """The worker is killed 100 times at random points of running jobs while two clients keep
    submitting: each job ends with its result or a clear error, no client is disconnected, no
    buffer file is left, and the daemon's open files and memory stay flat."""
    import random
    rng = random.Random(7)
    with Daemon(tmp_path / "rt") as d, d.client(client="a") as a, d.client(client="b") as b, d.client() as watch:
        outcomes = {"a": [], "b": []}
        stop = threading.Event()

        def submitter(name, c, side):
            src = upload(c, np.random.default_rng(side).integers(0, 255, (side, side, 3)), "u8")
            while not stop.is_set():
                try:
                    (layer,) = c.submit("classic", 2, src, output_sample="u8").wait(timeout=120)
                    assert layer.buffer.layout["width"] == 2 * side
                    c.release(layer.buffer)
                    outcomes[name].append("done")
                except TesseraError as e:
                    assert e.code == "worker_crashed" and "died" in e.message, (e.code, e.message)
                    outcomes[name].append("crashed")

        threads = [threading.Thread(target=submitter, args=("a", a, 300)), threading.Thread(target=submitter, args=("b", b, 200))]
        for t in threads:
            t.start()
        time.sleep(1)
        files0, rss0 = open_files(d.proc.pid), rss_mib(d.proc.pid)
        kills = 0
        deadline = time.time() + 600
        while kills < 100 and time.time() < deadline:
            w = watch.list()["workers"][0]
            if w["state"] == "busy" and w["pid"]:
                time.sleep(rng.uniform(0, 0.05))
                try:
                    os.kill(w["pid"], signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
                # Its replacement first, then the next kill.
                t0 = time.time()
                while watch.list()["workers"][0]["pid"] in (None, w["pid"]) and time.time() - t0 < 60:
                    time.sleep(0.02)
            else:
                time.sleep(0.01)
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=300)
        assert kills == 100
        for name in ("a", "b"):
            assert outcomes[name].count("crashed") >= 1 and outcomes[name].count("done") >= 1, outcomes[name]
        assert a.ping()["type"] == "pong" and b.ping()["type"] == "pong"
        restarts = watch.list()["workers"][0]["restarts"]
        assert restarts == 100, restarts
        # Only the two inputs are left; the daemon's files and memory did not grow with the kills.
        assert len(os.listdir(d.buffers)) == 2, os.listdir(d.buffers)
        files1, rss1 = open_files(d.proc.pid), rss_mib(d.proc.pid)
        print("open files %d -> %d, RSS %.1f -> %.1f MiB after 100 kills" % (files0, files1, rss0, rss1))
        assert files1 <= files0 + 2
        assert rss1 <= rss0 + 20


def test_an_on_demand_daemon_exits_when_idle(tmp_path):
    d = Daemon(tmp_path / "rt", ["--idle-exit", "1"])
    with d.client() as c:
        time.sleep(1.5)  # a connected client keeps it alive
        assert c.ping()["type"] == "pong"
    d.proc.wait(timeout=10)
    assert d.proc.returncode == 0
    assert not os.path.exists(d.socket) and not os.path.exists(d.buffers)
    d.stop()
