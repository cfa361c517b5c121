"""Speed of the classic engine through the real daemon, next to Pillow on the same pixels.

    cargo build --release --workspace
    TESSERA_BIN_DIR=target/release python3 tests/bench/classic.py [--size 1024x768] [--repeat 3]

Prints, per filter and scale, the engine's own time (as tesserad reports it), the wall time of
submit → result through the Python client, and Pillow's resize of the same 8-bit RGB image, with
the ratio Pillow / Tessera. Pillow resizes on one thread; tesserad uses every core it has
(`nproc` is printed), so the ratio is the user's experience, not a per-core comparison.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "adapters", "python"))

from harness import Daemon, bin_dir  # noqa: E402

PIL_FILTERS = {"lanczos3": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}


def best(f, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / 17.0) * np.cos(yy / 11.0) + 1) * 100
    src = np.stack([base, base[::-1], base[:, ::-1]], -1) + rng.integers(0, 50, (h, w, 3))
    src = np.clip(src, 0, 255).astype(np.uint8)
    pil = Image.fromarray(src)

    print("classic engine vs Pillow %s, input %d×%d RGB 8-bit, best of %d" % (Image.__version__, w, h, args.repeat))
    print("binaries: %s   cores: %d" % (bin_dir(), os.cpu_count()))
    print("%-9s %5s %12s %12s %12s %12s %8s" % ("filter", "scale", "engine s", "client s", "Pillow s", "Mpx/s out", "Pillow/T"))
    with tempfile.TemporaryDirectory() as tmp, Daemon(os.path.join(tmp, "rt"), ["--max-client-bytes", str(8 << 30)]) as d:
        c = d.client()
        buf = c.alloc(w, h, 3, sample="u8")
        buf.view[:] = src.tobytes()
        for filt in ("lanczos3", "bicubic"):
            for scale in (2, 4):
                engine = []

                def run():
                    job = c.submit("classic", scale, buf, params={"filter": filt}, output_sample="u8")
                    layers = job.wait(timeout=600)
                    engine.append(job.seconds)
                    for layer in layers:
                        c.release(layer)

                client_s, _ = best(run, args.repeat)
                pil_s, _ = best(lambda: pil.resize((w * scale, h * scale), PIL_FILTERS[filt]), args.repeat)
                engine_s = min(engine)
                mpx = w * scale * h * scale / 1e6 / engine_s
                print("%-9s %5s %12.3f %12.3f %12.3f %12.1f %8.2f" % (filt, "×%d" % scale, engine_s, client_s, pil_s, mpx, pil_s / client_s))
        c.release(buf)
        c.close()


if __name__ == "__main__":
    main()
