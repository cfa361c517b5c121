"""A cnn model through the real daemon: time and peak memory of a ×4 upscale.

    cargo build --release --workspace
    TESSERA_BIN_DIR=target/release python3 tests/bench/cnn.py [--model srgan-pair] [--sizes 128x128,256x256,1024x768] [--tile 128]

One srgan-pair job runs both networks (SRResNet, then SRGAN) and builds the three layers; the
per-network figure is half the job (Real-ESRGAN models run one network). Peak memory is the
worker's VmHWM (its high-water mark since it started; sizes run smallest first), mapped output
buffers included. Weights come from $TESSERA_MODEL_DIR or the default store
(`tessera models fetch MODEL`).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "adapters", "python"))

from harness import Daemon, bin_dir, vm_hwm_mib  # noqa: E402



def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="srgan-pair")
    ap.add_argument("--sizes", default="128x128,256x256,1024x768")
    ap.add_argument("--tile", type=int, default=0, help="tile side (0: the engine sizes tiles from its memory budget)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--memory-mb", type=int, help="the engine's per-tile memory budget (default: the model's)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    nets = 2 if args.model == "srgan-pair" else 1
    print("%s ×4 through tesserad (%s), %d cores, best of %d" % (args.model, bin_dir(), os.cpu_count(), args.repeat))
    print("%-10s %6s %10s %12s %14s %10s" % ("input", "tile", "job s", "per net s", "Mpx/s (out)", "peak MiB"))
    with tempfile.TemporaryDirectory() as tmp, Daemon(os.path.join(tmp, "rt")) as d, d.client() as c:
        worker = c.list()["workers"][0]["pid"]
        for size in args.sizes.split(","):
            w, h = (int(v) for v in size.split("x"))
            tile = args.tile  # 0: the engine sizes tiles from its memory budget
            yy, xx = np.mgrid[0:h, 0:w]
            img = (np.sin(xx / 7.0) * np.cos(yy / 5.0) + 1) / 2 * 0.8 + rng.random((h, w)) * 0.2
            pixels = np.stack([img, img[::-1], img[:, ::-1]], -1).astype(np.float32)
            buf = c.alloc(w, h, 3, sample="f32")
            np.frombuffer(buf.view, np.float32)[:] = pixels.ravel()
            best = None
            for _ in range(args.repeat):
                job = c.submit(args.model, 4, buf, params=dict({"tile": tile}, **({"memory_mb": args.memory_mb} if args.memory_mb else {})), output_sample="f32")
                t0 = time.perf_counter()
                layers = job.wait(timeout=3600)
                wall = time.perf_counter() - t0
                best = min(best or wall, job.seconds or wall)
                for layer in layers:
                    c.release(layer)
            c.release(buf)
            mpx = 16 * w * h / 1e6 / best
            print("%-10s %6d %10.2f %12.2f %14.3f %10.0f" % (size, tile, best, best / nets, mpx, vm_hwm_mib(worker)))


if __name__ == "__main__":
    main()
