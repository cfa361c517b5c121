"""Finds the shared Python client: inside this plugin (as the installer puts it), else where
$TESSERA_PYTHON_DIR or Tessera's data folder holds it."""

import os
import sys


def import_client():
    here = os.path.dirname(os.path.abspath(__file__))
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    for folder in (here, os.environ.get("TESSERA_PYTHON_DIR"), os.path.join(data, "tessera", "python")):
        if folder and os.path.isdir(os.path.join(folder, "tessera_client")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            break
    import tessera_client
    return tessera_client
