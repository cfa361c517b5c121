"""Devices and their workers (DESIGN.md §1): the CPU always, a worker per CUDA card, jobs on
the best device that runs their plugin, a `device` field that overrides it, and a crash on
one device that fails only that device's job.

This machine has no card, so the tests use what it has: `--devices` naming a card that is not
there, and the worker's test hook TESSERA_TEST_GPU_AS_CPU, which makes a `cuda:0` worker run
the CPU builds so that two live workers can be supervised, killed and restarted."""

import os
import signal
import time

import numpy as np
import pytest

from harness import Daemon
from tessera_client import TesseraError
from test_daemon import big_job, first_progress, upload


def workers_by_device(c):
    return {w["device"]: w for w in c.list()["workers"]}


def test_welcome_lists_the_cpu_and_says_once_why_there_is_no_card(tmp_path):
    with Daemon(tmp_path / "rt") as d, d.client() as c:
        devices = c.devices
        assert devices[-1]["id"] == "cpu" and "threads" in devices[-1]["name"]
        assert devices[-1]["memory_bytes"] > 0
        (w,) = [w for w in c.list()["workers"] if w["device"] == "cpu"]
        assert set(w["plugins"]) >= {"classic", "cnn", "pisa"}
        if len(devices) == 1:
            # No card: one line in the log says why, and nothing else mentions CUDA.
            log = d.log()
            assert log.count("no CUDA device") == 1, log
            assert sum("CUDA" in line for line in log.splitlines()) == 1, log
            assert [p for p in c.plugins if p["id"] == "pisa"][0]["devices"][0] == "cpu"


def test_a_device_without_a_worker_is_refused_clearly(tmp_path):
    with Daemon(tmp_path / "rt", ["--devices", "cpu"]) as d, d.client() as c:
        buf = upload(c, np.zeros((4, 4, 3)), "f32")
        with pytest.raises(TesseraError) as e:
            c.submit("classic", 2, buf, device="cuda:3").wait(timeout=30)
        assert e.value.code == "device_unavailable"
        assert "cuda:3" in e.value.message and "devices: cpu" in e.value.message
        # The buffer is free again and the same job runs on the CPU.
        (layer,) = c.submit("classic", 2, buf, device="cpu").wait(timeout=30)
        assert layer.buffer.layout["width"] == 8


def test_a_card_that_is_not_there_runs_nothing_and_the_cpu_goes_on(tmp_path):
    with Daemon(tmp_path / "rt", ["--devices", "cuda:0,cpu"]) as d, d.client() as c:
        assert [x["id"] for x in c.devices] == ["cuda:0", "cpu"]
        assert "not found" in c.devices[0]["name"]
        workers = workers_by_device(c)
        assert workers["cuda:0"]["plugins"] == [] and workers["cuda:0"]["state"] == "idle"
        buf = upload(c, np.zeros((4, 4, 3)), "f32")
        with pytest.raises(TesseraError) as e:
            c.submit("classic", 2, buf, device="cuda:0").wait(timeout=30)
        assert e.value.code == "device_unavailable"
        assert "does not run on cuda:0" in e.value.message
        # Without `device` the job goes to the best device that runs it: the CPU.
        (layer,) = c.submit("classic", 2, buf).wait(timeout=30)
        assert layer.buffer.layout["width"] == 8


def test_two_workers_run_at_once_and_a_crash_on_one_spares_the_other(tmp_path):
    env = {"TESSERA_TEST_GPU_AS_CPU": "1"}
    with Daemon(tmp_path / "rt", ["--devices", "cuda:0,cpu"], env=env) as d, d.client() as c:
        workers = workers_by_device(c)
        gpu, cpu = workers["cuda:0"], workers["cpu"]
        assert "classic" in gpu["plugins"] and gpu["pid"] != cpu["pid"]
        # The best device takes a job that names none; the other runs at the same time.
        buf, on_gpu = big_job(c)
        first_progress(on_gpu)
        src = upload(c, np.random.default_rng(1).random((600, 600, 3)), "f32")
        on_cpu = c.submit("classic", 4, src, device="cpu")
        first_progress(on_cpu)
        states = workers_by_device(c)
        assert states["cuda:0"]["state"] == "busy" and states["cpu"]["state"] == "busy"
        os.kill(gpu["pid"], signal.SIGKILL)
        with pytest.raises(TesseraError) as e:
            on_gpu.wait(timeout=30)
        assert e.value.code == "worker_crashed" and "on cuda:0" in e.value.message
        (layer,) = on_cpu.wait(timeout=120)
        assert layer.buffer.layout["width"] == 2400
        # The card's worker is replaced and takes the next job; the CPU's was never touched.
        deadline = time.time() + 20
        while time.time() < deadline:
            w = workers_by_device(c)
            if w["cuda:0"]["state"] == "idle" and w["cuda:0"]["pid"] not in (None, gpu["pid"]):
                break
            time.sleep(0.05)
        assert w["cuda:0"]["restarts"] == 1 and w["cpu"]["restarts"] == 0 and w["cpu"]["pid"] == cpu["pid"]
        small = upload(c, np.zeros((4, 4, 3)), "f32")
        (layer,) = c.submit("classic", 2, small).wait(timeout=30)
        assert layer.buffer.layout["width"] == 8


def test_a_slow_worker_start_holds_up_no_other_device(tmp_path):
    """A worker that takes seconds to start (a CUDA worker opening its card) starts beside
    the scheduler: the CPU's jobs and every client's events go on meanwhile."""
    env = {"TESSERA_TEST_GPU_AS_CPU": "slow:6"}
    with Daemon(tmp_path / "rt", ["--devices", "cuda:0,cpu"], env=env) as d, d.client() as c:
        gpu = workers_by_device(c)["cuda:0"]
        assert gpu["state"] == "idle"
        os.kill(gpu["pid"], signal.SIGKILL)
        deadline = time.time() + 10
        while workers_by_device(c)["cuda:0"]["state"] != "starting":
            assert time.time() < deadline, workers_by_device(c)
            time.sleep(0.02)
        small = upload(c, np.zeros((4, 4, 3)), "f32")
        t = time.time()
        (layer,) = c.submit("classic", 2, small, device="cpu").wait(timeout=30)
        took = time.time() - t
        assert layer.buffer.layout["width"] == 8
        assert took < 3 and workers_by_device(c)["cuda:0"]["state"] == "starting", took
        deadline = time.time() + 30
        while workers_by_device(c)["cuda:0"]["state"] != "idle":
            assert time.time() < deadline, workers_by_device(c)
            time.sleep(0.05)
        assert workers_by_device(c)["cuda:0"]["restarts"] == 1
