"""The cnn engine's srgan-pair through the real daemon: parity with TensorFlow running the
original .h5 generators, the layer contract's invariants, and tiling that leaves no seam."""

import os

import numpy as np
import pytest

from harness import ROOT, Daemon
from test_daemon import as_array, upload

FIXTURES = np.load(os.path.join(ROOT, "tests", "fixtures", "srgan_tf.npz"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, store):
    d = Daemon(tmp_path_factory.mktemp("cnn") / "rt", env={"TESSERA_MODEL_DIR": str(store)})
    yield d
    d.stop()


def run(client, pixels, sample="f32", **params):
    buf = upload(client, pixels, sample)
    layers = client.submit("srgan-pair", 4, buf, params=params or None, output_sample="f32").wait(timeout=600)
    out = {l.role: as_array(l.buffer).astype(np.float64) for l in layers}
    client.release(buf)
    return out


@pytest.mark.parametrize("name", ["cat", "noise"])
def test_matches_tensorflow_on_the_original_weights(daemon, name):
    src = FIXTURES["input_" + name].astype(np.float32) / 255.0
    with daemon.client() as c:
        layers = run(c, src)
    sr_pix = layers["base"] + layers["pixel_detail"]
    sr_gan = sr_pix + layers["semantic_detail"]
    assert np.abs(sr_pix - FIXTURES["pre_" + name]).max() <= 1e-5
    assert np.abs(sr_gan - FIXTURES["gan_" + name]).max() <= 1e-5


def test_layer_contract(daemon):
    rng = np.random.default_rng(3)
    src = rng.random((20, 18, 4)).astype(np.float32)
    src[:, :6, 3] = 0.0
    with daemon.client() as c:
        buf = upload(c, src, "f32")
        job = c.submit("srgan-pair", 4, buf, output_sample="f32")
        layers = job.wait(timeout=600)
        assert [l.role for l in layers] == ["base", "pixel_detail", "semantic_detail"]
        assert [l.blend for l in layers] == ["normal", "addition", "addition"]
        assert [l.name for l in layers] == ["Tessera ×4 · base", "Tessera ×4 · pixel detail", "Tessera ×4 · semantic detail"]
        base, pix, sem = (as_array(l.buffer).astype(np.float64) for l in layers)
        # base is the classic engine's bicubic ×4, alpha included.
        (classic,) = c.submit("classic", 4, buf, params={"filter": "bicubic"}).wait(timeout=60)
        assert np.abs(base - as_array(classic.buffer)).max() <= 1e-6
        # Alpha is never generated: every layer carries the base's.
        assert np.array_equal(pix[..., 3], base[..., 3]) and np.array_equal(sem[..., 3], base[..., 3])


def test_integer_documents_get_offset_residuals(daemon):
    src = (FIXTURES["input_cat"]).astype(np.uint8)
    with daemon.client() as c:
        buf = upload(c, src, "u8")
        layers = c.submit("srgan-pair", 4, buf, output_sample="u8").wait(timeout=600)
        assert [(l.blend, l.offset) for l in layers] == [("normal", 0.0), ("grain_merge", 0.5), ("grain_merge", 0.5)]
        base, pix, sem = (as_array(l.buffer).astype(np.float64) / 255 for l in layers)
    # Grain merge of the stored layers reproduces SRGAN within the 8-bit rounding of 3 layers.
    composite = np.clip(np.clip(base + pix - 0.5, 0, 1) + sem - 0.5, 0, 1)
    assert np.abs(composite - np.clip(FIXTURES["gan_cat"], 0, 1)).max() <= 2.5 / 255


@pytest.mark.parametrize("rows,cols", [(64, 96), (96, 56)], ids=["2 tile rows", "4 tile rows"])
def test_tiles_leave_no_seam(daemon, rows, cols):
    """Tiled output equals untiled output to ≥ 50 dB PSNR (on an image that fits both ways),
    across the strips the engine writes out a row of tiles at a time, with the model's default
    overlap (32 pixels; tiles of 48 leave 16 pixels of each tile its own)."""
    from PIL import Image
    src = np.asarray(Image.open(os.path.join(ROOT, "docs", "sample", "chelsea.png")).convert("RGB"))[:rows, :cols]
    src = src.astype(np.float32) / 255.0
    with daemon.client() as c:
        whole = run(c, src, tile=4096)
        tiled = run(c, src, tile=48)
    for role in ("pixel_detail", "semantic_detail"):
        err = np.mean((tiled[role] - whole[role]) ** 2)
        psnr = 10 * np.log10(1.0 / max(err, 1e-20))
        assert psnr >= 50, (role, psnr)


def test_missing_weights_say_which_command_installs_them(tmp_path):
    with Daemon(tmp_path / "rt", env={"TESSERA_MODEL_DIR": str(tmp_path / "empty")}) as d, d.client() as c:
        buf = upload(c, np.zeros((4, 4, 3)), "f32")
        from tessera_client import TesseraError
        with pytest.raises(TesseraError) as e:
            c.submit("srgan-pair", 4, buf)
        assert e.value.code == "model_not_installed"
        assert "tessera models fetch srgan-pair" in e.value.hint


def test_deep_network_interpolation(daemon):
    """`dni` renders semantic detail from SRResNet and SRGAN's weights interpolated at λ: at 1
    it is SRGAN (the default), at 0 SRResNet (no semantic detail), and in between a network
    of its own, not the opacity blend of the two outputs."""
    src = FIXTURES["input_cat"].astype(np.float32) / 255.0
    with daemon.client() as c:
        default = run(c, src)
        at = {lam: run(c, src, dni=lam) for lam in (1.0, 0.0, 0.5)}
    assert np.array_equal(at[1.0]["semantic_detail"], default["semantic_detail"])
    assert np.abs(at[0.0]["semantic_detail"]).max() == 0.0
    for lam, layers in at.items():
        assert np.array_equal(layers["pixel_detail"], default["pixel_detail"]), lam
    half, blend = at[0.5]["semantic_detail"], 0.5 * default["semantic_detail"]
    assert np.corrcoef(half.ravel(), blend.ravel())[0, 1] > 0.5
    assert np.abs(half - blend).mean() > 0.1 * np.abs(blend).mean()
