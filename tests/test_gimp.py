"""The GIMP 3 adapter inside real GIMP 3 (the rig in ../shared/rigs/gimp3-rig.sh, headless):
the plug-in is installed as GIMP requires, called through the PDB on real images, and what GIMP
then holds is compared with the daemon's own `x_full` for the same input pixels.

Needs root and the rig (`bash ../shared/rigs/gimp3-rig.sh setup`); .ci/run sets it up and sets
TESSERA_REQUIRE_RIGS=1 so that these tests fail rather than skip when it is missing."""

import json
import os
import subprocess
import zipfile

import numpy as np
import pytest
from PIL import Image

from harness import ROOT, Daemon, bin_dir, installed, tessera_cli
from pngio import read_png, write_png

# The rig .ci/run found and set up, else the shared folder beside the repository's.
RIG = os.environ.get("TESSERA_GIMP_RIG") or next(
    (p for p in (os.path.join(os.path.dirname(ROOT), "shared", "rigs", "gimp3-rig.sh"), "/work/shared/rigs/gimp3-rig.sh")
     if os.path.isfile(p)), "gimp3-rig.sh")
RIG_ROOT = os.path.join(os.environ.get("TESSERA_RIG_DIR") or "/var/tmp/tessera-rigs", "gimp3", "root")
READY = os.path.isfile(RIG) and os.path.isdir(RIG_ROOT) and os.geteuid() == 0

pytestmark = pytest.mark.skipif(not READY and not os.environ.get("TESSERA_REQUIRE_RIGS"),
                                reason="the GIMP 3 rig is not set up (bash %s setup, as root)" % RIG)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """The plug-ins folder of a GIMP 3 profile after `tessera install`: GIMP runs the installed
    copy (tessera-upscale/tessera-upscale.py, the client beside it)."""
    return installed(tmp_path_factory.mktemp("gimp-user"))["gimp_plugins"]


def picture(path, mode, size=(40, 32)):
    """A crop of the sample photo, with a gradient alpha for RGBA."""
    img = Image.open(os.path.join(ROOT, "docs", "sample", "chelsea.png")).convert("RGB")
    img = img.crop((120, 40, 120 + size[0], 40 + size[1]))
    if mode == "RGBA":
        a = np.tile(np.linspace(0, 255, size[0]).astype(np.uint8), (size[1], 1))
        img = Image.fromarray(np.dstack([np.asarray(img), a]), "RGBA")
    img.save(path)
    return str(path)


def run_gimp(tmp_path, plugin_dir, store, spec):
    spec = dict(spec, out=str(tmp_path / "report.json"), client_dir=os.path.join(ROOT, "adapters", "python"))
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TESSERA_RIG_BIND=ROOT, TESSERA_BIN_DIR=bin_dir(), TESSERA_MODEL_DIR=str(store),
               TESSERA_RUNTIME_DIR=str(tmp_path / "rt"))
    r = subprocess.run(["bash", RIG, "run", str(plugin_dir), os.path.join(ROOT, "tests", "gimp", "t_upscale.py"), str(spec_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, "the GIMP test script failed:\n" + r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())

    def pixels(which):
        meta = report[which]
        channels = len(meta["format"].split()[0].replace("'", ""))  # "R'G'B'A float" → 4
        raw = np.fromfile(spec["out"] + (".src.f32" if which == "source" else ".out.f32"), np.float32)
        return raw.reshape(meta["height"], meta["width"], channels)
    return report, pixels


def daemon_x_full(store, src, model="srgan-pair", scale=4, params=None):
    """base + pixel detail + semantic detail from the daemon on the host, in f32, for the
    same input pixels."""
    h, w, c = src.shape
    with Daemon(str(store) + "-ref-rt", env={"TESSERA_MODEL_DIR": str(store)}) as d, d.client() as cl:
        buf = cl.alloc(w, h, c, sample="f32")
        buf.write_pixels(np.ascontiguousarray(src, np.float32).tobytes())
        layers = cl.submit(model, scale, buf, params=params, output_sample="f32").wait(timeout=600)
        out = {l.role: np.frombuffer(l.buffer.read_pixels(), np.float32).reshape(h * scale, w * scale, c) for l in layers}
    full = out["base"] + out["pixel_detail"] + out["semantic_detail"]
    if c in (2, 4):
        full[..., -1] = out["base"][..., -1]
    return full, out


def test_8bit_rgb_scales_the_image_and_matches_the_daemon(tmp_path, plugin_dir, store):
    report, pixels = run_gimp(tmp_path, plugin_dir, store, {"input": picture(tmp_path / "in.png", "RGB")})
    assert report["status"] == "success", report.get("error")
    assert report["result_is_source"]
    after = report["after"]
    assert (after["width"], after["height"]) == (160, 128)
    group = after["layers"][0]
    assert group["name"] == "Background · Tessera ×4 srgan-pair"
    assert [c["name"] for c in group["children"]] == ["Tessera ×4 · semantic detail", "Tessera ×4 · pixel detail", "Tessera ×4 · base"]
    modes = {c["name"].split("· ")[-1]: c for c in group["children"]}
    assert modes["base"]["mode"] == "normal"
    for role in ("pixel detail", "semantic detail"):
        assert modes[role]["mode"] == "grain-merge"
        assert modes[role]["composite"] == "clip-to-backdrop"
        assert modes[role]["blend_space"] == "rgb-perceptual"
    assert group["parasite"]["model"] == "srgan-pair" and group["parasite"]["scale"] == 4
    # The rest of the image was scaled with it: the source layer is still there, below, hidden
    # (with alpha it would show through the result).
    assert after["layers"][1]["width"] == 160 and not after["layers"][1]["visible"]

    full, _ = daemon_x_full(store, pixels("source"))
    got = pixels("composite")  # the merged layer has alpha, opaque here
    assert got[..., 3].min() == 1.0
    want = np.round(np.clip(full, 0, 1) * 255)
    assert np.abs(got[..., :3] * 255 - want).max() <= 1.0 + 1e-3


def test_float_image_in_a_new_image_matches_within_1e4(tmp_path, plugin_dir, store):
    report, pixels = run_gimp(tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGB"), "precision": "FLOAT_LINEAR",
        "settings": {"new-image": True, "pixel-opacity": 60.0}})
    assert report["status"] == "success", report.get("error")
    assert not report["result_is_source"] and report["unchanged"]
    group = report["after"]["layers"][0]
    modes = {c["name"].split("· ")[-1]: c for c in group["children"]}
    assert modes["pixel detail"]["mode"] == "addition" and modes["pixel detail"]["blend_space"] == "rgb-linear"
    assert abs(modes["pixel detail"]["opacity"] - 60.0) < 1e-6
    src = pixels("source")
    full, out = daemon_x_full(store, src)
    want = out["base"] + 0.6 * out["pixel_detail"] + out["semantic_detail"]
    assert np.abs(pixels("composite")[..., :3] - want).max() <= 1e-4


def test_16bit_rgba_keeps_alpha_and_coverage(tmp_path, plugin_dir, store):
    report, pixels = run_gimp(tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGBA"), "precision": "U16_NON_LINEAR"})
    assert report["status"] == "success", report.get("error")
    full, out = daemon_x_full(store, pixels("source"))
    got = pixels("composite")
    # Alpha is the upscaled alpha: the detail layers add colour, never coverage.
    assert np.abs(got[..., 3] - np.clip(out["base"][..., 3], 0, 1)).max() <= 2 / 65535
    seen = got[..., 3] > 0.05
    err = np.abs(got[..., :3] - np.clip(full[..., :3], 0, 1))[seen]
    assert err.max() <= 1e-4 + 2 / 65535


def test_grey_half_float_image(tmp_path, plugin_dir, store):
    report, pixels = run_gimp(tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGB"), "grey": True, "precision": "HALF_PERCEPTUAL",
        "settings": {"model": "realesrgan-x4plus-anime"}})
    assert report["status"] == "success", report.get("error")
    assert report["source"]["format"] == "Y' float"
    modes = {c["name"].split("· ")[-1]: c["mode"] for c in report["after"]["layers"][0]["children"]}
    assert modes == {"base": "normal", "pixel detail": "addition", "semantic detail": "addition"}
    full, _ = daemon_x_full(store, pixels("source"), model="realesrgan-x4plus-anime")
    # Half floats hold 11 significant bits: each layer is stored to ±2⁻¹¹ relative.
    assert np.abs(pixels("composite")[..., :1] - full).max() <= 2e-3


def test_indexed_image_goes_to_a_new_rgb_image(tmp_path, plugin_dir, store):
    report, pixels = run_gimp(tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGB"), "indexed": True, "settings": {"new-image": True}})
    assert report["status"] == "success", report.get("error")
    assert report["unchanged"] and report["after"]["precision"] == "u8-non-linear"
    full, _ = daemon_x_full(store, pixels("source"))
    got = pixels("composite")[..., :3] * 255
    assert np.abs(got - np.round(np.clip(full, 0, 1) * 255)).max() <= 1.0 + 1e-3


def test_indexed_image_in_place_asks_for_rgb(tmp_path, plugin_dir, store):
    report, _ = run_gimp(tmp_path, plugin_dir, store, {"input": picture(tmp_path / "in.png", "RGB"), "indexed": True})
    assert report["status"] == "execution-error" and "convert it to RGB" in report["error"]
    assert report["unchanged"]


def test_a_selection_masks_the_detail(tmp_path, plugin_dir, store):
    report, pixels = run_gimp(tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGB"), "select": [0, 0, 20, 32]})
    assert report["status"] == "success", report.get("error")
    group = report["after"]["layers"][0]
    masks = {c["name"].split("· ")[-1]: c["mask"] for c in group["children"]}
    assert masks == {"base": False, "pixel detail": True, "semantic detail": True}
    full, out = daemon_x_full(store, pixels("source"))
    got = pixels("composite")[..., :3] * 255
    # The mask is the selection upscaled by bicubic: 2 input pixels (8 output) to settle.
    inside, outside = (slice(None), slice(0, 64)), (slice(None), slice(96, None))
    assert np.abs(got[inside] - np.round(np.clip(full[inside], 0, 1) * 255)).max() <= 1.0 + 1e-3
    assert np.abs(got[outside] - np.round(np.clip(out["base"][outside], 0, 1) * 255)).max() <= 1.0 + 1e-3


def test_exact_lambda_renders_the_interpolated_network(tmp_path, plugin_dir, store):
    report, pixels = run_gimp(tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGB"), "precision": "FLOAT_PERCEPTUAL",
        "settings": {"new-image": True, "exact": True, "semantic-opacity": 50.0}})
    assert report["status"] == "success", report.get("error")
    group = report["after"]["layers"][0]
    semantic = [c for c in group["children"] if c["name"].endswith("semantic detail")][0]
    assert semantic["opacity"] == 100.0 and group["parasite"]["exact"] is True
    full, _ = daemon_x_full(store, pixels("source"), params={"dni": 0.5})
    assert np.abs(pixels("composite")[..., :3] - full).max() <= 1e-4


def daemon_render(store, src, lambda_pix, lambda_sem, model="pisa", scale=4):
    """The daemon's exact render on the host at (λ_pix, λ_sem), in f32, for the same input."""
    h, w, c = src.shape
    with Daemon(str(store) + "-render-rt", env={"TESSERA_MODEL_DIR": str(store)}) as d, d.client() as cl:
        buf = cl.alloc(w, h, c, sample="f32")
        buf.write_pixels(np.ascontiguousarray(src, np.float32).tobytes())
        job = cl.submit(model, scale, buf, output_sample="f32")
        job.wait(timeout=600)
        (exact,) = cl.render(job, lambda_pix, lambda_sem, output_sample="f32").wait(timeout=600)
        return np.frombuffer(exact.buffer.read_pixels(), np.float32).reshape(h * scale, w * scale, c)


def test_exact_lambda_with_pisa_puts_the_render_on_top(tmp_path, plugin_dir, pisa_store):
    report, pixels = run_gimp(tmp_path, plugin_dir, pisa_store, {
        "input": picture(tmp_path / "in.png", "RGB"), "precision": "FLOAT_PERCEPTUAL",
        "settings": {"model": "pisa", "new-image": True, "exact": True, "pixel-opacity": 100.0, "semantic-opacity": 40.0}})
    assert report["status"] == "success", report.get("error")
    group = report["after"]["layers"][0]
    assert group["name"] == "Background · Tessera ×4 pisa"
    names = [c["name"] for c in group["children"]]
    assert names == ["Tessera ×4 · exact λ 1.00/0.40", "Tessera ×4 · semantic detail", "Tessera ×4 · pixel detail", "Tessera ×4 · base"]
    top = group["children"][0]
    assert top["mode"] == "normal" and top["opacity"] == 100.0
    want = daemon_render(pisa_store, pixels("source"), 1.0, 0.4)
    assert np.abs(pixels("composite")[..., :3] - want).max() <= 1e-4


def test_exact_lambda_on_a_model_without_it_says_so(tmp_path, plugin_dir, store):
    report, _ = run_gimp(tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGB"), "settings": {"model": "realesrgan-x4plus", "exact": True}})
    assert report["status"] == "execution-error" and "offers no exact render" in report["error"]
    assert report["unchanged"]


def test_a_missing_model_names_the_install_command_and_leaves_the_image(tmp_path, plugin_dir, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty-store")
    report, _ = run_gimp(tmp_path, plugin_dir, empty, {"input": picture(tmp_path / "in.png", "RGB")})
    assert report["status"] == "execution-error"
    assert "tessera models fetch srgan-pair" in report["error"]
    assert report["unchanged"]


def test_cancel_kills_the_job_and_leaves_the_image(tmp_path, plugin_dir, store):
    report, _ = run_gimp(tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGB", size=(256, 256)), "cancel": True,
        "settings": {"model": "realesrgan-x4plus"}})
    assert "killed" in report, report
    assert report["status"] != "success"
    assert report["unchanged"]
    # The daemon noticed its client was gone and stopped the job within a tile or so.
    assert report["idle_after_s"] < 20


def test_one_undo_restores_the_original(tmp_path, plugin_dir, store):
    """In GIMP's GUI (Xvfb, twm): upscale, press Ctrl+Z once in the image window, and the image
    is back as it was: the whole change is one undo step."""
    spec = {"input": picture(tmp_path / "in.png", "RGB"), "ready": str(tmp_path / "ready"),
            "undone": str(tmp_path / "undone"), "out": str(tmp_path / "undo.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, TESSERA_RIG_BIND=ROOT)
    inner = "export TESSERA_BIN_DIR=%s TESSERA_MODEL_DIR=%s TESSERA_RUNTIME_DIR=%s; bash %s %s %s" % (
        bin_dir(), store, tmp_path / "rt", os.path.join(ROOT, "tests", "gimp", "undo_gui.sh"), plugin_dir, tmp_path / "spec.json")
    r = subprocess.run(["bash", RIG, "shell", "bash", "-c", inner], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "undo.json").read_text())
    assert report.get("status") == "success", report
    assert report["before"] == {"size": [40, 32], "layers": [["Background", True]]}
    assert report["after"]["size"] == [160, 128] and len(report["after"]["layers"]) == 2
    assert report["after_undo"] == report["before"]


def cli_ora(tmp_path, store, src, model="srgan-pair", *args):
    """`tessera upscale SRC -o OUT.ora --model MODEL ARGS...` as a user runs it."""
    out = tmp_path / "cli.ora"
    with Daemon(tmp_path / "cli-rt", env={"TESSERA_MODEL_DIR": str(store)}) as d:
        r = tessera_cli(dict(os.environ, TESSERA_MODEL_DIR=str(store)), "--socket", d.socket,
                        "upscale", src, "-o", str(out), "--model", model, *args)
    assert r.returncode == 0, r.stderr
    return out


def ora_source(tmp_path, kind):
    """The test picture as "8-bit RGB", "16-bit RGB" or "16-bit RGBA" (with its soft edges)."""
    if kind == "8-bit RGB":
        return picture(tmp_path / "in.png", "RGB")
    mode = kind.split()[-1]
    pixels = np.asarray(Image.open(picture(tmp_path / "in8.png", mode)), np.uint16) * 257
    src = str(tmp_path / "in.png")
    write_png(src, pixels)
    return src


@pytest.mark.parametrize("kind", ["8-bit RGB", "16-bit RGB", "16-bit RGBA"])
def test_a_tessera_ora_opens_with_its_blend_modes(tmp_path, plugin_dir, store, kind):
    """File → Open on the CLI's .ora: the detail layers are Grain Merge (GIMP's own loader
    would make them Normal), the bit depth is the file's, and GIMP's composite is the one
    Tessera wrote as mergedimage.png (with transparency too: each detail layer weighed by its
    own alpha, clipped to the base's)."""
    ora = cli_ora(tmp_path, store, ora_source(tmp_path, kind))
    report, pixels = run_gimp(tmp_path, plugin_dir, store, {"open": str(ora)})
    after = report["after"]
    assert after["precision"] == ("u8-non-linear" if kind == "8-bit RGB" else "u16-non-linear")
    group = after["layers"][0]
    assert group["name"] == "Tessera ×4 srgan-pair · in"
    children = {c["name"].split("· ")[-1]: c for c in group["children"]}
    assert [c["name"].split("· ")[-1] for c in group["children"]] == ["semantic detail", "pixel detail", "base"]
    assert children["base"]["mode"] == "normal"
    for role in ("pixel detail", "semantic detail"):
        assert children[role]["mode"] == "grain-merge"
        assert children[role]["blend_space"] == "rgb-perceptual"
        assert children[role]["composite"] == "clip-to-backdrop"
    with zipfile.ZipFile(ora) as zf:
        want = read_png(zf.read("mergedimage.png"))
    top = 255.0 if want.dtype == np.uint8 else 65535.0
    got = pixels("composite")
    if want.shape[-1] == 3:
        assert got[..., 3].min() == 1.0
    else:
        assert np.abs(got[..., 3] * top - want[..., 3]).max() <= 0.5
    # Colour where a pixel shows (premultiplied: where alpha is 0 colour means nothing).
    alpha = want[..., 3:] / top if want.shape[-1] == 4 else 1.0
    levels = np.abs(got[..., :3] * top - want[..., :3]) * alpha
    assert levels.max() <= 1.0 + 1e-3, levels.max()


def test_an_ora_without_krita_modes_opens_through_gimps_own_loader(tmp_path, plugin_dir, store):
    png = tmp_path / "layer.png"
    write_png(str(png), np.full((8, 12, 3), 40000, np.uint16))
    ora = tmp_path / "plain.ora"
    with zipfile.ZipFile(ora, "w") as zf:
        zf.writestr("mimetype", "image/openraster", compress_type=zipfile.ZIP_STORED)
        zf.writestr("stack.xml", '<?xml version="1.0"?><image w="12" h="8"><stack>'
                    '<layer name="flat" src="data/flat.png" composite-op="svg:multiply" opacity="0.5"/></stack></image>')
        zf.write(png, "data/flat.png")
    report, _ = run_gimp(tmp_path, plugin_dir, store, {"open": str(ora)})
    after = report["after"]
    # GIMP's own loader makes every image 8-bit (Tessera's would have kept the 16 bits).
    assert after["precision"] == "u8-non-linear"
    (layer,) = after["layers"]
    assert (layer["name"], layer["mode"], layer["opacity"]) == ("flat", "multiply", 50.0)
