#!/usr/bin/env bash
# Installs the CUDA toolkit that the GPU builds need (nvcc, headers, the runtime libraries to
# link against) from PyPI's NVIDIA wheels into one folder shaped like a toolkit, and prints the
# environment that points cargo at it. No driver and no card are needed to build.
#
#   eval "$(tests/gpu/toolkit.sh [DIR])"     # DIR defaults to /var/tmp/tessera-cuda-13.0
#
# CUDA 13.0: PTX from a newer nvcc does not load on a 13.0 driver (R580, what the lent H100s
# run), and a newer driver loads 13.0's; the libraries' sonames (libcublas.so.13, …) are the
# same across 13.x, so a build links against these and runs with any 13.x libraries. The
# wheels carry no libcuda (that comes with the driver): a stub with the driver's soname stands
# in at link time, and the plugin binds the real one when a worker loads it beside a driver.
set -euo pipefail
dir=${1:-/var/tmp/tessera-cuda-13.0}
cuda=$dir/nvidia/cu13
if [ ! -x "$cuda/bin/nvcc" ]; then
    # One pip call: a second `--target` install into the same folder replaces its nvidia/.
    python3 -m pip install --quiet --disable-pip-version-check --target "$dir" \
        "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
        "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-nvrtc==13.0.88" "nvidia-cublas==13.0.2.14" \
        "nvidia-curand==10.4.0.35" "nvidia-cuda-cccl==13.0.85" >&2
    for lib in "$cuda"/lib/lib*.so.*; do
        base=${lib%%.so.*}.so
        [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
    done
    ln -sfn lib "$cuda/lib64"
fi
if [ ! -e "$cuda/lib/stubs/libcuda.so.1" ]; then
    # The driver stub: every driver function cudarc binds, each answering
    # CUDA_ERROR_STUB_LIBRARY (34), so that test binaries link and run here and a CUDA device
    # fails to open with an error instead of a crash.
    cargo fetch --quiet >&2
    sys=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-0.19.*/src/driver/sys/mod.rs' | sort | tail -1)
    [ -n "$sys" ] || { echo "cudarc's sources are not in the cargo registry; run cargo fetch" >&2; exit 1; }
    mkdir -p "$cuda/lib/stubs"
    grep -ohE 'fn cu[A-Z][A-Za-z0-9_]*' "$sys" | sort -u | sed 's/^fn \(.*\)/int \1(void) { return 34; }/' > "$cuda/lib/stubs/libcuda.c"
    cc -shared -fPIC -o "$cuda/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$cuda/lib/stubs/libcuda.c"
    ln -sf libcuda.so "$cuda/lib/stubs/libcuda.so.1"
fi
# candle-kernels compiles PTX for one architecture; without a card to ask, 8.0 (A100) PTX
# runs on every card from Ampere on (the driver JIT-compiles it for newer ones, H100 included).
cat <<ENV
export CUDA_PATH=$cuda CUDA_HOME=$cuda
export PATH=$cuda/bin:\$PATH
export LIBRARY_PATH=$cuda/lib:$cuda/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-80}
ENV
# Running a GPU build here (its CPU-side tests) needs the libraries at run time too; on a
# machine with a driver, leave the stubs out so the real libcuda.so.1 is found.
if [ "${TESSERA_CUDA_STUB:-0}" = 1 ]; then
    echo "export LD_LIBRARY_PATH=$cuda/lib:$cuda/lib/stubs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
else
    echo "export LD_LIBRARY_PATH=$cuda/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
fi
