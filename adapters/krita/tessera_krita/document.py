"""Krita's side of a job: the active layer's pixels in the form the daemon takes, and the result
written back as a group of layers per the layer contract. Runs on Krita's GUI thread; knows
nothing of widgets or sockets."""

import array
import json
import struct

# Krita's colour depth → the sample types pixels travel in, to the daemon and back. Integer
# results come back as 0.5 + R (blended with Grain Merge), float ones signed (Addition).
# 8-bit results travel as u16 because Krita's Grain Merge subtracts 127/255, not 0.5: the
# adapter re-quantises them (`U8_RESIDUAL`), else each detail layer would be half a level off.
SAMPLES = {"U8": "u8", "U16": "u16", "F16": "f32", "F32": "f32"}
RESULT_SAMPLES = {"U8": "u16", "U16": "u16", "F16": "f32", "F32": "f32"}
TYPECODES = {"u8": "B", "u16": "H", "f32": "f"}
# u16 sample v → u8: the base rounds v·255/65535; a residual v = 65535·(0.5 + R) becomes
# 127 + 255·R = v·255/65535 − 0.5, rounded: the floor of v·255/65535 (Krita's half value for
# 8 bits is 127).
U8_BASE = bytes(int(v * 255 / 65535 + 0.5) for v in range(65536))
U8_RESIDUAL = bytes(int(v * 255 / 65535) for v in range(65536))
ANNOTATION = "tessera"


class Failure(Exception):
    """A message for the user; the document has not been touched."""


class Source(object):
    """The active paint layer of `doc`, over the whole canvas."""

    def __init__(self, doc, node):
        if node is None or node.type() != "paintlayer":
            raise Failure("Select a paint layer to upscale.")
        self.doc, self.node = doc, node
        self.depth, self.model = node.colorDepth(), node.colorModel()
        if self.depth not in SAMPLES or self.model not in ("RGBA", "GRAYA"):
            raise Failure("Tessera upscales RGB and grey layers of 8/16-bit integer or 16/32-bit float "
                          "depth; this layer is %s %s (convert it with Image → Convert Image Colour Space)."
                          % (self.model, self.depth))
        self.width, self.height = doc.width(), doc.height()
        self.resolution = doc.resolution()
        self.channels = 4 if self.model == "RGBA" else 2
        self.sample = SAMPLES[self.depth]
        self.result_sample = RESULT_SAMPLES[self.depth]

    def pixels(self):
        """Interleaved samples in the daemon's channel order (RGBA / grey-alpha)."""
        raw = bytes(self.node.pixelData(0, 0, self.width, self.height))
        if self.depth == "F16":
            n = len(raw) // 2
            raw = array.array("f", struct.unpack("<%de" % n, raw)).tobytes()
        return swap_red_blue(raw, self.sample, self.channels) if self.integer else raw

    @property
    def integer(self):
        return self.depth in ("U8", "U16")

    def selection(self):
        """The document's selection over the canvas, one byte a pixel, or None."""
        sel = self.doc.selection()
        if sel is None:
            return None
        return bytes(sel.pixelData(0, 0, self.width, self.height))


def swap_red_blue(data, sample, channels):
    """RGBA ⇄ BGRA (Krita's order for integer RGB pixels); grey is left alone."""
    if channels != 4:
        return data
    values = array.array(TYPECODES[sample])
    values.frombytes(data)
    red = values[0::4]
    values[0::4] = values[2::4]
    values[2::4] = red
    return values.tobytes()


def opaque(data, sample, channels):
    """The same pixels with alpha at full (residual layers take their coverage from the
    layers below: they inherit alpha)."""
    values = array.array(TYPECODES[sample])
    values.frombytes(data)
    full = {"u8": 255, "u16": 65535, "f32": 1.0}[sample]
    n = len(values) // channels
    values[channels - 1::channels] = array.array(TYPECODES[sample], [full]) * n
    return values.tobytes()


def to_layer_bytes(source, data, residual):
    """A result layer's samples from the daemon → the bytes `setPixelData` takes for the
    source's depth; a residual made opaque (it inherits alpha from the layers below)."""
    sample = source.result_sample
    if source.depth == "U8":
        values = array.array("H")
        values.frombytes(data)
        data, sample = bytes(map((U8_RESIDUAL if residual else U8_BASE).__getitem__, values)), "u8"
    if residual:
        data = opaque(data, sample, source.channels)
    if source.integer:
        return swap_red_blue(data, sample, source.channels)
    if source.depth == "F16":
        values = array.array("f")
        values.frombytes(data)
        return struct.pack("<%de" % len(values), *values)
    return data


def group_name(source, settings):
    return "%s · Tessera ×%d %s" % (source.node.name(), settings["scale"], settings["model"])


def write_result(app, window, source, settings, layers, mask):
    """Adds the result to the source document (scaled) or to a new one, and returns the group.
    `layers`: (role, name, blend, width, height, bytes) bottom first; `mask`: the upscaled
    selection (one byte a pixel) or None."""
    doc, s = source.doc, settings["scale"]
    width, height = source.width * s, source.height * s
    # An earlier result may have scaled the document since this job read it: then this one
    # opens as a new document rather than scaling it again.
    changed = (doc.width(), doc.height()) != (source.width, source.height)
    settings = dict(settings, new_document=settings["new_document"] or changed)
    if settings["new_document"]:
        target = app.createDocument(width, height, group_name(source, settings), source.model,
                                    source.depth, doc.colorProfile(), doc.resolution())
        for node in target.topLevelNodes():
            node.remove()
        parent, above = target.rootNode(), None
        if window is not None:
            window.addView(target)
    else:
        target = doc
        doc.scaleImage(width, height, doc.resolution(), doc.resolution(), "Bicubic")
        doc.waitForDone()
        parent, above = source.node.parentNode(), source.node
    group = target.createGroupLayer(group_name(source, settings))
    parent.addChildNode(group, above)
    below = None
    opacity = {"pixel_detail": settings["pixel_opacity"], "semantic_detail": settings["semantic_opacity"]}
    for role, name, blend, w, h, data in layers:
        if role == "base":
            layer = target.createNode(name, "paintlayer")
            group.addChildNode(layer, below)
            layer.setPixelData(to_layer_bytes(source, data, False), 0, 0, w, h)
        else:
            layer = add_detail_layer(target, group, below, source, name, blend, opacity.get(role, 100.0), mask, w, h, data)
        below = layer
    if not settings["new_document"]:
        # The group is this layer upscaled; where it is not opaque the original would show.
        source.node.setVisible(False)
    record = dict(settings, source=source.node.name())
    try:
        from .qt import QByteArray
        target.setAnnotation(ANNOTATION, "Tessera settings", QByteArray(json.dumps(record).encode()))
    except Exception:  # annotations are a convenience; the names carry the settings too
        pass
    target.refreshProjection()
    target.waitForDone()
    return target, group


def add_detail_layer(doc, group, below, source, name, blend, opacity, mask, w, h, data):
    """A residual layer in `group` above `below`: blended so that opacity a adds a·R, taking
    its coverage from the layers below, masked by the upscaled selection where Krita can."""
    layer = doc.createNode(name, "paintlayer")
    group.addChildNode(layer, below)
    layer.setBlendingMode("grain_merge" if blend == "grain_merge" else "add")
    layer.setInheritAlpha(True)
    layer.setOpacity(round(255 * opacity / 100.0))
    if mask is not None and can_mask(doc):
        add_mask(doc, layer, mask, w, h)
    layer.setPixelData(to_layer_bytes(source, data, True), 0, 0, w, h)
    return layer


def write_exact(doc, group, source, layers, mask, semantic):
    """Puts an exact render above the linear semantic detail, at full opacity, and hides the
    linear one; an earlier exact layer goes. The render is srgan-pair's semantic detail (the
    network interpolated at λ_sem = `semantic`, 0..1) or PiSA-SR's whole picture (role
    `exact`). Raises Failure, touching nothing, if the result group has lost its layers."""
    detail = detail_layers(group)
    linear = detail.get("semantic_detail")
    exact = [l for l in layers if l[0] in ("semantic_detail", "exact")]
    if linear is None or not exact:
        raise Failure("The result has no semantic detail layer to replace any more; upscale again.")
    role, name, blend, w, h, data = exact[0]
    if "semantic_exact" in detail:
        detail["semantic_exact"].remove()
    if role == "exact":
        # A whole picture (PiSA-SR at λ_pix, λ_sem, named so by the daemon): Normal, on top
        # of the linear blend, limited by the selection like the detail it carries.
        layer = doc.createNode(name, "paintlayer")
        group.addChildNode(layer, linear)
        if mask is not None and can_mask(doc):
            add_mask(doc, layer, mask, w, h)
        layer.setPixelData(to_layer_bytes(source, data, False), 0, 0, w, h)
    else:
        add_detail_layer(doc, group, linear, source, "%s · exact λ %.2f" % (name, semantic), blend, 100.0, mask, w, h, data)
    linear.setVisible(False)
    doc.refreshProjection()
    doc.waitForDone()


def can_mask(doc):
    """Scripts can make transparency masks from pixels in Krita 5.2 and later
    (createTransparencyMask + setSelection); 5.1's createNode mask ignores pixels given to it."""
    return hasattr(doc, "createTransparencyMask")


def add_mask(doc, layer, mask, w, h):
    """A transparency mask on `layer` from one byte a pixel."""
    from krita import Selection
    sel = Selection()
    sel.setPixelData(mask, 0, 0, w, h)
    node = doc.createTransparencyMask("selection")
    node.setSelection(sel)
    layer.addChildNode(node, None)


def detail_layers(group):
    """{role: node} of a result group's detail layers; "semantic_exact" is an exact render's."""
    out = {}
    for node in group.childNodes():
        if " · exact λ " in node.name():
            out["semantic_exact"] = node
        elif node.name().endswith("pixel detail"):
            out["pixel_detail"] = node
        elif node.name().endswith("semantic detail"):
            out["semantic_detail"] = node
    return out
