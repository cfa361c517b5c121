# Runs INSIDE Krita (the rig's driver execs it on the GUI thread; globals WINDOW, rig_wait,
# rig_screenshot, RIG_QT_MAJOR). Argument: a JSON spec (see tests/test_krita.py). Opens the
# input, drives the Tessera docker as a user would (model, scale, Upscale, Cancel, sliders)
# and writes spec["out"] (JSON) with raw pixel dumps beside it: the source layer (.src) and
# the result's projection (.out, .out2 after moving the sliders, .exact after Render exact).
import json
import sys
import time

from krita import Krita, Selection

spec = json.load(open(sys.argv[1]))
app = Krita.instance()
doc = app.openDocument(spec["input"])
assert doc is not None, "could not open " + spec["input"]
WINDOW.addView(doc)
WINDOW.qwindow().setGeometry(0, 0, 1440, 900)
doc.setBatchmode(True)
rig_wait(300)
if spec.get("depth"):
    assert doc.setColorSpace("RGBA", spec["depth"], doc.colorProfile()), "setColorSpace failed"
    doc.waitForDone()
if spec.get("select"):
    sel = Selection()
    sel.select(*spec["select"], 255)
    doc.setSelection(sel)
source = doc.activeNode() or doc.topLevelNodes()[0]
doc.setActiveNode(source)


def dump(node_or_doc, path, w, h):
    with open(path, "wb") as f:
        f.write(bytes(node_or_doc.pixelData(0, 0, w, h)))


def layers(group):
    out = []
    for n in group.childNodes():
        out.append({"name": n.name(), "type": n.type(), "blend": n.blendingMode(), "opacity": n.opacity(),
                    "inherit_alpha": n.inheritAlpha(), "visible": n.visible(),
                    "children": [c.type() for c in n.childNodes()]})
    return out


def snapshot(d):
    return {"width": d.width(), "height": d.height(), "nodes": [n.name() for n in d.topLevelNodes()]}


report = {"krita": app.version(), "qt": RIG_QT_MAJOR, "depth": source.colorDepth(), "model": source.colorModel(), "before": snapshot(doc)}
dump(source, spec["out"] + ".src", doc.width(), doc.height())

docks = [d for d in app.dockers() if d.objectName().startswith("tessera_docker")]
assert docks, sorted(d.objectName() for d in app.dockers())
docker = docks[0]
docker.show()
docker.raise_()
deadline = time.monotonic() + 90
while docker.model.count() == 0 and time.monotonic() < deadline:
    rig_wait(100)
report["status"] = docker.status.text()
assert docker.model.count() > 0, "no models listed: " + docker.status.text()
index = docker.model.findData(spec.get("engine", "cnn") + "/" + spec.get("model", "srgan-pair"))
assert index >= 0
docker.model.setCurrentIndex(index)
docker.scale.setValue(spec.get("scale", 4))
docker.new_document.setChecked(bool(spec.get("new_document")))

docker.upscale_button.click()


def quit_mid_job():
    # Krita closes while the job runs: the script ends here and the rig quits Krita.
    deadline = time.monotonic() + 120
    while docker.runs and not docker.runs[0].item.text().startswith("running") and time.monotonic() < deadline:
        rig_wait(50)
    report["job"] = docker.jobs.item(0).text()
    report["unchanged"] = snapshot(doc) == report["before"]
    with open(spec["out"], "w") as f:
        json.dump(report, f)
    for d in app.documents():
        d.setModified(False)


def the_rest():
    if spec.get("twice"):
        # A second job queued behind the first: it lands in a new document (the first scales this one).
        docker.upscale_button.click()
        report["queued_at_once"] = len(docker.runs)
    if spec.get("cancel"):
        deadline = time.monotonic() + 120
        while docker.runs and docker.runs[0].job is None and time.monotonic() < deadline:
            rig_wait(50)
        rig_wait(500)
        docker.cancel_button.click()
    deadline = time.monotonic() + 600
    while docker.runs and time.monotonic() < deadline:
        rig_wait(100)
    report["job"] = docker.jobs.item(0).text()
    report["jobs"] = [docker.jobs.item(i).text() for i in range(docker.jobs.count())]
    report["documents"] = len(app.documents())
    report["message"] = docker.message.text()
    report["progress"] = docker.progress.format()
    report["unchanged"] = snapshot(doc) == report["before"]
    if docker.last is not None:
        target, group = docker.last.doc, docker.last.group
        report["result_is_source"] = target == doc
        report["after"] = snapshot(target)
        report["group"] = group.name()
        report["layers"] = layers(group)
        report["exact_enabled"] = docker.exact_button.isEnabled()
        try:
            report["annotation"] = json.loads(bytes(target.annotation("tessera")).decode())
        except Exception as e:
            report["annotation"] = repr(e)
        dump(target, spec["out"] + ".out", target.width(), target.height())
        if spec.get("sliders"):
            docker.pixel_slider.setValue(30)
            docker.semantic_slider.setValue(70)
            rig_wait(200)
            target.waitForDone()
            report["layers_after_sliders"] = layers(group)
            dump(target, spec["out"] + ".out2", target.width(), target.height())
        if spec.get("exact"):
            docker.pixel_slider.setValue(100)
            docker.semantic_slider.setValue(40)
            docker.exact_button.click()
            deadline = time.monotonic() + 600
            while docker.runs and time.monotonic() < deadline:
                rig_wait(100)
            target.waitForDone()
            report["exact_job"] = docker.jobs.item(0).text()
            report["exact_message"] = docker.message.text()
            report["layers_after_exact"] = layers(group)
            dump(target, spec["out"] + ".exact", target.width(), target.height())
            # Moving the semantic slider again goes back to the linear blend.
            docker.semantic_slider.setValue(60)
            rig_wait(200)
            report["layers_after_moving_back"] = layers(group)
        if spec.get("screenshot"):
            target.setActiveNode(group)
            if spec.get("zoom"):
                WINDOW.activeView().canvas().setZoomLevel(spec["zoom"])
            rig_wait(1500)
            rig_screenshot(spec["screenshot"])
    with open(spec["out"], "w") as f:
        json.dump(report, f)
    for d in app.documents():
        d.setModified(False)


if spec.get("quit_mid_job"):
    quit_mid_job()
else:
    the_rest()
