"""Tessera's .ora files (`tessera upscale IN -o OUT.ora`) opened in Krita.

Krita's OpenRaster loader cannot give a layer both a blend mode and inherit alpha: it reads
`svg:src-atop` as Normal with inherit alpha, so the detail layers (`krita:grain_merge`) come in
without it. Without it a detail layer's own alpha is added to the base's, and semi-transparent
edges turn more opaque than the picture Tessera wrote (mergedimage.png). And it makes every
document 8-bit: 16-bit layers keep their depth but are blended in 8 bits, a few levels off.
When a view of a .ora opens, the detail layers of each Tessera group get inherit alpha back, as
the docker's own results have it, and the document takes the depth and profile of the deepest
Tessera layer. Only once per opening, so a user who changes either again keeps the change."""

from krita import Krita

from .qt import QTimer

GROUP_PREFIX = "Tessera ×"
# Krita's ids for the blends residual layers travel with (the layer contract's grain_merge and
# addition; Krita reads the ORA's svg:plus as "add").
RESIDUAL_BLENDS = ("grain_merge", "add")
DEPTHS = ("U8", "U16", "F16", "F32")


def tessera_layers(doc):
    """The paint layers of every Tessera group in `doc` (groups nested anywhere)."""
    found, todo = [], list(doc.topLevelNodes())
    while todo:
        node = todo.pop()
        if node.type() != "grouplayer":
            continue
        children = node.childNodes()
        if node.name().startswith(GROUP_PREFIX):
            found += [c for c in children if c.type() == "paintlayer"]
        todo += children
    return found


def fix_tessera_ora(doc):
    """Gives the detail layers of Tessera groups inherit alpha and the document the depth of
    its deepest Tessera layer. The document stays unmodified: this is how the file is meant to
    be seen, not an edit."""
    def rank(depth):
        return DEPTHS.index(depth) if depth in DEPTHS else -1
    layers = tessera_layers(doc)
    detail = [l for l in layers if l.blendingMode() in RESIDUAL_BLENDS and not l.inheritAlpha()]
    deepest = max(layers, key=lambda l: rank(l.colorDepth()), default=None)
    deeper = deepest is not None and rank(doc.colorDepth()) >= 0 and rank(deepest.colorDepth()) > rank(doc.colorDepth())
    if not detail and not deeper:
        return
    was_modified = doc.modified()
    for layer in detail:
        layer.setInheritAlpha(True)
    if deeper:
        doc.setColorSpace(deepest.colorModel(), deepest.colorDepth(), deepest.colorProfile())
    doc.refreshProjection()
    doc.waitForDone()
    doc.setModified(was_modified)
    # The conversion's undo step lands from the event loop, marking the document modified
    # again after this returns: clear it once more from there.
    QTimer.singleShot(0, lambda: doc.setModified(was_modified))


class OraWatch(object):
    """Fixes each .ora document when its first view opens (a view exists only once the file
    has loaded; Krita adds documents before loading in some versions). The fix runs from the
    event loop, after the view is made: waiting for the image inside Krita's view-created
    signal hangs Krita."""

    def __init__(self, app):
        self.seen = set()
        notifier = app.notifier()
        notifier.setActive(True)
        notifier.viewCreated.connect(self.view_created)
        notifier.imageClosed.connect(self.seen.discard)

    def view_created(self, view):
        doc = view.document()
        path = doc.fileName() if doc is not None else ""
        if not path.lower().endswith(".ora") or path in self.seen:
            return
        self.seen.add(path)
        QTimer.singleShot(0, lambda: self.fix(path))

    @staticmethod
    def fix(path):
        for doc in Krita.instance().documents():
            if doc.fileName() == path:
                fix_tessera_ora(doc)


def watch():
    """Called once at plugin load. The watcher is kept on the module so it lives as long as Krita."""
    global WATCH
    WATCH = OraWatch(Krita.instance())


WATCH = None
