#!/usr/bin/env python3
"""Tessera Upscale for GIMP 3: Filters → Enhance → Tessera Upscale…

Upscales the active layer with a Tessera engine and adds the layer contract's layers (base,
pixel detail, semantic detail) as a layer group to blend by hand. All model work happens in
the Tessera daemon (started on demand); this file only moves pixels between GIMP and the
shared Python client (`tessera_client`, installed next to this file).

It also opens OpenRaster files whose layers use Krita's blend modes (Tessera's CLI writes its
detail layers as `krita:grain_merge`) with those modes: GIMP's own .ora loader knows only the
SVG ones and opens every other layer as Normal.

GIMP 3 registers a Python plug-in only as plug-ins/tessera-upscale/tessera-upscale.py,
executable.
"""

import json
import os
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp, Gio, GLib, GObject  # noqa: E402

PROC = "plug-in-tessera-upscale"
LOAD_PROC = "file-tessera-openraster-load"
PARASITE = "tessera-settings"
RW = GObject.ParamFlags.READWRITE


def _import_client():
    """The shared client: next to this file (as the installer puts it), else where
    $TESSERA_PYTHON_DIR or Tessera's data folder holds it."""
    here = os.path.dirname(os.path.abspath(__file__))
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    for folder in (here, os.environ.get("TESSERA_PYTHON_DIR"), os.path.join(data, "tessera", "python")):
        if folder and os.path.isdir(os.path.join(folder, "tessera_client")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            break
    import tessera_client
    return tessera_client


class Failure(Exception):
    """A message for the user; the document has not been touched."""


class Space(object):
    """How the drawable's pixels are read and its result layers are written and composited:
    in the image's own space (linear light or perceptual), as floats, and back in the
    image's own sample type."""

    def __init__(self, image, drawable):
        nick = image.get_precision().value_nick  # e.g. "u8-non-linear", "float-linear"
        self.linear = nick.endswith("-linear") and not nick.endswith("-non-linear")
        self.float_doc = nick.startswith(("half", "float", "double"))
        # Integer documents take integer results, residuals stored as 0.5 + R (Grain Merge);
        # float documents take signed residuals (Addition).
        self.sample = "f32" if self.float_doc else ("u8" if nick.startswith("u8") else "u16")
        self.gray = drawable.is_gray()
        self.alpha = drawable.has_alpha()
        self.channels = (1 if self.gray else 3) + (1 if self.alpha else 0)

    def babl(self, sample, alpha):
        prime = "" if self.linear else "'"
        name = ("Y" + prime) if self.gray else "R{0}G{0}B{0}".format(prime)
        return "%s%s %s" % (name, "A" if alpha else "", {"f32": "float", "u8": "u8", "u16": "u16"}[sample])

    def layer_type(self, alpha):
        if self.gray:
            return Gimp.ImageType.GRAYA_IMAGE if alpha else Gimp.ImageType.GRAY_IMAGE
        return Gimp.ImageType.RGBA_IMAGE if alpha else Gimp.ImageType.RGB_IMAGE

    def color_space(self):
        return Gimp.LayerColorSpace.RGB_LINEAR if self.linear else Gimp.LayerColorSpace.RGB_PERCEPTUAL


def settings_of(config):
    return {
        "engine": config.get_property("engine") or None,
        "model": config.get_property("model"),
        "scale": config.get_property("scale"),
        "new_image": config.get_property("new-image"),
        "pixel_opacity": config.get_property("pixel-opacity"),
        "semantic_opacity": config.get_property("semantic-opacity"),
        "exact": config.get_property("exact"),
    }


def read_pixels(drawable, fmt):
    w, h = drawable.get_width(), drawable.get_height()
    rect = Gegl.Rectangle.new(0, 0, w, h)
    return bytes(drawable.get_buffer().get(rect, 1.0, fmt, Gegl.AbyssPolicy.CLAMP))


def read_selection(image, drawable):
    """The selection over the drawable's area as "Y float", or None when nothing is selected."""
    if Gimp.Selection.is_empty(image):
        return None
    ok, ox, oy = drawable.get_offsets()
    rect = Gegl.Rectangle.new(ox, oy, drawable.get_width(), drawable.get_height())
    return bytes(image.get_selection().get_buffer().get(rect, 1.0, "Y float", Gegl.AbyssPolicy.NONE))


def connect(tc):
    try:
        return tc.Client.connect(client="tessera-gimp/0.1", timeout=60.0)
    except tc.TesseraError as e:
        raise Failure("Tessera could not start or reach its daemon: %s" % e)


def run_job(client, settings, width, height, channels, pixels, sample, progress):
    """Runs one job on the daemon and returns its layers as (layer info, bytes), bottom first.
    Nothing here touches the document, so any failure leaves it as it was."""
    tc = _import_client()
    kind, params = exact_params(client, settings) if settings.get("exact") else (None, None)
    buf = client.alloc(width, height, channels, sample="f32")
    buf.write_pixels(pixels)
    job = client.submit(settings["model"], settings["scale"], buf, params=params, plugin=settings["engine"], output_sample=sample)
    layers = job.wait(progress=progress)
    if kind == tc.BY_RENDER:
        # The whole picture at (λ_pix, λ_sem) = the two opacities, from the job's latents.
        render = client.render(job, settings["pixel_opacity"] / 100.0, settings["semantic_opacity"] / 100.0, output_sample=sample)
        layers = layers + render.wait(progress=progress)
        client.release_job(job)
    out = [(layer, layer.buffer.read_pixels()) for layer in layers]
    for layer in layers:
        client.release(layer.buffer)
    client.release(buf)
    return out


def exact_params(client, settings):
    """How the job renders exactly at the opacities' λ instead of blending linearly
    (`tessera_client.exact_render_kind`): (kind, job parameters)."""
    tc = _import_client()
    for plugin in client.list()["plugins"]:
        if settings["engine"] not in (None, plugin["id"]):
            continue
        for model in plugin["models"]:
            if model["id"] == settings["model"]:
                kind = tc.exact_render_kind(model)
                if kind == tc.BY_RENDER:
                    return kind, None
                if kind == tc.BY_PARAMS:
                    return kind, tc.exact_render_params(model, settings["semantic_opacity"] / 100.0)
    raise Failure("%s offers no exact render; leave \"exact λ\" off and blend the semantic "
                  "detail with its layer opacity." % settings["model"])


def without_alpha(data, channels, sample):
    """Interleaved pixels with their last channel dropped (a residual's alpha is the image's,
    which the layer below already carries)."""
    import array
    values = array.array({"u8": "B", "u16": "H", "f32": "f"}[sample])
    values.frombytes(data)
    del values[channels - 1::channels]
    return values.tobytes()


def group_name(drawable, settings, scale):
    return "%s · Tessera ×%d %s" % (drawable.get_name(), scale, settings["model"])


def add_result(target, parent, position, offsets, space, settings, drawable, layers, mask):
    """The result group with its layers, inserted at `position` under `parent` of `target`."""
    group = Gimp.GroupLayer.new(target, group_name(drawable, settings, settings["scale"]))
    target.insert_layer(group, parent, position)
    group.set_offsets(*offsets)
    # With an exact render by parameters λ_sem is already in the semantic pixels: the layer
    # shows it at full opacity. A rendered exact picture goes on top, Normal, and covers the
    # linear blend below it.
    rendered = any(info.role == "exact" for info, _ in layers)
    semantic = 100.0 if settings.get("exact") and not rendered else settings["semantic_opacity"]
    opacity = {"pixel_detail": settings["pixel_opacity"], "semantic_detail": semantic}
    for info, data in layers:
        w, h = int(info.buffer.layout["width"]), int(info.buffer.layout["height"])
        residual = info.role in ("pixel_detail", "semantic_detail")
        alpha = space.alpha and not residual
        if residual and space.alpha:
            data = without_alpha(data, space.channels, space.sample)
        if not residual:
            mode = Gimp.LayerMode.NORMAL
        elif info.blend == "grain_merge":
            mode = Gimp.LayerMode.GRAIN_MERGE
        else:
            mode = Gimp.LayerMode.ADDITION
        layer = Gimp.Layer.new(target, info.name, w, h, space.layer_type(alpha), opacity.get(info.role, 100.0), mode)
        target.insert_layer(layer, group, 0)
        layer.set_offsets(*offsets)
        buf = layer.get_buffer()
        buf.set(Gegl.Rectangle.new(0, 0, w, h), space.babl(space.sample, alpha), data)
        buf.flush()
        if residual:
            # Opacity a adds exactly a·R: blend in the space the residual was computed in, and
            # keep the coverage of the layers below.
            layer.set_blend_space(space.color_space())
            layer.set_composite_space(space.color_space())
            layer.set_composite_mode(Gimp.LayerCompositeMode.CLIP_TO_BACKDROP)
        if info.role != "base" and mask is not None:
            # The selection limits the detail, and the exact picture that carries it.
            m = layer.create_mask(Gimp.AddMaskType.WHITE)
            layer.add_mask(m)
            m.get_buffer().set(Gegl.Rectangle.new(0, 0, w, h), "Y float", mask)
            m.get_buffer().flush()
        layer.update(0, 0, w, h)
    record = dict(settings, source=drawable.get_name())
    group.attach_parasite(Gimp.Parasite.new(PARASITE, Gimp.PARASITE_PERSISTENT, list(json.dumps(record).encode())))
    return group


def upscale(image, drawable, settings):
    """Returns the image that holds the result (`image`, or a new one)."""
    tc = _import_client()
    if not isinstance(drawable, Gimp.Layer) or isinstance(drawable, Gimp.GroupLayer):
        raise Failure("Tessera Upscale works on a pixel layer; pick one in the Layers dialog.")
    if image.get_base_type() == Gimp.ImageBaseType.INDEXED and not settings["new_image"]:
        raise Failure("This image is indexed; convert it to RGB (Image → Mode → RGB) or choose "
                      "\"open a new image\".")
    space = Space(image, drawable)
    if drawable.is_indexed():
        space.gray, space.sample = False, "u8"
        space.channels = 3 + (1 if space.alpha else 0)
    w, h, s = drawable.get_width(), drawable.get_height(), settings["scale"]
    pixels = read_pixels(drawable, space.babl("f32", space.alpha))
    selection = read_selection(image, drawable)

    Gimp.progress_init("Tessera: upscaling %s ×%d" % (drawable.get_name(), s))

    def progress(ev):
        total = ev.get("total") or 0
        if total:
            Gimp.progress_update(min(1.0, float(ev.get("done", 0)) / total))

    mask = None
    try:
        with connect(tc) as client:
            layers = run_job(client, settings, w, h, space.channels, pixels, space.sample, progress)
            if selection is not None and any(info.role != "base" for info, _ in layers):
                # The selection, upscaled like the image, limits where detail is added.
                classic = {"engine": "classic", "model": "classic", "scale": s}
                mask = run_job(client, classic, w, h, 1, selection, "f32", None)[0][1]
    except tc.TesseraError as e:
        raise Failure(str(e))
    Gimp.progress_update(1.0)

    if settings["new_image"]:
        base_type = Gimp.ImageBaseType.GRAY if space.gray else Gimp.ImageBaseType.RGB
        precision = Gimp.Precision.U8_NON_LINEAR if drawable.is_indexed() else image.get_precision()
        target = Gimp.Image.new_with_precision(w * s, h * s, base_type, precision)
        target.undo_disable()
        add_result(target, None, 0, (0, 0), space, settings, drawable, layers, mask)
        target.undo_enable()
        return target
    image.undo_group_start()
    try:
        image.scale(image.get_width() * s, image.get_height() * s)
        ok, ox, oy = drawable.get_offsets()
        parent = drawable.get_parent()
        add_result(image, parent, image.get_item_position(drawable), (ox, oy), space, settings, drawable, layers, mask)
        # The group is this layer upscaled; where it is not opaque the original would show
        # through it.
        drawable.set_visible(False)
    finally:
        image.undo_group_end()
    return image


def ask(procedure, config):
    """The dialog: the model from the daemon's list, then GIMP's own widgets for the other
    arguments. GIMP keeps the values of the last interactive run in the config."""
    gi.require_version("GimpUi", "3.0")
    gi.require_version("Gtk", "3.0")
    from gi.repository import GimpUi, Gtk
    GimpUi.init(PROC)
    tc = _import_client()
    try:
        with connect(tc) as client:
            plugins = client.list()["plugins"]
    except tc.TesseraError as e:
        raise Failure(str(e))
    dialog = GimpUi.ProcedureDialog.new(procedure, config, "Tessera Upscale")
    combo = Gtk.ComboBoxText()
    for plugin in plugins:
        for model in plugin["models"]:
            combo.append("%s/%s" % (plugin["id"], model["id"]), "%s (%s)" % (model["name"], plugin["name"]))
    engine, model = config.get_property("engine"), config.get_property("model")
    if not combo.set_active_id("%s/%s" % (engine, model)):
        for plugin in plugins:
            if any(m["id"] == model for m in plugin["models"]):
                combo.set_active_id("%s/%s" % (plugin["id"], model))
                break

    def chosen(widget):
        engine, model = widget.get_active_id().split("/", 1)
        config.set_property("engine", engine)
        config.set_property("model", model)
    combo.connect("changed", chosen)
    if combo.get_active_id():
        chosen(combo)
    row = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=12)
    row.pack_start(Gtk.Label(label="Model"), False, False, 0)
    row.pack_start(combo, True, True, 0)
    dialog.get_content_area().pack_start(row, False, False, 6)
    row.show_all()
    dialog.fill(["scale", "new-image", "pixel-opacity", "semantic-opacity", "exact"])
    ok = dialog.run()
    dialog.destroy()
    return ok


# OpenRaster composite ops. The SVG ones as GIMP's own loader maps them; the Krita ones it
# does not know ("krita:" + Krita's op id, as Krita and Tessera write them).
SVG_MODES = {
    "svg:src-over": Gimp.LayerMode.NORMAL, "svg:multiply": Gimp.LayerMode.MULTIPLY,
    "svg:screen": Gimp.LayerMode.SCREEN, "svg:overlay": Gimp.LayerMode.OVERLAY,
    "svg:darken": Gimp.LayerMode.DARKEN_ONLY, "svg:lighten": Gimp.LayerMode.LIGHTEN_ONLY,
    "svg:color-dodge": Gimp.LayerMode.DODGE, "svg:color-burn": Gimp.LayerMode.BURN,
    "svg:hard-light": Gimp.LayerMode.HARDLIGHT, "svg:soft-light": Gimp.LayerMode.SOFTLIGHT,
    "svg:difference": Gimp.LayerMode.DIFFERENCE, "svg:color": Gimp.LayerMode.HSL_COLOR,
    "svg:luminosity": Gimp.LayerMode.HSV_VALUE, "svg:hue": Gimp.LayerMode.HSV_HUE,
    "svg:saturation": Gimp.LayerMode.HSV_SATURATION, "svg:plus": Gimp.LayerMode.ADDITION,
}
KRITA_MODES = {
    "krita:grain_merge": Gimp.LayerMode.GRAIN_MERGE, "krita:grain_extract": Gimp.LayerMode.GRAIN_EXTRACT,
    "krita:add": Gimp.LayerMode.ADDITION, "krita:subtract": Gimp.LayerMode.SUBTRACT,
    "krita:divide": Gimp.LayerMode.DIVIDE, "krita:exclusion": Gimp.LayerMode.EXCLUSION,
    "krita:linear_burn": Gimp.LayerMode.LINEAR_BURN,
}


def ora_stack(ora):
    """The root <image> of an .ora's stack.xml."""
    root = ET.fromstring(ora.read("stack.xml"))
    if root.tag != "image" or root.find("stack") is None:
        raise ValueError("stack.xml has no <image><stack>")
    return root


def uses_krita_modes(root):
    return any(e.get("composite-op") in KRITA_MODES for e in root.iter() if e.tag in ("layer", "stack"))


def png_layers(stack):
    return [e for e in stack.iter("layer") if e.get("src", "").lower().endswith(".png")]


def load_openraster(ora, root):
    """A new image holding the .ora's layers and groups with their blend modes, at the layers'
    own bit depth (GIMP's loader makes every image 8-bit)."""
    stack = root.find("stack")
    heads = []
    for e in png_layers(stack):
        with ora.open(e.get("src")) as f:
            heads.append(f.read(26))  # PNG signature and IHDR: bit depth at 24, colour type at 25
    if any(len(h) < 26 or not h.startswith(b"\x89PNG") for h in heads):
        raise ValueError("a layer is not a PNG file")
    deep = any(h[24] == 16 for h in heads)
    grey = bool(heads) and all(h[25] in (0, 4) for h in heads)
    image = Gimp.Image.new_with_precision(
        int(root.get("w")), int(root.get("h")),
        Gimp.ImageBaseType.GRAY if grey else Gimp.ImageBaseType.RGB,
        Gimp.Precision.U16_NON_LINEAR if deep else Gimp.Precision.U8_NON_LINEAR)
    tmp = tempfile.mkdtemp(prefix="tessera-ora-")
    try:
        add_stack(image, ora, stack, None, tmp)
    except Exception:
        image.delete()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return image


def add_stack(image, ora, stack, parent, tmp):
    """Adds `stack`'s children under `parent`, topmost first as OpenRaster lists them."""
    position = 0
    for item in stack:
        src = item.get("src", "")
        if item.tag == "stack":
            layer = Gimp.GroupLayer.new(image, item.get("name", ""))
        elif item.tag == "layer" and src.lower().endswith(".png"):
            path = os.path.join(tmp, "layer.png")  # GIMP loads layers from files only
            with open(path, "wb") as f:
                f.write(ora.read(src))
            layer = Gimp.file_load_layer(Gimp.RunMode.NONINTERACTIVE, image, Gio.File.new_for_path(path))
            layer.set_name(item.get("name") or os.path.splitext(os.path.basename(src))[0])
        else:
            continue
        image.insert_layer(layer, parent, position)
        position += 1
        if item.tag == "layer":
            layer.set_offsets(int(item.get("x", "0")), int(item.get("y", "0")))
        layer.set_opacity(100.0 * float(item.get("opacity", "1.0")))
        layer.set_visible(item.get("visibility", "visible") != "hidden")
        op = item.get("composite-op", "svg:src-over")
        if op in KRITA_MODES:
            layer.set_mode(KRITA_MODES[op])
            # Krita blends the stored values as they are, and these layers (Tessera's detail
            # layers) add detail, not coverage: as the plug-in's own result layers do.
            layer.set_blend_space(Gimp.LayerColorSpace.RGB_PERCEPTUAL)
            layer.set_composite_space(Gimp.LayerColorSpace.RGB_PERCEPTUAL)
            layer.set_composite_mode(Gimp.LayerCompositeMode.CLIP_TO_BACKDROP)
        else:
            layer.set_mode(SVG_MODES.get(op, Gimp.LayerMode.NORMAL))
        if item.tag == "stack":
            add_stack(image, ora, item, layer, tmp)


def load(procedure, run_mode, file, metadata, flags, config, data):
    """.ora files that use Krita's modes open here; all others through GIMP's own loader."""
    path = file.get_path()
    try:
        with zipfile.ZipFile(path) as ora:
            root = ora_stack(ora)
            if uses_krita_modes(root):
                image = load_openraster(ora, root)
                return Gimp.ValueArray.new_from_values([
                    GObject.Value(Gimp.PDBStatusType, Gimp.PDBStatusType.SUCCESS),
                    GObject.Value(Gimp.Image, image)]), flags
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile, ET.ParseError) as e:
        return procedure.new_return_values(
            Gimp.PDBStatusType.EXECUTION_ERROR,
            GLib.Error("%s is not an OpenRaster file GIMP can open: %s" % (path, e))), flags
    gimp_own = Gimp.get_pdb().lookup_procedure("file-openraster-load")
    cfg = gimp_own.create_config()
    cfg.set_property("run-mode", run_mode)
    cfg.set_property("file", file)
    return gimp_own.run(cfg), flags


class TesseraUpscale(Gimp.PlugIn):
    def do_query_procedures(self):
        return [PROC, LOAD_PROC]

    def do_set_i18n(self, name):
        return False

    def do_create_procedure(self, name):
        if name == LOAD_PROC:
            p = Gimp.LoadProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, load, None)
            p.set_menu_label("OpenRaster (Krita and Tessera blend modes)")
            p.set_documentation(
                "Load an OpenRaster (.ora) file with Krita's blend modes",
                "Opens .ora files whose layers use Krita's blend modes (grain merge, add, subtract, "
                "divide...: Tessera's detail layers are grain merge) with those modes and at the "
                "layers' bit depth; every other .ora opens through GIMP's own loader.",
                name)
            p.set_attribution("Tessera", "Tessera", "2026")
            p.set_mime_types("image/openraster")
            p.set_extensions("ora")
            # Ahead of GIMP's own loader (priority 0), which it calls for ordinary files.
            p.set_priority(-1)
            p.set_thumbnail_loader("file-openraster-load-thumb")
            return p
        p = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, self.run, None)
        p.set_image_types("*")
        p.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        p.set_menu_label("Tessera Upscale…")
        p.add_menu_path("<Image>/Filters/Enhance")
        p.set_documentation(
            "Upscale the active layer into base, pixel-detail and semantic-detail layers",
            "Runs a Tessera engine on the active layer and adds a layer group: the plain upscale "
            "and two residual layers to blend by hand (opacity, masks). The selection, if any, "
            "becomes a mask on the detail layers.",
            name)
        p.set_attribution("Tessera", "Tessera", "2026")
        p.add_string_argument("engine", "Engine", "Engine id (empty: the one that has the model)", "", RW)
        p.add_string_argument("model", "Model", "Model id from the daemon's list", "srgan-pair", RW)
        p.add_int_argument("scale", "Scale", "Upscaling factor", 1, 8, 4, RW)
        p.add_boolean_argument("new-image", "Open a new image", "Put the result in a new image instead of scaling this one", False, RW)
        p.add_double_argument("pixel-opacity", "Pixel detail opacity", "Initial opacity of the pixel detail layer", 0.0, 100.0, 100.0, RW)
        p.add_double_argument("semantic-opacity", "Semantic detail opacity", "Initial opacity of the semantic detail layer", 0.0, 100.0, 100.0, RW)
        p.add_boolean_argument("exact", "Exact λ", "Render exactly at the opacities' λ instead of blending linearly, where the model offers it (srgan-pair: the interpolated network as semantic detail; pisa: PiSA-SR's picture at λ_pix, λ_sem on top)", False, RW)
        p.add_image_return_value("result-image", "Result image", "The image that holds the result", False, RW)
        return p

    def run(self, procedure, run_mode, image, drawables, config, data):
        Gegl.init(None)
        try:
            if run_mode == Gimp.RunMode.INTERACTIVE and not ask(procedure, config):
                return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
            if len(drawables) != 1:
                raise Failure("Select exactly one layer to upscale.")
            result = upscale(image, drawables[0], settings_of(config))
        except Failure as e:
            if run_mode == Gimp.RunMode.INTERACTIVE:
                Gimp.message(str(e))
            return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error(str(e)))
        if run_mode == Gimp.RunMode.INTERACTIVE and result is not image:
            Gimp.Display.new(result)
        Gimp.displays_flush()
        rv = procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())
        rv.remove(1)
        rv.insert(1, GObject.Value(Gimp.Image, result))
        return rv


Gimp.main(TesseraUpscale.__gtype__, sys.argv)
