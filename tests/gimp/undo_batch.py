"""GIMP 3 GUI batch side of the undo test (tests/gimp/undo_gui.sh): opens the image in a
window, runs Tessera Upscale, says so, waits while the other side presses Ctrl+Z in the image
window, then reports the image before, after and after the undo. $TESSERA_UNDO_SPEC names the
spec: input, ready, undone, out."""

import json
import os
import time

import gi

gi.require_version("Gimp", "3.0")
from gi.repository import Gimp, Gio  # noqa: E402

spec = json.load(open(os.environ["TESSERA_UNDO_SPEC"]))


def state(image):
    return {"size": [image.get_width(), image.get_height()],
            "layers": [(l.get_name(), l.get_visible()) for l in image.get_layers()]}


report = {}
try:
    image = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(spec["input"]))
    Gimp.Display.new(image)
    Gimp.displays_flush()
    report["before"] = state(image)
    proc = Gimp.get_pdb().lookup_procedure("plug-in-tessera-upscale")
    config = proc.create_config()
    config.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    config.set_property("image", image)
    config.set_core_object_array("drawables", image.get_layers())
    report["status"] = proc.run(config).index(0).value_nick
    Gimp.displays_flush()
    report["after"] = state(image)
    open(spec["ready"], "w").write("ready")
    deadline = time.monotonic() + 60
    while not os.path.exists(spec["undone"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    report["after_undo"] = state(image)
except Exception as e:  # reported, and the test fails on it
    report["error"] = repr(e)
with open(spec["out"], "w") as f:
    json.dump(report, f)
