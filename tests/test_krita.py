"""The Krita adapter inside real Krita, headless under Xvfb, in both variants of the shared rig
(../shared/rigs/krita-rig.sh): Krita 5 with PyQt5 on the host, Krita 6 with PyQt6 in a sid
chroot (TESSERA_KRITA=6). The test drives the docker as a user would and compares the result's
projection with the daemon's own `x_full` for the same pixels.

Needs root and the rigs (`bash ../shared/rigs/krita-rig.sh setup`, and with TESSERA_KRITA=6);
.ci/run sets them up and sets TESSERA_REQUIRE_RIGS=1 so these tests fail rather than skip."""

import json
import os
import subprocess
import zipfile

import numpy as np
import pytest

import time

from harness import ROOT, Daemon, bin_dir, installed
from pngio import read_png
from test_gimp import cli_ora, daemon_render, daemon_x_full, ora_source, picture

RIG_DIR = os.environ.get("TESSERA_RIG_DIR") or "/var/tmp/tessera-rigs"
RIG = os.environ.get("TESSERA_KRITA_RIG") or next(
    (p for p in (os.path.join(os.path.dirname(ROOT), "shared", "rigs", "krita-rig.sh"), "/work/shared/rigs/krita-rig.sh")
     if os.path.isfile(p)), "krita-rig.sh")
READY = {"5": os.path.isdir(os.path.join(RIG_DIR, "krita", "home")),
         "6": os.path.isdir(os.path.join(RIG_DIR, "krita6", "root"))}
REQUIRED = bool(os.environ.get("TESSERA_REQUIRE_RIGS"))
VARIANTS = [pytest.param(v, marks=pytest.mark.skipif(not (READY[v] and os.path.isfile(RIG)) and not REQUIRED,
                                                      reason="the Krita %s rig is not set up" % v))
            for v in ("5", "6")]


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """pykrita after `tessera install`: Krita loads the installed copy (tessera_krita.desktop,
    tessera_krita/ with the client inside)."""
    return installed(tmp_path_factory.mktemp("krita-user"))["pykrita"]


def as_rgba_float(raw, depth, model, w, h):
    """Krita pixelData → float, RGBA (or grey-alpha) order."""
    channels = 4 if model == "RGBA" else 2
    if depth == "U8":
        a = np.frombuffer(raw, np.uint8).astype(np.float32) / 255
    elif depth == "U16":
        a = np.frombuffer(raw, np.uint16).astype(np.float32) / 65535
    elif depth == "F16":
        a = np.frombuffer(raw, np.float16).astype(np.float32)
    else:
        a = np.frombuffer(raw, np.float32)
    a = a.reshape(h, w, channels).copy()
    if depth in ("U8", "U16") and channels == 4:
        a[..., [0, 2]] = a[..., [2, 0]]
    return a


def run_krita(variant, tmp_path, plugin_dir, store, spec, runtime=None, script="t_docker.py"):
    """Runs a test script of tests/krita in Krita; the plugin starts its own daemon in the rig
    unless `runtime` names the folder of one already running."""
    out = tmp_path / "report.json"
    spec = dict(spec, out=str(out))
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TESSERA_KRITA=variant, TESSERA_RIG_BIND=ROOT, TESSERA_BIN_DIR=bin_dir(),
               TESSERA_MODEL_DIR=str(store), TESSERA_RUNTIME_DIR=str(runtime or tmp_path / "rt"))
    for attempt in range(3):
        r = subprocess.run(["bash", RIG, "run", str(plugin_dir), os.path.join(ROOT, "tests", "krita", script), str(spec_path)],
                           env=env, capture_output=True, text=True, timeout=900)
        # The rig's private Xvfb sometimes loses a race for its display with the previous
        # run's; Krita then aborts before the test script starts. That is the rig, not us.
        if "could not connect to display" not in r.stdout + r.stderr:
            break
    assert r.returncode == 0, "the Krita test script failed:\n" + r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads(out.read_text())

    def pixels(which, w, h):
        return as_rgba_float((tmp_path / ("report.json." + which)).read_bytes(), report["depth"], report["model"], w, h)
    return report, pixels


@pytest.mark.parametrize("variant", VARIANTS)
def test_8bit_upscale_matches_the_daemon_sliders_blend_and_exact_renders(variant, tmp_path, plugin_dir, store):
    report, pixels = run_krita(variant, tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGB"), "sliders": True, "exact": True})
    assert report["qt"] == int(variant)
    assert report["job"].startswith("done"), (report["job"], report["message"])
    assert report["status"].startswith("Connected: ")
    assert report["result_is_source"] and report["after"]["width"] == 160
    roles = {l["name"].split("· ")[-1]: l for l in report["layers"]}
    assert roles["base"]["blend"] == "normal"
    for role in ("pixel detail", "semantic detail"):
        assert roles[role]["blend"] == "grain_merge" and roles[role]["inherit_alpha"] and roles[role]["opacity"] == 255
    assert report["annotation"]["model"] == "srgan-pair"
    src = pixels("src", 40, 32)
    full, out = daemon_x_full(store, src)
    got = pixels("out", 160, 128)
    assert np.abs(got[..., :3] * 255 - np.round(np.clip(full[..., :3], 0, 1) * 255)).max() <= 1.0 + 1e-3
    # The sliders moved the two layers' opacities, and the picture with them.
    after = {l["name"].split("· ")[-1]: l["opacity"] for l in report["layers_after_sliders"]}
    assert (after["pixel detail"], after["semantic detail"]) == (round(255 * 0.3), round(255 * 0.7))
    a_pix, a_sem = after["pixel detail"] / 255, after["semantic detail"] / 255
    want = out["base"] + a_pix * out["pixel_detail"] + a_sem * out["semantic_detail"]
    got2 = pixels("out2", 160, 128)
    # Krita blends each layer at partial opacity in 8-bit integer arithmetic and rounds after
    # each: one more level than at full opacity.
    assert np.abs(got2[..., :3] * 255 - np.round(np.clip(want[..., :3], 0, 1) * 255)).max() <= 2.0 + 1e-3

    # Render exact at λ_sem 0.4 (pixel slider at 100): the semantic detail of the network
    # interpolated at 0.4 replaces the linear layer, at full opacity; the picture is that network's.
    assert report["exact_enabled"] and report["exact_job"].startswith("done"), (report["exact_job"], report["exact_message"])
    exact = {l["name"].split("· ")[-1]: l for l in report["layers_after_exact"]}
    assert exact["exact λ 0.40"]["opacity"] == 255 and exact["exact λ 0.40"]["blend"] == "grain_merge"
    assert exact["exact λ 0.40"]["visible"] and not exact["semantic detail"]["visible"]
    full_exact, _ = daemon_x_full(store, src, params={"dni": 0.4})
    got3 = pixels("exact", 160, 128)
    assert np.abs(got3[..., :3] * 255 - np.round(np.clip(full_exact[..., :3], 0, 1) * 255)).max() <= 1.0 + 1e-3
    # It differs from the linear blend at 0.4 (else the test could not tell them apart).
    linear = out["base"] + out["pixel_detail"] + 0.4 * out["semantic_detail"]
    assert np.abs(np.clip(linear, 0, 1) - np.clip(full_exact, 0, 1))[..., :3].max() * 255 > 4
    back = {l["name"].split("· ")[-1]: l for l in report["layers_after_moving_back"]}
    assert not back["exact λ 0.40"]["visible"] and back["semantic detail"]["visible"]
    assert back["semantic detail"]["opacity"] == round(255 * 0.6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_render_exact_with_pisa_is_the_daemons_render_at_both_sliders(variant, tmp_path, plugin_dir, pisa_store):
    report, pixels = run_krita(variant, tmp_path, plugin_dir, pisa_store, {
        "input": picture(tmp_path / "in.png", "RGB"), "engine": "pisa", "model": "pisa", "exact": True})
    assert report["job"].startswith("done"), (report["job"], report["message"])
    assert report["annotation"]["model"] == "pisa"
    # Render exact at (λ_pix, λ_sem) = (1.0, 0.4): PiSA-SR's picture from the job's latents, a
    # Normal layer over the hidden linear semantic detail.
    assert report["exact_enabled"] and report["exact_job"].startswith("done"), (report["exact_job"], report["exact_message"])
    exact = {l["name"].split("· ")[-1]: l for l in report["layers_after_exact"]}
    top = exact["exact λ 1.00/0.40"]
    assert top["visible"] and top["opacity"] == 255 and top["blend"] == "normal"
    assert not exact["semantic detail"]["visible"]
    want = daemon_render(pisa_store, pixels("src", 40, 32), 1.0, 0.4)
    got = pixels("exact", 160, 128)
    assert np.abs(got[..., :3] * 255 - np.round(np.clip(want[..., :3], 0, 1) * 255)).max() <= 1.0 + 1e-3
    back = {l["name"].split("· ")[-1]: l for l in report["layers_after_moving_back"]}
    assert not back["exact λ 1.00/0.40"]["visible"] and back["semantic detail"]["visible"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_render_exact_is_off_for_a_model_without_it(variant, tmp_path, plugin_dir, store):
    report, _ = run_krita(variant, tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGB"), "model": "realesrgan-x4plus", "new_document": True})
    assert report["job"].startswith("done"), (report["job"], report["message"])
    assert report["exact_enabled"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_float_document_into_a_new_document(variant, tmp_path, plugin_dir, store):
    report, pixels = run_krita(variant, tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGBA"), "depth": "F32", "new_document": True,
        "screenshot": str(tmp_path / "shot.png")})
    assert report["job"].startswith("done"), (report["job"], report["message"])
    assert report["depth"] == "F32" and not report["result_is_source"] and report["unchanged"]
    roles = {l["name"].split("· ")[-1]: l for l in report["layers"]}
    assert roles["pixel detail"]["blend"] == "add" and roles["semantic detail"]["inherit_alpha"]
    full, out = daemon_x_full(store, pixels("src", 40, 32))
    got = pixels("out", 160, 128)
    # Alpha is the base's; where there is colour it is base + both details.
    assert np.abs(got[..., 3] - out["base"][..., 3]).max() <= 1e-4
    seen = got[..., 3] > 0.05
    assert np.abs(got[..., :3] - full[..., :3])[seen].max() <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_selection_becomes_a_transparency_mask(variant, tmp_path, plugin_dir, store):
    report, pixels = run_krita(variant, tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGB"), "select": [0, 0, 20, 32]})
    assert report["job"].startswith("done"), (report["job"], report["message"])
    roles = {l["name"].split("· ")[-1]: l for l in report["layers"]}
    assert roles["base"]["children"] == []
    full, out = daemon_x_full(store, pixels("src", 40, 32))
    if report["krita"].startswith("5.1"):
        # Krita 5.1 makes no mask from a script's pixels: no mask, and the docker says so.
        assert roles["pixel detail"]["children"] == [] and "cannot make masks" in report["message"]
        return
    assert roles["pixel detail"]["children"] == ["transparencymask"] == roles["semantic detail"]["children"]
    got = pixels("out", 160, 128)[..., :3] * 255
    inside, outside = (slice(None), slice(0, 64)), (slice(None), slice(96, None))
    assert np.abs(got[inside] - np.round(np.clip(full[..., :3][inside], 0, 1) * 255)).max() <= 1.0 + 1e-3
    assert np.abs(got[outside] - np.round(np.clip(out["base"][..., :3][outside], 0, 1) * 255)).max() <= 1.0 + 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_cancel_stops_the_job_and_leaves_the_document(variant, tmp_path, plugin_dir, store):
    report, _ = run_krita(variant, tmp_path, plugin_dir, store, {
        "input": picture(tmp_path / "in.png", "RGB", size=(256, 256)), "model": "realesrgan-x4plus", "cancel": True})
    assert report["job"].startswith("cancelled"), (report["job"], report["message"])
    assert report["unchanged"] and "after" not in report


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_missing_model_says_how_to_install_it(variant, tmp_path, plugin_dir, tmp_path_factory):
    report, _ = run_krita(variant, tmp_path, plugin_dir, tmp_path_factory.mktemp("empty-store"), {
        "input": picture(tmp_path / "in.png", "RGB")})
    assert report["job"].startswith("failed"), report["job"]
    assert "tessera models fetch srgan-pair" in report["message"]
    assert report["unchanged"] and "after" not in report


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_jobs_queue_and_both_land(variant, tmp_path, plugin_dir, store):
    report, _ = run_krita(variant, tmp_path, plugin_dir, store, {"input": picture(tmp_path / "in.png", "RGB"), "twice": True})
    assert report["queued_at_once"] == 2
    assert [j.split(":")[0].split(" in ")[0] for j in report["jobs"]] == ["done", "done"], report["jobs"]
    # The first result scaled the document; the second, read before that, opened a new one.
    assert report["documents"] == 2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("depth, tolerance", [("U16", 1e-4), ("F16", 2e-3)])
def test_16bit_documents(variant, depth, tolerance, tmp_path, plugin_dir, store):
    report, pixels = run_krita(variant, tmp_path, plugin_dir, store, {"input": picture(tmp_path / "in.png", "RGB"), "depth": depth})
    assert report["job"].startswith("done"), (report["job"], report["message"])
    assert report["depth"] == depth
    full, _ = daemon_x_full(store, pixels("src", 40, 32))
    # F16 holds 11 significant bits in each stored layer.
    want = np.clip(full[..., :3], 0, 1 if depth == "U16" else None)
    assert np.abs(pixels("out", 160, 128)[..., :3] - want).max() <= tolerance


@pytest.mark.parametrize("variant", VARIANTS)
def test_krita_closing_mid_job_cancels_it(variant, tmp_path, plugin_dir, store):
    """The daemon runs outside Krita here, so it outlives it: when Krita closes during a job,
    the daemon sees its client go and stops the job long before it would have finished."""
    with Daemon(tmp_path / "rt", env={"TESSERA_MODEL_DIR": str(store)}) as d, d.client() as c:
        report, _ = run_krita(variant, tmp_path, plugin_dir, store, {
            "input": picture(tmp_path / "in.png", "RGB", size=(512, 512)), "model": "realesrgan-x4plus",
            "quit_mid_job": True}, runtime=tmp_path / "rt")
        assert report["job"].startswith("running"), report["job"]
        assert report["unchanged"]
        t0 = time.monotonic()
        while any(w["state"] == "busy" for w in c.list()["workers"]) and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        idle_after = time.monotonic() - t0
        log = open(d.log_path).read()
    # A 512² Real-ESRGAN job takes half a minute on an idle 2-core machine (more beside other
    # work); cancelled, the worker is free within a tile, a few seconds even under load.
    assert idle_after < 20, idle_after
    assert "was cancelled" in log


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind, model", [("8-bit RGB", "srgan-pair"), ("16-bit RGBA", "srgan-pair"), ("16-bit RGBA", "pisa")])
def test_a_tessera_ora_opens_as_tessera_wrote_it(variant, kind, model, tmp_path, plugin_dir, request):
    """File → Open on the CLI's .ora. Krita's own loader gives the detail layers Grain Merge but
    not inherit alpha (it cannot read both from an ORA) and makes every document 8-bit; Tessera's
    plugin restores both when the view opens, so the picture is the mergedimage.png Tessera
    wrote, soft edges included, at the file's depth, and the document is not marked modified.
    (16-bit PNGs carry an sRGB profile, else Krita would stop at a dialog for each layer.)
    PiSA-SR's file also holds the exact render at the λ given, hidden, as a Normal layer."""
    store = request.getfixturevalue("pisa_store" if model == "pisa" else "store")
    exact = ("--param", "lambda_pix=0.5", "--param", "lambda_sem=0.8") if model == "pisa" else ()
    ora = cli_ora(tmp_path, store, ora_source(tmp_path, kind), model, *exact)
    report, _ = run_krita(variant, tmp_path, plugin_dir, store, {"input": str(ora)}, script="t_open.py")
    depth = "U8" if kind.startswith("8") else "U16"
    assert report["depth"] == depth and report["model"] == "RGBA" and not report["modified"]
    (group,) = report["layers"]
    assert group["name"] == "Tessera ×4 %s · in" % model and group["type"] == "grouplayer"
    # Krita lists children bottom first.
    names = [c["name"].split("· ")[-1] for c in group["children"]]
    assert names[:3] == ["base", "pixel detail", "semantic detail"]
    base, pix, sem = group["children"][:3]
    if model == "pisa":
        (render,) = group["children"][3:]
        assert names[3].startswith("exact λ")
        assert render["blend"] == "normal" and not render["visible"] and not render["inherit_alpha"]
    else:
        assert len(names) == 3
    assert base["blend"] == "normal" and not base["inherit_alpha"]
    for layer in (pix, sem):
        assert layer["blend"] == "grain_merge" and layer["inherit_alpha"] and layer["opacity"] == 255
        assert layer["depth"] == depth
    with zipfile.ZipFile(ora) as zf:
        want = read_png(zf.read("mergedimage.png")).astype(np.float64)
    got = as_rgba_float((tmp_path / "report.json.composite").read_bytes(), report["depth"], report["model"],
                        report["width"], report["height"])
    top = 255.0 if depth == "U8" else 65535.0
    if want.shape[-1] == 4:
        assert np.abs(got[..., 3] * top - want[..., 3]).max() <= 0.5
        alpha = want[..., 3:] / top
    else:
        assert got[..., 3].min() == 1.0
        alpha = 1.0
    # Colour where a pixel shows. Krita's Grain Merge takes 127 of 255 as neutral where
    # Tessera and GIMP take 127.5: in 8 bits two detail layers come out one level brighter
    # (one 65535th per layer in 16 bits, where each layer also rounds).
    levels = (got[..., :3] * top - want[..., :3]) * alpha
    if depth == "U8":
        assert levels.min() >= -1e-3 and levels.max() <= 1.0 + 1e-3, (levels.min(), levels.max())
    else:
        assert np.abs(levels).max() <= 3.0, (levels.min(), levels.max())
