"""The Tessera docker: connection status, model, scale, where the result goes, Upscale and
Cancel, progress with stage and time left, the jobs of this session, two sliders that blend
the last result's detail layers live, and Render exact where the model can render the semantic
detail exactly at the slider's λ.

Talking to the daemon happens on worker threads (connecting may start it, a job takes minutes);
they hand events to a queue that a timer empties on the GUI thread, the only thread that
touches Krita's documents."""

import queue
import threading
import time

from krita import DockWidget, Krita

from . import document
from .client import import_client
from .qt import (HORIZONTAL, QComboBox, QFormLayout, QHBoxLayout, QLabel, QListWidget,
                 QProgressBar, QPushButton, QRadioButton, QSlider, QSpinBox, QTimer,
                 QVBoxLayout, QWidget)

DOCKER_ID = "tessera_docker"
CLIENT_NAME = "tessera-krita/0.1"


def model_key(settings):
    """The "engine/model" a job's settings name, as the model list stores it."""
    return "%s/%s" % (settings["engine"], settings["model"])


class Run(threading.Thread):
    """One upscale on the daemon: pixels in, result layers (and the upscaled selection) out,
    as events on `events`. Never touches Krita. `exact`: for an exact render, the Result it
    renders again and λ_sem."""

    def __init__(self, settings, source, pixels, selection, params=None, exact=None):
        super().__init__(name="tessera-job", daemon=True)
        self.settings, self.source, self.pixels, self.selection = settings, source, pixels, selection
        self.params, self.exact = params, exact
        self.item = None  # its line in the docker's job list
        self.started = time.monotonic()
        self.size = (source.width, source.height, source.channels, source.sample, source.result_sample)
        self.events = queue.Queue()
        self.job = None

    def run(self):
        tc = import_client()
        try:
            with tc.Client.connect(client=CLIENT_NAME, timeout=60.0) as client:
                w, h, channels, sample, result_sample = self.size
                buf = client.alloc(w, h, channels, sample=sample)
                buf.write_pixels(self.pixels)
                s = self.settings
                self.job = client.submit(s["model"], s["scale"], buf, plugin=s["engine"], params=self.params,
                                         output_sample=result_sample)
                layers = self.follow()
                mask = None
                if self.selection is not None:
                    # The selection, upscaled like the image, masks the detail layers.
                    mbuf = client.alloc(w, h, 1, sample="u8")
                    mbuf.write_pixels(self.selection)
                    mjob = client.submit("classic", s["scale"], mbuf, plugin="classic", output_sample="u8")
                    mask = mjob.wait()[0].buffer.read_pixels()
                self.events.put(("result", layers, mask))
        except tc.TesseraError as e:
            self.events.put(("error", e))

    def follow(self):
        """Passes `self.job`'s progress on and returns its layers as (role, name, blend, width,
        height, bytes), bottom first."""
        self.events.put(("queued", self.job.id))
        for ev in self.job.events():
            if ev.get("type") == "progress":
                self.events.put(("progress", ev))
        return [(l.role, l.name, l.blend, int(l.buffer.layout["width"]), int(l.buffer.layout["height"]),
                 l.buffer.read_pixels()) for l in self.job.layers]

    def cancel(self):
        job = self.job
        if job is not None:
            threading.Thread(target=job.cancel, name="tessera-cancel", daemon=True).start()


class RenderRun(Run):
    """An exact render of a finished job by the daemon (models whose exact render is a
    `render` request: PiSA-SR, from the job's kept latents) at `lambdas` = (λ_pix, λ_sem).
    Where the daemon has forgotten the job (it restarted), the job runs again on the pixels it
    was made from first; the picture is the same."""

    def __init__(self, settings, source, pixels, job_id, lambdas, exact):
        super().__init__(settings, source, pixels, None, exact=exact)
        self.job_id, self.lambdas = job_id, lambdas

    def run(self):
        tc = import_client()
        try:
            with tc.Client.connect(client=CLIENT_NAME, timeout=60.0) as client:
                w, h, channels, sample, result_sample = self.size
                try:
                    self.job = client.render(self.job_id, *self.lambdas, output_sample=result_sample)
                except tc.TesseraError as e:
                    if e.code != "unknown_job":
                        raise
                    buf = client.alloc(w, h, channels, sample=sample)
                    buf.write_pixels(self.pixels)
                    s = self.settings
                    again = client.submit(s["model"], s["scale"], buf, plugin=s["engine"], output_sample=result_sample)
                    again.wait()
                    self.job = client.render(again, *self.lambdas, output_sample=result_sample)
                self.events.put(("result", self.follow(), None))
        except tc.TesseraError as e:
            self.events.put(("error", e))


class Result(object):
    """A result in a document: its group of layers and the run that made it (whose input
    pixels an exact render uses again; the document may have been scaled since)."""

    def __init__(self, doc, group, run, mask):
        self.doc, self.group, self.run, self.mask = doc, group, run, mask

    def alive(self):
        """Whether the document is still open and the group still in it."""
        return (any(d == self.doc for d in Krita.instance().documents())
                and self.doc.nodeByUniqueID(self.group.uniqueId()) is not None)


class Probe(threading.Thread):
    """Connects (starting the daemon if need be) and lists its engines and models."""

    def __init__(self, events):
        super().__init__(name="tessera-probe", daemon=True)
        self.events = events

    def run(self):
        tc = import_client()
        try:
            with tc.Client.connect(client=CLIENT_NAME, timeout=60.0) as client:
                listing = client.list()
                self.events.put(("listing", client.welcome, listing))
        except tc.TesseraError as e:
            self.events.put(("offline", e))


class TesseraDocker(DockWidget):
    def __init__(self):
        super().__init__()
        self.setWindowTitle("Tessera")
        body = QWidget(self)
        lay = QVBoxLayout(body)
        self.status = QLabel("Connecting…", body)
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        form = QFormLayout()
        self.model = QComboBox(body)
        self.scale = QSpinBox(body)
        self.scale.setRange(1, 8)
        self.scale.setValue(4)
        form.addRow("Model", self.model)
        form.addRow("Scale", self.scale)
        lay.addLayout(form)
        self.scale_document = QRadioButton("Scale this document", body)
        self.new_document = QRadioButton("Open a new document", body)
        self.scale_document.setChecked(True)
        lay.addWidget(self.scale_document)
        lay.addWidget(self.new_document)
        buttons = QHBoxLayout()
        self.upscale_button = QPushButton("Upscale active layer", body)
        self.cancel_button = QPushButton("Cancel", body)
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.upscale_button)
        buttons.addWidget(self.cancel_button)
        lay.addLayout(buttons)
        self.progress = QProgressBar(body)
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setFormat("idle")
        lay.addWidget(self.progress)
        self.message = QLabel("", body)
        self.message.setWordWrap(True)
        lay.addWidget(self.message)
        lay.addWidget(QLabel("Blend the last result", body))
        sliders = QFormLayout()
        self.pixel_slider = self._slider(body)
        self.semantic_slider = self._slider(body)
        sliders.addRow("Pixel detail", self.pixel_slider)
        sliders.addRow("Semantic detail", self.semantic_slider)
        lay.addLayout(sliders)
        self.exact_button = QPushButton("Render exact", body)
        self.exact_button.setToolTip("Replace the semantic blend with the model's own render at this λ "
                                     "(srgan-pair: its two networks' weights interpolated)")
        self.exact_button.setEnabled(False)
        lay.addWidget(self.exact_button)
        lay.addWidget(QLabel("Jobs", body))
        self.jobs = QListWidget(body)
        lay.addWidget(self.jobs)
        self.setWidget(body)

        self.runs = []  # jobs not finished yet, oldest first
        self.last = None  # the last Result
        self.exact_models = {}  # "engine/model" → description, of the models that render exactly
        self.events = queue.Queue()
        self.upscale_button.clicked.connect(self.upscale)
        self.exact_button.clicked.connect(self.render_exact)
        self.cancel_button.clicked.connect(self.cancel)
        self.pixel_slider.valueChanged.connect(lambda v: self.blend("pixel_detail", v))
        self.semantic_slider.valueChanged.connect(lambda v: self.blend("semantic_detail", v))
        self.timer = QTimer(self)
        self.timer.setInterval(100)
        self.timer.timeout.connect(self.pump)
        self.timer.start()
        Probe(self.events).start()

    @staticmethod
    def _slider(parent):
        s = QSlider(HORIZONTAL, parent)
        s.setRange(0, 100)
        s.setValue(100)
        return s

    def canvasChanged(self, canvas):
        pass

    # -- actions ---------------------------------------------------------------------------

    def settings(self):
        engine, _, model = (self.model.currentData() or "").partition("/")
        return {"engine": engine or None, "model": model, "scale": self.scale.value(),
                "new_document": self.new_document.isChecked(),
                "pixel_opacity": float(self.pixel_slider.value()),
                "semantic_opacity": float(self.semantic_slider.value())}

    def upscale(self):
        """Reads the active layer and queues a job; several may be queued at once."""
        app = Krita.instance()
        doc = app.activeDocument()
        try:
            if doc is None:
                raise document.Failure("Open a document first.")
            settings = self.settings()
            if not settings["model"]:
                raise document.Failure("No model to choose: the daemon is not reachable (see above).")
            source = document.Source(doc, doc.activeNode())
            run = Run(settings, source, source.pixels(), source.selection())
        except document.Failure as e:
            self.say(str(e))
            return
        self.jobs.insertItem(0, "queued: %s ×%d on %s" % (settings["model"], settings["scale"], source.node.name()))
        self.start(run)

    def start(self, run):
        """Starts a run whose line was just put at the top of the job list."""
        run.item = self.jobs.item(0)
        self.runs.append(run)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        self.progress.setFormat("starting")
        self.say("")
        run.start()

    def cancel(self):
        """Cancels the selected job if it is still running, else the newest one."""
        selected = self.jobs.currentItem()
        chosen = [r for r in self.runs if r.item is selected] or self.runs[-1:]
        for run in chosen:
            run.cancel()
            self.progress.setFormat("cancelling")

    def render_exact(self):
        """Renders the last result exactly at the sliders' λ and puts it in place of the
        linear blend: srgan-pair's semantic detail from the network interpolated at λ_sem, run
        on the pixels the result was made from; PiSA-SR's whole picture at (λ_pix, λ_sem),
        which the daemon renders from the job's latents."""
        last = self.last
        if last is None or not last.alive():
            self.say("The last result is gone; upscale again.")
            return
        tc = import_client()
        semantic = self.semantic_slider.value() / 100.0
        r = last.run
        model = self.exact_models[model_key(r.settings)]
        if tc.exact_render_kind(model) == tc.BY_RENDER:
            pixel = self.pixel_slider.value() / 100.0
            run = RenderRun(r.settings, r.source, r.pixels, r.job.job, (pixel, semantic), exact=(last, semantic))
        else:
            params = tc.exact_render_params(model, semantic)
            run = Run(dict(r.settings, semantic_opacity=100.0 * semantic), r.source, r.pixels, None,
                      params=params, exact=(last, semantic))
        self.jobs.insertItem(0, "queued: exact λ %.2f, %s on %s" % (semantic, r.settings["model"], r.source.node.name()))
        self.start(run)

    def blend(self, role, value):
        """Moves a detail layer's opacity live (0-100 %). Moving the semantic slider after an
        exact render goes back to the linear blend, at the new λ."""
        last = self.last
        if last is None or not last.alive():
            return
        layers = document.detail_layers(last.group)
        layer = layers.get(role)
        exact = layers.get("semantic_exact") if role == "semantic_detail" else None
        if exact is not None and exact.visible():
            exact.setVisible(False)
            if layer is not None:
                layer.setVisible(True)
        if layer is not None:
            layer.setOpacity(round(255 * value / 100.0))
            last.doc.refreshProjection()

    def update_exact_button(self):
        self.exact_button.setEnabled(self.last is not None and model_key(self.last.run.settings) in self.exact_models)

    def say(self, text):
        self.message.setText(text)

    # -- events from the threads -----------------------------------------------------------

    def pump(self):
        while True:
            try:
                self.handle(None, self.events.get_nowait())
            except queue.Empty:
                break
        for run in list(self.runs):
            while run in self.runs:
                try:
                    ev = run.events.get_nowait()
                except queue.Empty:
                    break
                self.handle(run, ev)

    def handle(self, run, ev):
        kind = ev[0]
        if kind == "listing":
            welcome, listing = ev[1], ev[2]
            devices = ", ".join(sorted({w.get("device", "?") for w in listing.get("workers", [])})) or "no worker"
            self.status.setText("Connected: %s · %s" % ((welcome or {}).get("daemon", "tesserad"), devices))
            self.model.clear()
            self.exact_models.clear()
            for plugin in listing["plugins"]:
                for m in plugin["models"]:
                    key = "%s/%s" % (plugin["id"], m["id"])
                    self.model.addItem("%s (%s)" % (m["name"], plugin["name"]), key)
                    if import_client().exact_render_kind(m) is not None:
                        self.exact_models[key] = m
            index = self.model.findData("cnn/srgan-pair")
            if index >= 0:
                self.model.setCurrentIndex(index)
            self.update_exact_button()
        elif kind == "offline":
            self.status.setText("Daemon not reachable: %s" % ev[1])
        elif kind == "queued":
            self.progress.setFormat("queued")
        elif kind == "progress":
            p = ev[1]
            run.item.setText(run.item.text().replace("queued:", "running:", 1))
            total = p.get("total") or 0
            if total:
                self.progress.setValue(int(1000 * p.get("done", 0) / total))
            eta = p.get("eta")
            left = (" — %.0f s left" % eta) if eta is not None else ""
            self.progress.setFormat("%s %d/%d%s" % (p.get("stage", ""), p.get("done", 0), total, left))
        elif kind == "result" and run.exact:
            last, semantic = run.exact
            try:
                if not last.alive():
                    raise document.Failure("The result was closed or deleted before its exact render came; upscale again.")
                document.write_exact(last.doc, last.group, run.source, ev[1], last.mask, semantic)
            except Exception as e:  # the result's layers are as they were
                self.finish(run, "failed")
                self.say(str(e))
                return
            self.finish(run, "done in %.1f s" % (time.monotonic() - run.started))
            self.progress.setValue(1000)
        elif kind == "result":
            try:
                doc, group = document.write_result(Krita.instance(), Krita.instance().activeWindow(),
                                                   run.source, run.settings, ev[1], ev[2])
            except Exception as e:  # a Krita API failure: say so; the job itself is done
                self.finish(run, "failed")
                self.say(str(e))
                return
            self.last = Result(doc, group, run, ev[2])
            self.update_exact_button()
            self.finish(run, "done in %.1f s" % (time.monotonic() - run.started))
            self.progress.setValue(1000)
            if ev[2] is not None and not document.can_mask(doc):
                self.say("This Krita cannot make masks from scripts (5.2 can): the detail layers "
                         "cover the whole layer; add a transparency mask by hand to limit them.")
        elif kind == "error":
            err = ev[1]
            self.finish(run, "cancelled" if getattr(err, "code", "") == "cancelled" else "failed")
            self.say(str(err))

    def finish(self, run, state):
        text = run.item.text()
        run.item.setText(state + ":" + text.split(":", 1)[1])
        self.progress.setFormat(state)
        self.runs.remove(run)
        self.cancel_button.setEnabled(bool(self.runs))
