"""The machine's GEMM ceiling as PyTorch (oneDNN) reaches it: one 4096x1280 by 1280x1280
product, f32 and bf16, at 2 threads (the pisa benchmark's setting). A UNet cannot run faster
than its FLOPs at this rate; docs/benchmarks.md compares the runtimes against it.

    python tests/bench/gemm_ceiling.py [--threads N]    (dev-only: pip install torch)
"""
import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m, k, n = 4096, 1280, 1280
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        for _ in range(2):
            a @ b
        runs = 10
        t = time.perf_counter()
        for _ in range(runs):
            a @ b
        seconds = (time.perf_counter() - t) / runs
        print(f"{str(dtype):16} {2 * m * k * n / seconds / 1e9:7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
