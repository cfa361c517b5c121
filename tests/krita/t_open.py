# Runs INSIDE Krita (see t_docker.py). Argument: a JSON spec {"input", "out"}. Opens the file
# as File → Open does (a document, then a view: Tessera's plugin acts when the view opens) and
# writes spec["out"] (JSON: depth, the layer tree) with the projection's raw pixels beside it
# (.composite).
import json
import sys

from krita import Krita

spec = json.load(open(sys.argv[1]))
app = Krita.instance()
doc = app.openDocument(spec["input"])
assert doc is not None, "could not open " + spec["input"]
WINDOW.addView(doc)
rig_wait(300)
doc.waitForDone()


def tree(nodes):
    return [{"name": n.name(), "type": n.type(), "blend": n.blendingMode(), "opacity": n.opacity(),
             "inherit_alpha": n.inheritAlpha(), "visible": n.visible(), "depth": n.colorDepth(),
             "children": tree(n.childNodes())} for n in nodes]


report = {"krita": app.version(), "qt": RIG_QT_MAJOR, "width": doc.width(), "height": doc.height(),
          "depth": doc.colorDepth(), "model": doc.colorModel(), "modified": doc.modified(),
          "layers": tree(doc.topLevelNodes())}
with open(spec["out"] + ".composite", "wb") as f:
    f.write(bytes(doc.pixelData(0, 0, doc.width(), doc.height())))
with open(spec["out"], "w") as f:
    json.dump(report, f)
doc.setModified(False)
