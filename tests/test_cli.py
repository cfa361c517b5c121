"""`tessera upscale` as a user runs it: the ORA it writes opens as the layer contract says."""

import io
import os
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
from PIL import Image

from harness import ROOT, Daemon, tessera_cli
from pngio import read_png as decode_png, write_png

SAMPLE = os.path.join(ROOT, "docs", "sample", "chelsea.png")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, store):
    d = Daemon(tmp_path_factory.mktemp("cli") / "rt", env={"TESSERA_MODEL_DIR": str(store)})
    d.store = store
    yield d
    d.stop()


def tessera(daemon, *args):
    return tessera_cli(dict(os.environ, TESSERA_MODEL_DIR=str(daemon.store)), "--socket", daemon.socket, *args)


def pillow_reference(img, size, filt=Image.Resampling.LANCZOS, top=255):
    """Pillow's float resampling per channel, rounded once."""
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    out = [np.asarray(Image.fromarray(arr[:, :, c].astype(np.float32)).resize(size, filt), dtype=np.float64)
           for c in range(arr.shape[2])]
    return np.clip(np.floor(np.stack(out, -1) + 0.5), 0, top)


def read_png(zf, name):
    return Image.open(io.BytesIO(zf.read(name)))


def test_upscale_writes_an_openraster_file(daemon, tmp_path):
    out = tmp_path / "chelsea_x4.ora"
    pngs = tmp_path / "png"
    r = tessera(daemon, "upscale", SAMPLE, "-o", str(out), "--scale", "4", "--model", "classic", "--png-dir", str(pngs))
    assert r.returncode == 0, r.stderr
    assert "640×480" in r.stderr
    with zipfile.ZipFile(out) as zf:
        first = zf.infolist()[0]
        assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED
        assert zf.read("mimetype") == b"image/openraster"
        names = set(zf.namelist())
        assert {"stack.xml", "data/base.png", "mergedimage.png", "Thumbnails/thumbnail.png"} <= names
        root = ET.fromstring(zf.read("stack.xml"))
        assert (root.get("w"), root.get("h")) == ("640", "480")
        group = root.find("stack").find("stack")
        assert group.get("name") == "Tessera ×4 classic · chelsea"
        (layer,) = group.findall("layer")
        assert layer.get("name") == "Tessera ×4 · base"
        assert layer.get("composite-op") == "svg:src-over" and layer.get("src") == "data/base.png"
        base = read_png(zf, "data/base.png")
        assert base.size == (640, 480) and base.mode == "RGB"
        ref = pillow_reference(Image.open(SAMPLE), (640, 480))
        assert np.abs(np.asarray(base, dtype=np.float64) - ref).max() <= 1
        # With the base alone, the composite is the base.
        assert np.array_equal(np.asarray(read_png(zf, "mergedimage.png")), np.asarray(base))
        assert max(read_png(zf, "Thumbnails/thumbnail.png").size) <= 256
    assert sorted(os.listdir(pngs)) == ["base.png", "composite.png"]


def test_sixteen_bit_input_with_alpha(daemon, tmp_path):
    rng = np.random.default_rng(2)
    rgba = (rng.random((12, 16, 4)) * 65535).astype(np.uint16)
    rgba[..., 3] = 65535
    src = tmp_path / "in16.png"
    write_png(src, rgba)
    out = tmp_path / "g.ora"
    r = tessera(daemon, "upscale", str(src), "-o", str(out), "--scale", "2", "--model", "classic", "--param", "filter=bicubic")
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(out) as zf:
        base = decode_png(zf.read("data/base.png"))
    assert base.shape == (24, 32, 4) and base.dtype == np.uint16
    # Opaque everywhere, so colour is plain resampling: Pillow's float path at 16 bits.
    exact = np.stack([np.asarray(Image.fromarray((rgba[..., ch] / 65535.0).astype(np.float32))
                                 .resize((32, 24), Image.Resampling.BICUBIC), dtype=np.float64) for ch in range(3)], -1)
    assert np.abs(base[..., :3] - np.clip(np.floor(exact * 65535 + 0.5), 0, 65535)).max() <= 1
    assert (base[..., 3] == 65535).all()


def test_rgba_input_keeps_alpha(daemon, tmp_path):
    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    rgba[:, :8, 3] = 0
    src = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(src)
    out = tmp_path / "rgba.ora"
    r = tessera(daemon, "upscale", str(src), "-o", str(out), "--scale", "3", "--model", "classic")
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(out) as zf:
        base = np.asarray(read_png(zf, "data/base.png"))
    assert base.shape == (60, 72, 4)
    # Fully transparent input columns stay transparent well inside the stripe.
    # Lanczos-3 reaches 3 input pixels: output columns whose window ends before input
    # column 8 stay fully transparent.
    assert base[:, :12, 3].max() == 0


def icc_of(png):
    return Image.open(io.BytesIO(png)).info.get("icc_profile")


def test_colour_profiles_in_the_outputs(daemon, tmp_path):
    """A 16-bit output says it is sRGB (an untagged 16-bit PNG is ambiguous: Krita asks for
    each layer and proposes a linear profile); an 8-bit one stays untagged, which every reader
    takes as sRGB; an input's own profile goes on to every output, whose samples are in its
    encoding."""
    from PIL import ImageCms
    src16 = tmp_path / "in16.png"
    write_png(src16, (np.random.default_rng(5).random((8, 10, 3)) * 65535).astype(np.uint16))
    out16 = tmp_path / "p16.ora"
    r = tessera(daemon, "upscale", str(src16), "-o", str(out16), "--scale", "2", "--model", "classic",
                "--png-dir", str(tmp_path / "png16"))
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(out16) as zf:
        icc = {icc_of(zf.read(n)) for n in ("data/base.png", "mergedimage.png", "Thumbnails/thumbnail.png")}
    icc |= {icc_of((tmp_path / "png16" / n).read_bytes()) for n in ("base.png", "composite.png")}
    (profile,) = icc
    # Little CMS reads it, and it is sRGB: an 8-bit ramp goes to its own sRGB unchanged.
    ours = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    ramp = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(16, 16, 3), "RGB")
    back = ImageCms.applyTransform(ramp, ImageCms.buildTransform(ours, ImageCms.createProfile("sRGB"), "RGB", "RGB"))
    assert np.array_equal(np.asarray(back), np.asarray(ramp))

    src8 = tmp_path / "in8.png"
    Image.fromarray(np.asarray(ramp)).save(src8)
    out8 = tmp_path / "p8.ora"
    assert tessera(daemon, "upscale", str(src8), "-o", str(out8), "--scale", "2", "--model", "classic").returncode == 0
    with zipfile.ZipFile(out8) as zf:
        assert icc_of(zf.read("data/base.png")) is None

    # Little CMS's own sRGB profile stands for whatever profile an input carries: its bytes differ from Tessera's.
    theirs = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert theirs != profile
    tagged = tmp_path / "tagged.png"
    Image.fromarray(np.asarray(ramp)).save(tagged, icc_profile=theirs)
    out_tagged = tmp_path / "tagged.ora"
    assert tessera(daemon, "upscale", str(tagged), "-o", str(out_tagged), "--scale", "2", "--model", "classic").returncode == 0
    with zipfile.ZipFile(out_tagged) as zf:
        assert icc_of(zf.read("data/base.png")) == theirs == icc_of(zf.read("mergedimage.png"))


def test_errors_name_the_problem_and_write_nothing(daemon, tmp_path):
    out = tmp_path / "x.ora"
    r = tessera(daemon, "upscale", str(tmp_path / "missing.png"), "-o", str(out))
    assert r.returncode == 1 and "missing.png" in r.stderr
    r = tessera(daemon, "upscale", SAMPLE, "-o", str(out), "--model", "no-such-model")
    assert r.returncode == 1 and "no-such-model" in r.stderr and "tessera models fetch" in r.stderr
    r = tessera(daemon, "upscale", SAMPLE, "-o", str(out), "--scale", "9")
    assert r.returncode == 1 and "scales" in r.stderr and "srgan-pair" in r.stderr
    assert not out.exists() and not (tmp_path / "x.ora.part").exists()


def test_models_lists_the_installed_models(daemon):
    r = tessera(daemon, "models")
    assert r.returncode == 0, r.stderr
    assert "classic" in r.stdout and "×4" in r.stdout


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("TIFF", "RGBA"), ("TIFF", "I;16"), ("PNG", "LA")])
def test_reads_jpeg_tiff_and_grey(daemon, tmp_path, fmt, mode):
    rng = np.random.default_rng(11)
    if mode == "I;16":
        arr = (rng.random((10, 14)) * 65535).astype(np.uint16)
        img = Image.fromarray(arr)
        top = 65535
    else:
        channels = {"RGB": 3, "RGBA": 4, "LA": 2}[mode]
        arr = rng.integers(0, 256, (10, 14, channels), dtype=np.uint8)
        arr[..., -1] = 255 if mode != "RGB" else arr[..., -1]
        img = Image.fromarray(arr, mode)
        top = 255
    src = tmp_path / ("in." + fmt.lower())
    # 4:4:4 JPEG: decoders differ in how they upsample chroma, which is not what this tests.
    img.save(src, fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))
    decoded = np.asarray(Image.open(src), dtype=np.float64)  # what was actually stored (JPEG is lossy)
    if decoded.ndim == 2:
        decoded = decoded[:, :, None]
    out = tmp_path / "o.ora"
    r = tessera(daemon, "upscale", str(src), "-o", str(out), "--scale", "2", "--model", "classic")
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(out) as zf:
        base = decode_png(zf.read("data/base.png")).astype(np.float64)
    assert base.shape[:2] == (20, 28) and base.shape[2] == decoded.shape[2]
    colour = decoded.shape[2] - (1 if mode in ("RGBA", "LA") else 0)
    exact = np.stack([np.asarray(Image.fromarray((decoded[:, :, ch] / top).astype(np.float32))
                                 .resize((28, 20), Image.Resampling.LANCZOS), dtype=np.float64) for ch in range(colour)], -1)
    # JPEG decoders may also round their IDCT differently by a level or two.
    tolerance = 3 if fmt == "JPEG" else 1
    assert np.abs(base[..., :colour] - np.clip(np.floor(exact * top + 0.5), 0, top)).max() <= tolerance


def test_default_is_srgan_pair_with_three_layers_in_the_ora(daemon, tmp_path):
    out = tmp_path / "default.ora"
    r = tessera(daemon, "upscale", SAMPLE, "-o", str(out), "--png-dir", str(tmp_path / "png"))
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(out) as zf:
        group = ET.fromstring(zf.read("stack.xml")).find("stack").find("stack")
        assert group.get("name") == "Tessera ×4 srgan-pair · chelsea"
        layers = group.findall("layer")
        # ORA lists the top layer first.
        assert [l.get("name") for l in layers] == [
            "Tessera ×4 · semantic detail", "Tessera ×4 · pixel detail", "Tessera ×4 · base"]
        assert [l.get("composite-op") for l in layers] == ["krita:grain_merge", "krita:grain_merge", "svg:src-over"]
        base = np.asarray(read_png(zf, "data/base.png"), dtype=np.float64) / 255
        pix = np.asarray(read_png(zf, "data/pixel_detail.png"), dtype=np.float64) / 255
        sem = np.asarray(read_png(zf, "data/semantic_detail.png"), dtype=np.float64) / 255
        merged = np.asarray(read_png(zf, "mergedimage.png"), dtype=np.float64) / 255
    # The merged image is what an editor shows: grain merge of the stored layers.
    expect = np.clip(np.clip(base + pix - 0.5, 0, 1) + sem - 0.5, 0, 1)
    assert np.abs(merged - expect).max() <= 1 / 255
    # The detail layers are not empty: the networks added detail.
    assert np.abs(sem - 0.5).mean() > 0.005 and np.abs(pix - 0.5).mean() > 0.005
