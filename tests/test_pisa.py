"""The pisa engine through the real daemon and the real Python client, on the small
SD2.1-structured model of tests/fixtures/pisa imported the way a user imports the real one
(`tessera models import pisa --base DIR --checkpoint FILE`): layers and exact renders equal
to PyTorch's PiSA-SR maths (tests/parity/make_pisa_fixtures.py), the one-pass default mode,
progress stages, errors that name what to do, and a worker that dies between job and render."""

import json
import os
import signal
import struct
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from harness import ROOT, Daemon, exe, tessera_cli
from tessera_client import TesseraError
from test_daemon import as_array, upload

FIX = os.path.join(ROOT, "tests", "fixtures", "pisa")


def read_safetensors(path):
    """Every f32 tensor and the metadata of a safetensors file."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=np.float32).reshape(v["shape"])
    return out, meta


REF, META = read_safetensors(os.path.join(FIX, "reference.safetensors"))
LAMBDAS = json.loads(META["lambdas"])


def hwc(t):
    """(1, 3, h, w) → (h, w, 3)."""
    return np.transpose(t[0], (1, 2, 0)).astype(np.float64)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, pisa_store):
    d = Daemon(tmp_path_factory.mktemp("pisa") / "rt", env={"TESSERA_MODEL_DIR": str(pisa_store)})
    yield d
    d.stop()


def lr():
    return np.asarray(Image.open(os.path.join(FIX, "lr.png")).convert("RGB"))


def test_layers_are_pytorchs_pisa_sr(daemon):
    stages = []
    with daemon.client() as c:
        buf = upload(c, lr(), "u8")
        layers = c.submit("pisa", 4, buf, output_sample="f32").wait(timeout=300, progress=lambda ev: stages.append(ev["stage"]))
        assert [l.role for l in layers] == ["base", "pixel_detail", "semantic_detail"]
        base, pix, sem = (as_array(l.buffer).astype(np.float64) for l in layers)
    # pixel detail = x(1, 0) − base and semantic detail = x(1, 1) − x(1, 0), each AdaIN-fixed.
    x_pix, x_full = hwc(REF["x_adain.%d" % LAMBDAS.index([1, 0])]), hwc(REF["x_adain.%d" % LAMBDAS.index([1, 1])])
    assert np.abs(base + pix - x_pix).max() <= 1e-3
    assert np.abs(base + pix + sem - x_full).max() <= 1e-3
    for stage in ("encode", "unet", "decode", "colour fix"):
        assert any(s == stage or s.startswith(stage + " ") for s in stages), stages


def test_bf16_precision_stays_near_pytorchs_pisa_sr(daemon):
    """precision bf16: the layers' weights and products in bf16 (AMX or AVX512_BF16 where the
    CPU has them): the same layer stack near PyTorch's f32 maths (here about 39 dB PSNR, at
    most 7e-2 of the pixel range; the bound is 35 dB and 0.1), and not the f32 result itself
    (the option does change the arithmetic)."""
    with daemon.client() as c:
        buf = upload(c, lr(), "u8")
        layers = c.submit("pisa", 4, buf, params={"precision": "bf16"}, output_sample="f32").wait(timeout=300)
        assert [l.role for l in layers] == ["base", "pixel_detail", "semantic_detail"]
        base, pix, sem = (as_array(l.buffer).astype(np.float64) for l in layers)
        with pytest.raises(TesseraError, match=r"`precision` must be one of \[\"f32\", \"bf16\"\]"):
            c.submit("pisa", 4, buf, params={"precision": "f16"}).wait(timeout=60)
    x_pix, x_full = hwc(REF["x_adain.%d" % LAMBDAS.index([1, 0])]), hwc(REF["x_adain.%d" % LAMBDAS.index([1, 1])])
    for got, want in ((base + pix, x_pix), (base + pix + sem, x_full)):
        err = np.abs(got - want)
        psnr = 10 * np.log10(1 / np.mean(err ** 2))
        print("bf16 against f32: max %.2e, PSNR %.1f dB" % (err.max(), psnr))
        assert 1e-3 < err.max() <= 0.1 and psnr >= 35, (err.max(), psnr)


def test_exact_render_at_every_lambda(daemon):
    with daemon.client() as c:
        buf = upload(c, lr(), "u8")
        job = c.submit("pisa", 4, buf, output_sample="f32")
        layers = job.wait(timeout=300)
        c.release(buf)  # the daemon keeps what the renders need
        x_full = sum(as_array(l.buffer).astype(np.float64) for l in layers)
        for k, (lp, ls) in enumerate(LAMBDAS):
            (exact,) = c.render(job, lp, ls, output_sample="f32").wait(timeout=300)
            assert exact.role == "exact" and exact.blend == "normal"
            assert "exact λ" in exact.name
            x = as_array(exact.buffer).astype(np.float64)
            assert np.abs(x - hwc(REF["x_adain.%d" % k])).max() <= 1e-3, (lp, ls)
            if (lp, ls) == (1, 1):
                # The exact render at the job's own λ is the job's picture.
                assert np.abs(x - x_full).max() <= 1e-4
        c.release_job(job)
        with pytest.raises(Exception) as e:
            c.render(job, 1.0, 1.0).wait(timeout=60)
        assert "unknown_job" in str(e.value) or "rendered exactly" in str(e.value)


def test_wavelet_colour_fix_and_default_mode(daemon):
    with daemon.client() as c:
        buf = upload(c, lr(), "u8")
        k = LAMBDAS.index([1, 1])
        layers = c.submit("pisa", 4, buf, params={"color_fix": "wavelet"}, output_sample="f32").wait(timeout=300)
        total = sum(as_array(l.buffer).astype(np.float64) for l in layers)
        assert np.abs(total - hwc(REF["x_wavelet.%d" % k])).max() <= 1e-3
        # One pass (ε_full alone): base and one detail layer.
        job = c.submit("pisa", 4, buf, params={"mode": "default"}, output_sample="f32")
        layers = job.wait(timeout=300)
        assert [(l.role, l.name) for l in layers] == [("base", "Tessera ×4 · base"), ("pixel_detail", "Tessera ×4 · detail")]
        base, detail = (as_array(l.buffer).astype(np.float64) for l in layers)
        assert np.abs(base + detail - hwc(REF["x_adain.%d" % k])).max() <= 1e-3
        # Its exact render at other λ runs the UNet for ε_pix, and is still exact.
        i = LAMBDAS.index([1.2, 0.8])
        (exact,) = c.render(job, 1.2, 0.8, output_sample="f32").wait(timeout=300)
        assert np.abs(as_array(exact.buffer) - hwc(REF["x_adain.%d" % i])).max() <= 1e-3


def test_render_on_another_connection_after_the_worker_died(daemon):
    """Editors connect once per job: a job outlives its connection. The worker's kept
    latents die with it; the daemon's kept input lets the new worker render the same
    picture."""
    with daemon.client() as c:
        buf = upload(c, lr(), "u8")
        job = c.submit("pisa", 4, buf, output_sample="f32")
        job.wait(timeout=300)
        job_id = job.job
    with daemon.client() as c:
        pid = c.list()["workers"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 60
        while time.time() < deadline:
            workers = c.list()["workers"]
            if workers and workers[0].get("pid") not in (None, pid) and workers[0].get("state") != "starting":
                break
            time.sleep(0.2)
        k = LAMBDAS.index([0.5, 0.25])
        (exact,) = c.render(job_id, 0.5, 0.25, output_sample="f32").wait(timeout=300)
        assert np.abs(as_array(exact.buffer) - hwc(REF["x_adain.%d" % k])).max() <= 1e-3


def test_cli_adds_the_exact_render_as_a_hidden_layer(daemon, pisa_store, tmp_path):
    env = dict(os.environ, TESSERA_MODEL_DIR=str(pisa_store), TESSERA_RUNTIME_DIR=str(daemon.runtime))
    out = tmp_path / "out.ora"
    r = tessera_cli(env, "upscale", os.path.join(FIX, "lr.png"), "-o", str(out), "--model", "pisa",
                    "--param", "lambda_pix=1.2", "--param", "lambda_sem=0.8", "--png-dir", str(tmp_path / "png"))
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(out) as z:
        stack = z.read("stack.xml").decode()
    assert 'name="Tessera ×4 · exact λ 1.20/0.80" src="data/exact.png" composite-op="svg:src-over" opacity="1.000" visibility="hidden"' in stack
    exact = np.asarray(Image.open(tmp_path / "png" / "exact.png").convert("RGB"), dtype=np.float64) / 255
    k = LAMBDAS.index([1.2, 0.8])
    assert np.abs(exact - hwc(REF["x_adain.%d" % k])).max() <= 0.5 / 255 + 1e-3
    # The composite is the job's picture, the hidden exact layer left out, wherever the
    # residuals fit 8-bit storage as 0.5 + R (the random test model's often do not).
    png = lambda name: np.asarray(Image.open(tmp_path / "png" / name).convert("RGB"), dtype=np.int64)
    comp = png("composite.png") / 255
    fits = np.all([(png(n) > 0) & (png(n) < 255) for n in ("pixel_detail.png", "semantic_detail.png")], axis=0)
    assert fits.mean() > 0.5
    x_full = hwc(REF["x_adain.%d" % LAMBDAS.index([1, 1])])
    assert np.abs(comp - x_full)[fits].max() <= 2.5 / 255


def test_missing_model_names_the_import_command(tmp_path):
    with Daemon(tmp_path / "rt", env={"TESSERA_MODEL_DIR": str(tmp_path / "empty")}) as d, d.client() as c:
        buf = upload(c, lr(), "u8")
        with pytest.raises(Exception) as e:
            c.submit("pisa", 4, buf).wait(timeout=60)
        assert "tessera models import pisa --base" in str(e.value)
    r = tessera_cli(dict(os.environ, TESSERA_MODEL_DIR=str(tmp_path / "empty")), "models", "list")
    assert "pisa" in r.stdout and "tessera models import pisa" in r.stdout


@pytest.mark.parametrize("channels", [2, 4])
def test_alpha_is_upscaled_never_generated(daemon, channels):
    rng = np.random.default_rng(5)
    src = rng.random((13, 19, channels)).astype(np.float32)
    src[:, :5, -1] = 0.0
    with daemon.client() as c:
        buf = upload(c, src, "f32")
        layers = c.submit("pisa", 4, buf, output_sample="f32").wait(timeout=300)
        base, pix, sem = (as_array(l.buffer).astype(np.float64) for l in layers)
        (classic,) = c.submit("classic", 4, buf, params={"filter": "bicubic"}).wait(timeout=60)
        ref = as_array(classic.buffer)
        # base is the classic bicubic, its colour clamped to the [0, 1] the model starts from.
        assert np.abs(base[..., -1] - ref[..., -1]).max() <= 1e-6
        assert np.abs(base[..., :-1] - np.clip(ref[..., :-1], 0, 1)).max() <= 1e-6
        assert np.array_equal(pix[..., -1], base[..., -1]) and np.array_equal(sem[..., -1], base[..., -1])


def test_cancel_stops_between_stages_and_a_dead_worker_fails_one_job(daemon):
    """A larger layer takes the small model a few seconds: a cancel ends it with `cancelled`;
    a worker killed mid-job (as out of memory would) fails that job alone."""
    rng = np.random.default_rng(6)
    src = rng.random((160, 160, 3)).astype(np.float32)
    with daemon.client() as c:
        buf = upload(c, src, "f32")
        job = c.submit("pisa", 4, buf, params={"attention_mb": 4})
        for ev in job.events(timeout=300):
            if ev.get("type") == "progress" and ev.get("stage") == "unet":
                c.cancel(job)
                break
        with pytest.raises(Exception) as e:
            job.wait(timeout=300)
        assert "cancel" in str(e.value)
        job = c.submit("pisa", 4, buf, params={"attention_mb": 4})
        for ev in job.events(timeout=300):
            if ev.get("type") == "progress" and ev.get("stage") == "unet":
                os.kill(c.list()["workers"][0]["pid"], signal.SIGKILL)
                break
        with pytest.raises(Exception) as e:
            job.wait(timeout=300)
        assert "worker" in str(e.value) and "died" in str(e.value)
        # The next job runs on the new worker.
        small = upload(c, lr(), "u8")
        assert len(c.submit("pisa", 4, small).wait(timeout=300)) == 3


def test_a_model_imported_under_its_own_id_runs(tmp_path):
    store = tmp_path / "models"
    env = dict(os.environ, TESSERA_MODEL_DIR=str(store))
    r = tessera_cli(env, "models", "import", "pisa", "--base", os.path.join(FIX, "sd21-tiny"),
                    "--checkpoint", os.path.join(FIX, "pisa_sr_tiny.pkl"), "--id", "my-finetune")
    assert r.returncode == 0, r.stderr
    listed = tessera_cli(env, "models", "list").stdout
    assert "my-finetune" in listed and "[installed: PiSA-SR imported from" in listed
    with Daemon(tmp_path / "rt", env={"TESSERA_MODEL_DIR": str(store)}) as d, d.client() as c:
        models = {m["id"]: m for p in c.list()["plugins"] if p["id"] == "pisa" for m in p["models"]}
        assert models["my-finetune"]["exact_render"] and "my-finetune" in models["my-finetune"]["name"]
        buf = upload(c, lr(), "u8")
        layers = c.submit("my-finetune", 4, buf, output_sample="f32").wait(timeout=300)
        total = sum(as_array(l.buffer).astype(np.float64) for l in layers)
        assert np.abs(total - hwc(REF["x_adain.%d" % LAMBDAS.index([1, 1])])).max() <= 1e-3
        # `pisa` itself is not imported in this store: the error says how to import it.
        with pytest.raises(Exception) as e:
            c.submit("pisa", 4, buf).wait(timeout=60)
        assert "tessera models import pisa --base" in str(e.value)


def test_a_tiled_job_reports_its_tiles_and_its_layers_still_add_up(daemon):
    """Latent windows and VAE tiles through the daemon: progress per tile, a render from the
    tiled job's latents equal to its layers, and a memory budget too small for the whole image
    tiling it by itself."""
    rng = np.random.default_rng(3)
    img = np.clip(np.kron(rng.uniform(0, 255, (6, 8, 3)), np.ones((8, 8, 1))) + rng.normal(0, 6, (48, 64, 3)), 0, 255).astype(np.uint8)
    stages = []
    with daemon.client() as c:
        buf = upload(c, img, "u8")
        params = {"tile": 16, "tile_overlap": 8, "vae_tile": 12}
        job = c.submit("pisa", 4, buf, params=params, output_sample="f32")
        layers = job.wait(timeout=300, progress=lambda ev: stages.append(ev["stage"]))
        x_full = sum(as_array(l.buffer).astype(np.float64) for l in layers)
        (exact,) = c.render(job, 1.0, 1.0, output_sample="f32").wait(timeout=300)
        assert np.abs(as_array(exact.buffer).astype(np.float64) - x_full).max() <= 1e-4
        # 64 × 48 → 256 × 192: a latent of 32 × 24, UNet windows of 16 (3 × 2... more with
        # the overlap), VAE tiles of 12 with one estimating pass.
        for stage in ("encode 1/", "unet 1/", "decode 1/"):
            assert any(s.startswith(stage) for s in stages), stages
        n_unet = max(int(s.split("/")[1]) for s in stages if s.startswith("unet "))
        assert n_unet >= 6, stages

        stages.clear()
        c.submit("pisa", 4, buf, params={"memory_mb": 1, "mode": "default"}, output_sample="f32").wait(
            timeout=300, progress=lambda ev: stages.append(ev["stage"]))
        assert any(s.startswith("decode 1/") for s in stages), stages
        c.release(buf)


def test_a_model_file_damaged_after_import_is_caught_before_any_job_runs(pisa_store, tmp_path):
    """A weight file truncated, or changed in place at the same size, after the import is
    found at submit (sizes, times and SHA-256 against the manifest), before a worker loads it;
    the error names the file and the command that repairs it. Put back, the model runs."""
    import shutil
    store = tmp_path / "store"
    shutil.copytree(pisa_store, store)
    weights = store / "pisa" / "vae.safetensors"
    good = weights.read_bytes()
    with Daemon(tmp_path / "rt", env={"TESSERA_MODEL_DIR": str(store)}) as d, d.client() as c:
        buf = upload(c, np.full((8, 8, 3), 90), "u8")
        c.submit("pisa", 4, buf).wait(timeout=300)  # verified and loaded once
        for damage in (good[: len(good) // 2], good[:-1] + bytes([good[-1] ^ 1])):
            weights.write_bytes(damage)
            with pytest.raises(TesseraError) as e:
                c.submit("pisa", 4, buf)
            assert e.value.code == "model_not_installed", e.value
            assert "vae.safetensors" in e.value.message
            assert "tessera models import pisa" in (e.value.hint or ""), e.value.hint
        weights.write_bytes(good)
        (base, _, _) = c.submit("pisa", 4, buf).wait(timeout=300)
        assert base.buffer.layout["width"] == 32
