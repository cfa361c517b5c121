"""Real-ESRGAN x4plus and x4plus-anime through the real daemon: parity with PyPI ncnn running
the original files, the band split of one GAN into pixel and semantic detail, and tiles."""

import os

import numpy as np
import pytest
from PIL import Image

from harness import ROOT, Daemon
from test_daemon import as_array, pillow_float, upload

FIXTURES = np.load(os.path.join(ROOT, "tests", "fixtures", "realesrgan_ncnn.npz"))
MODELS = {"x4plus": "realesrgan-x4plus", "anime": "realesrgan-x4plus-anime"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, store):
    d = Daemon(tmp_path_factory.mktemp("esrgan") / "rt", env={"TESSERA_MODEL_DIR": str(store)})
    yield d
    d.stop()


def run(client, model, pixels, sample="f32", **params):
    buf = upload(client, pixels, sample)
    layers = client.submit(model, 4, buf, params=params or None, output_sample="f32").wait(timeout=900)
    client.release(buf)
    return {l.role: as_array(l.buffer).astype(np.float64) for l in layers}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("name", ["cat", "noise"])
def test_matches_ncnn_on_the_original_files(daemon, model, name):
    src = FIXTURES["input_" + name].astype(np.float32) / 255.0
    with daemon.client() as c:
        layers = run(c, MODELS[model], src)
    full = layers["base"] + layers["pixel_detail"] + layers["semantic_detail"]
    # The engine clamps the network's slight overshoot, as Real-ESRGAN's apps do.
    assert np.abs(full - np.clip(FIXTURES["%s_%s" % (model, name)], 0, 1)).max() <= 1e-4


def test_the_band_split(daemon):
    """pixel detail = U(D(y)) − base and semantic detail = y − U(D(y)), with D and U
    Pillow's bicubic (which the classic engine matches): the semantic band holds the detail
    above the input's resolution."""
    src = FIXTURES["input_cat"].astype(np.float32) / 255.0
    with daemon.client() as c:
        layers = run(c, "realesrgan-x4plus", src)
    base, pix, sem = layers["base"], layers["pixel_detail"], layers["semantic_detail"]
    y = base + pix + sem
    h, w = src.shape[:2]
    for ch in range(3):
        down = pillow_float(y[..., ch], (w, h), Image.Resampling.BICUBIC)
        low = pillow_float(down, (4 * w, 4 * h), Image.Resampling.BICUBIC)
        assert np.abs(base[..., ch] + pix[..., ch] - low).max() <= 1e-4
        # Share of each band's energy above the input's Nyquist frequency (1/8 cycle per
        # output pixel at ×4): about 0.42 for semantic detail, 0.09 for pixel detail.
        assert above_input_nyquist(sem[..., ch]) > 3 * above_input_nyquist(pix[..., ch])


def above_input_nyquist(plane):
    power = np.abs(np.fft.fft2(plane - plane.mean())) ** 2
    fy = np.abs(np.fft.fftfreq(plane.shape[0]))[:, None]
    fx = np.abs(np.fft.fftfreq(plane.shape[1]))[None, :]
    return power[np.maximum(fy, fx) > 1 / 8].sum() / power.sum()


@pytest.mark.parametrize("channels,alpha", [(4, True), (1, False), (2, True)], ids=["rgba", "grey", "grey+alpha"])
def test_layer_contract_on_any_document(daemon, channels, alpha):
    rng = np.random.default_rng(5)
    src = rng.random((14, 10, channels)).astype(np.float32)
    with daemon.client() as c:
        buf = upload(c, src, "f32", alpha=alpha)
        layers = c.submit("realesrgan-x4plus-anime", 4, buf, output_sample="f32").wait(timeout=600)
        assert [l.role for l in layers] == ["base", "pixel_detail", "semantic_detail"]
        base, pix, sem = (as_array(l.buffer).astype(np.float64) for l in layers)
        (classic,) = c.submit("classic", 4, buf, params={"filter": "bicubic"}).wait(timeout=60)
        assert np.abs(base - as_array(classic.buffer)).max() <= 1e-6
    colour = channels - alpha
    full = base[..., :colour] + pix[..., :colour] + sem[..., :colour]
    assert full.min() >= -1e-5 and full.max() <= 1 + 1e-5
    if alpha:
        assert np.array_equal(pix[..., -1], base[..., -1]) and np.array_equal(sem[..., -1], base[..., -1])


def test_tiles_leave_no_seam(daemon):
    """Tiled equals untiled to ≥ 50 dB with the model's default overlap (48), over two rows
    and two columns of tiles, which also exercises the band split writing rows behind the
    finished tiles."""
    src = np.asarray(Image.open(os.path.join(ROOT, "docs", "sample", "chelsea.png")).convert("RGB"))[:96, :128]
    src = src.astype(np.float32) / 255.0
    with daemon.client() as c:
        whole = run(c, "realesrgan-x4plus", src, tile=4096)
        tiled = run(c, "realesrgan-x4plus", src, tile=96)
    for role in ("base", "pixel_detail", "semantic_detail"):
        err = np.mean((tiled[role] - whole[role]) ** 2)
        psnr = 10 * np.log10(1.0 / max(err, 1e-20))
        assert psnr >= 50, (role, psnr)
