"""Writes the seed corpora of the fuzz targets into DIR/<target>/: the golden protocol files
(as frames, requests and plugin descriptions) and the test fixtures (model configs, a torch
checkpoint, a safetensors file, a small HDF5 file, an ncnn param text)."""

import glob
import json
import os
import struct
import sys

FUZZ = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(FUZZ))
GOLDEN = sorted(glob.glob(os.path.join(ROOT, "protocol", "golden", "*.json")))
FIX = os.path.join(ROOT, "tests", "fixtures")


def put(out, target, name, data):
    os.makedirs(os.path.join(out, target), exist_ok=True)
    with open(os.path.join(out, target, name), "wb") as f:
        f.write(data)


def main(out):
    for path in GOLDEN:
        name = os.path.basename(path)
        body = json.dumps(json.load(open(path))).encode()
        put(out, "request", name, body)
        put(out, "frame", name, struct.pack("<I", len(body)) + body + struct.pack("<I", 2) + b"{}")
        if name == "welcome.json":
            # plugin_info reads a description from the first half and params from the second.
            for plugin in json.loads(body)["plugins"]:
                info = json.dumps(plugin).encode()
                params = b'{"filter": "bicubic"}'.ljust(len(info))
                put(out, "plugin_info", "classic", info + params)
    tiny = os.path.join(FIX, "pisa", "sd21-tiny")
    for part in ("unet", "vae"):
        put(out, "diffusers_config", part, open(os.path.join(tiny, part, "config.json"), "rb").read())
    put(out, "torch_pickle", "tiny_rrdbnet.pth", open(os.path.join(FIX, "tiny_rrdbnet.pth"), "rb").read())
    put(out, "safetensors", "text_encoder", open(os.path.join(tiny, "text_encoder", "model.safetensors"), "rb").read())
    try:
        import h5py
        import numpy as np
        path = os.path.join(out, "seed.h5")
        with h5py.File(path, "w") as h:
            h.attrs["layer_names"] = [b"conv2d_1"]
            g = h.create_group("conv2d_1").create_group("conv2d_1")
            g.create_dataset("kernel:0", data=np.ones((3, 3, 3, 4), np.float32))
            g.create_dataset("bias:0", data=np.zeros(4, np.float32))
        put(out, "hdf5", "seed.h5", open(path, "rb").read())
        os.remove(path)
    except ImportError:
        put(out, "hdf5", "magic", b"\x89HDF\r\n\x1a\n" + bytes(64))
    param = b"7767517\n3 3\nInput data 0 1 data\nConvolution conv0 1 1 data a 0=4 1=3 4=1 5=1 6=108\nInterp up1 1 1 a b 0=1 1=2.000000e+00 2=2.000000e+00\n"
    put(out, "ncnn", "tiny", bytes([int(255 * len(param) / (len(param) + 64))]) + param + bytes(64))


if __name__ == "__main__":
    main(sys.argv[1])
