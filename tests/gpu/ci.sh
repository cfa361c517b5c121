#!/usr/bin/env bash
# CI's check of the GPU build, on a machine without a card: installs the CUDA toolkit from
# PyPI (tests/gpu/toolkit.sh), builds the pisa and cnn plugins with `--features cuda`, runs
# their CPU-side tests, and drives the GPU build through the real daemon beside the toolkit's
# driver stub (tests/test_gpu_build.py). The GPU tests themselves are tests/gpu/run.sh's, on a
# machine with a card.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(TESSERA_CUDA_STUB=1 tests/gpu/toolkit.sh)"
# No CUDA kernel runs here, so they are compiled at low optimisation: about five minutes less
# on two cores. tests/gpu/build.sh builds the real ones.
export NVCC_APPEND_FLAGS="-Xptxas -O0 -Xcicc -O1"
target=target/cuda
cargo build --locked --target-dir "$target" -p tessera-pisa -p tessera-cnn --features tessera-pisa/cuda,tessera-cnn/cuda
cargo test --locked --target-dir "$target" -p tessera-kernels -p tessera-pisa --features tessera-kernels/cuda,tessera-pisa/cuda --lib
TESSERA_GPU_BUILD=$target/debug python3 -m pytest -q tests/test_gpu_build.py
