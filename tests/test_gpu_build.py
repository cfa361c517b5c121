"""The GPU build of the engines on a machine without a card (its CPU side), run where
TESSERA_GPU_BUILD names the folder of plugins built with `--features cuda` (tests/gpu/ci.sh
builds them and sets it; elsewhere these tests skip): it loads in a worker beside the CUDA
toolkit's driver stub, says it runs on `cuda`, runs PiSA-SR on the CPU exactly as the CPU
build does, and a CUDA worker that cannot open its card says why while the CPU goes on."""

import os
import shutil

import numpy as np
import pytest

from harness import Daemon, bin_dir
from tessera_client import TesseraError
from test_daemon import as_array, upload
from test_pisa import LAMBDAS, REF, hwc, lr

GPU_BUILD = os.environ.get("TESSERA_GPU_BUILD")
pytestmark = pytest.mark.skipif(not GPU_BUILD, reason="TESSERA_GPU_BUILD is not set (tests/gpu/ci.sh sets it)")


def plugin_dir(tmp_path, gpu_in_subdir):
    """A plugin folder laid out as an install is: the CPU builds, and the GPU build of pisa
    either in `cuda/` (where CUDA workers look first) or in place of the CPU one."""
    d = tmp_path / "plugins"
    (d / "cuda").mkdir(parents=True)
    for name in ("libtessera_classic.so", "libtessera_pisa.so"):
        shutil.copy(os.path.join(bin_dir(), name), d / name)
    gpu = os.path.join(GPU_BUILD, "libtessera_pisa.so")
    shutil.copy(gpu, d / "cuda" / "libtessera_pisa.so" if gpu_in_subdir else d / "libtessera_pisa.so")
    return str(d)


def test_the_gpu_build_runs_pisa_on_the_cpu_as_the_cpu_build_does(tmp_path, pisa_store):
    env = {"TESSERA_MODEL_DIR": str(pisa_store)}
    with Daemon(tmp_path / "rt", ["--devices", "cpu", "--plugins", plugin_dir(tmp_path, False)], env=env) as d, d.client() as c:
        (pisa,) = [p for p in c.plugins if p["id"] == "pisa"]
        assert pisa["devices"] == ["cpu", "cuda"]
        buf = upload(c, lr(), "u8")
        base, pix, sem = (as_array(l.buffer).astype(np.float64) for l in c.submit("pisa", 4, buf).wait(timeout=300))
    x_full = hwc(REF["x_adain.%d" % LAMBDAS.index([1, 1])])
    assert np.abs(base + pix + sem - x_full).max() <= 1e-3


def test_a_cuda_worker_without_a_card_says_why_and_the_cpu_runs_the_job(tmp_path, pisa_store):
    env = {"TESSERA_MODEL_DIR": str(pisa_store)}
    args = ["--devices", "cuda:0,cpu", "--plugins", plugin_dir(tmp_path, True)]
    with Daemon(tmp_path / "rt", args, env=env) as d, d.client() as c:
        workers = {w["device"]: w for w in c.list()["workers"]}
        assert workers["cuda:0"]["plugins"] == []
        assert "cannot open CUDA device 0" in workers["cuda:0"]["error"], workers
        assert workers["cpu"]["plugins"] == ["classic", "pisa"]
        buf = upload(c, lr(), "u8")
        with pytest.raises(TesseraError) as e:
            c.submit("pisa", 4, buf, device="cuda:0").wait(timeout=60)
        assert e.value.code == "device_unavailable" and "cannot open CUDA device 0" in e.value.message
        layers = c.submit("pisa", 4, buf, params={"mode": "default"}).wait(timeout=300)
        assert [l.role for l in layers] == ["base", "pixel_detail"]
