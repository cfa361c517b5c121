"""Runs inside real GIMP 3 (the rig's python-fu-eval batch interpreter): loads an image, sets
it up as the spec says, calls Tessera Upscale through the PDB and reports what GIMP then
holds. Argument: a JSON spec (see tests/test_gimp.py); writes `spec["out"]` (JSON) and, next
to it, the raw float pixels of the source layer (`.src.f32`) and of the result's composite
(`.out.f32`), both in the document's own space. With `spec["open"]` it only opens that file
(File → Open: GIMP picks the loader) and reports the image and its composite."""

import array
import json
import os
import signal
import sys
import threading
import time

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp, Gio  # noqa: E402

spec = json.load(open(sys.argv[1]))
Gegl.init(None)


def babl(image, drawable, alpha):
    nick = image.get_precision().value_nick
    prime = "" if nick.endswith("-linear") and not nick.endswith("-non-linear") else "'"
    name = ("Y" + prime) if drawable.is_gray() else "R{0}G{0}B{0}".format(prime)
    return "%s%s float" % (name, "A" if alpha else "")


def dump(image, drawable, path):
    rect = Gegl.Rectangle.new(0, 0, drawable.get_width(), drawable.get_height())
    fmt = babl(image, drawable, drawable.has_alpha())
    with open(path, "wb") as f:
        f.write(bytes(drawable.get_buffer().get(rect, 1.0, fmt, Gegl.AbyssPolicy.CLAMP)))
    return {"width": drawable.get_width(), "height": drawable.get_height(), "format": fmt}


def tree(items):
    out = []
    for item in items:
        entry = {"name": item.get_name(), "width": item.get_width(), "height": item.get_height(),
                 "visible": item.get_visible()}
        if isinstance(item, Gimp.GroupLayer):
            entry["children"] = tree(item.get_children())
            parasite = item.get_parasite("tessera-settings")
            if parasite is not None:
                entry["parasite"] = json.loads(bytes(parasite.get_data()).decode())
        else:
            entry.update(mode=item.get_mode().value_nick, opacity=item.get_opacity(),
                         composite=item.get_composite_mode().value_nick,
                         blend_space=item.get_blend_space().value_nick, mask=item.get_mask() is not None)
        out.append(entry)
    return out


def snapshot(image):
    return {"width": image.get_width(), "height": image.get_height(), "precision": image.get_precision().value_nick,
            "layers": tree(image.get_layers())}


def kill_plugin_when_busy(report):
    """What GIMP does when the user cancels a plug-in's progress: it kills the plug-in."""
    sys.path.insert(0, spec["client_dir"])
    import tessera_client
    deadline = time.monotonic() + 60
    with _wait_connect(tessera_client) as c:
        while time.monotonic() < deadline:
            if any(w["state"] == "busy" for w in c.list()["workers"]):
                break
            time.sleep(0.05)
        for pid in os.listdir("/proc"):
            try:
                cmd = open("/proc/%s/cmdline" % pid, "rb").read()
            except (OSError, ValueError):
                continue
            if b"tessera-upscale.py" in cmd and pid.isdigit():
                os.kill(int(pid), signal.SIGKILL)
                report["killed"] = int(pid)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            if all(w["state"] != "busy" for w in c.list()["workers"]):
                report["idle_after_s"] = time.monotonic() - t0
                break
            time.sleep(0.05)


def _wait_connect(tessera_client):
    deadline = time.monotonic() + 60
    while True:
        try:
            return tessera_client.Client.connect(autostart=False, timeout=10)
        except tessera_client.TesseraError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def merged(image, path):
    dup = image.duplicate()
    layer = dup.merge_visible_layers(Gimp.MergeType.CLIP_TO_IMAGE)
    out = dump(dup, layer, path)
    dup.delete()
    return out


if spec.get("open"):
    # Only open a file, as File → Open does (whichever loader GIMP picks), and report it.
    image = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(spec["open"]))
    report = {"after": snapshot(image), "composite": merged(image, spec["out"] + ".out.f32")}
    with open(spec["out"], "w") as f:
        json.dump(report, f)
else:
    image = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(spec["input"]))
    if spec.get("grey"):
        image.convert_grayscale()
    if spec.get("indexed"):
        image.convert_indexed(Gimp.ConvertDitherType.NONE, Gimp.ConvertPaletteType.GENERATE, 64, False, False, "")
    if spec.get("precision"):
        image.convert_precision(getattr(Gimp.Precision, spec["precision"]))
    if spec.get("select"):
        image.select_rectangle(Gimp.ChannelOps.REPLACE, *spec["select"])
    source = image.get_layers()[0]
    report = {"before": snapshot(image), "source": dump(image, source, spec["out"] + ".src.f32")}

    proc = Gimp.get_pdb().lookup_procedure("plug-in-tessera-upscale")
    assert proc is not None, "plug-in-tessera-upscale is not registered"
    config = proc.create_config()
    config.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    config.set_property("image", image)
    config.set_core_object_array("drawables", [source])
    for key, value in spec.get("settings", {}).items():
        config.set_property(key, value)

    killer = None
    if spec.get("cancel"):
        killer = threading.Thread(target=kill_plugin_when_busy, args=(report,))
        killer.start()
    t0 = time.monotonic()
    result = proc.run(config)
    report["seconds"] = time.monotonic() - t0
    if killer is not None:
        killer.join()
    report["status"] = result.index(0).value_nick
    if result.index(0) != Gimp.PDBStatusType.SUCCESS:
        report["error"] = str(result.index(1)) if result.length() > 1 else ""
    else:
        out_image = result.index(1)
        report["result_is_source"] = out_image == image
        report["after"] = snapshot(out_image)
        report["composite"] = merged(out_image, spec["out"] + ".out.f32")
    report["unchanged"] = snapshot(image) == report["before"]
    with open(spec["out"], "w") as f:
        json.dump(report, f)
