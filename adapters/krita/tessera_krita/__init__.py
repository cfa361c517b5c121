"""Tessera for Krita 5 and 6: a docker that upscales the active layer through the Tessera
daemon into base, pixel-detail and semantic-detail layers, and blends the detail live; and
Tessera's .ora files opened with their detail layers as the docker makes them."""

from krita import DockWidgetFactory, Krita

from . import ora
from .docker import DOCKER_ID, TesseraDocker
from .qt import dock_right

Krita.instance().addDockWidgetFactory(DockWidgetFactory(DOCKER_ID, dock_right(), TesseraDocker))
ora.watch()
