#!/usr/bin/env bash
# The GPU tests and benchmarks, on a machine with an NVIDIA card, from the repository root.
# Here (with network and cargo) build first: tests/gpu/build.sh packs target/gpu-carry/,
# which travels with the working tree; the card's machine needs the NVIDIA driver, the CUDA 13
# libraries (cuBLAS, cuRAND, NVRTC, the runtime: PyTorch's cu13 wheels carry them, or a CUDA
# toolkit) and, for the PyTorch comparison, torch with CUDA and diffusers.
#
#   tests/gpu/run.sh [quick]      # quick: parity and the daemon only, no benchmarks
#
# Prints, in order: the machine; the pisa parity and tiling tests on cuda:0 (bounds: 4× the
# CPU's, f32); the daemon with a CUDA worker (devices, a job on the card); the pisa benchmark
# at SD2.1-base size with random weights, 128² → 512² against PyTorch f32 and fp16 on the same
# card, and a 2048² → 8192² job's time and card memory. Logs go to $OUT (or /tmp/tessera-gpu).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/tessera-gpu}
mkdir -p "$out"
carry=target/gpu-carry
bin=/tmp/tessera-gpu-bin
status=0
step() { echo; echo "== $*"; }
fail() { echo "FAILED: $*"; status=1; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || fail "nvidia-smi"
[ -f "$carry/BUILD" ] || { echo "no $carry: run tests/gpu/build.sh where cargo is, and carry $carry"; exit 2; }
echo "built for: $(cat "$carry/BUILD")"
rm -rf "$bin" && mkdir -p "$bin/plugins/cuda"
for f in "$carry"/*.xz; do
    name=$(basename "${f%.xz}")
    xz -dc "$f" > "$bin/$name" && chmod +x "$bin/$name"
done
# The GPU build serves both workers: the CUDA one from cuda/, the CPU one (on the CPU) beside.
cp "$bin/libtessera_pisa.so" "$bin/plugins/cuda/" && mv "$bin/libtessera_pisa.so" "$bin/plugins/"
mv "$bin/libtessera_classic.so" "$bin/plugins/"
# The CUDA 13 libraries: a toolkit's, or those PyTorch's wheels installed.
libs=$(python3 - <<'EOF' 2>/dev/null
import glob, os, site, sys
dirs = site.getsitepackages() + [site.getusersitepackages()] + sys.path
found = [d for p in dirs for d in glob.glob(os.path.join(p, "nvidia", "cu13", "lib")) + glob.glob(os.path.join(p, "nvidia", "*", "lib"))]
print(":".join(dict.fromkeys(found)))
EOF
)
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64; do [ -d "$d" ] && libs="$libs:$d"; done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
has_lib() {
    ldconfig -p 2>/dev/null | grep -q "$1" && return 0
    local d
    for d in ${LD_LIBRARY_PATH//:/ }; do [ -e "$d/$1" ] && return 0; done
    return 1
}
for lib in libcublas.so.13 libcurand.so.10 libcudart.so.13 libcuda.so.1; do
    has_lib "$lib" || fail "$lib not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
done

step "pisa parity and tiling on cuda:0 (small SD2.1-structured model, f32)"
export TESSERA_PISA_FIXTURES=$PWD/tests/fixtures/pisa
for t in "$bin"/test-parity "$bin"/test-tiling; do
    TESSERA_TEST_DEVICE=cuda:0 "$t" --nocapture --test-threads 1 2>&1 | tee "$out/$(basename "$t").log" | grep -E "parity|PSNR|test result|panicked|FAILED" || true
    [ "${PIPESTATUS[0]}" = 0 ] || fail "$(basename "$t")"
done

step "tesserad with a CUDA worker"
rt=$(mktemp -d) models=$(mktemp -d)
export TESSERA_MODEL_DIR=$models TESSERA_RUNTIME_DIR=$rt TESSERA_PLUGIN_DIR=$bin/plugins
"$bin/tessera" --no-start models import pisa --base tests/fixtures/pisa/sd21-tiny --checkpoint tests/fixtures/pisa/pisa_sr_tiny.pkl > "$out/import.log" 2>&1 || fail "import"
"$bin/tesserad" > "$out/tesserad.log" 2>&1 &
daemon=$!
sleep 3
"$bin/tessera" --no-start models list 2>&1 | sed -n '/devices in tesserad/,$p'
for device in cuda:0 cpu; do
    t0=$(date +%s%N)
    if "$bin/tessera" --no-start upscale tests/fixtures/pisa/lr.png --model pisa --device "$device" -o "$out/lr-$device.ora" > "$out/upscale-$device.log" 2>&1; then
        echo "pisa job on $device (small model, through the daemon): $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    else
        fail "upscale on $device"
        tail -5 "$out/upscale-$device.log"
    fi
done
kill "$daemon"; wait "$daemon" 2>/dev/null
grep -iE "cuda|error" "$out/tesserad.log" | head -20

[ "${1:-}" = quick ] && exit $status

step "pisa at SD2.1-base size on cuda:0, random weights"
if python3 -c "import torch, diffusers; assert torch.cuda.is_available()" 2>/dev/null; then
    python3 tests/bench/pisa_vs_runtimes.py --device cuda --bf16 --exe "$bin/bench" --work /tmp/tessera-pisa-bench 2>&1 | tee "$out/pisa_vs_torch.log" | grep -vE "^\s*(encode|unet|decode) [0-9]" || fail "pisa_vs_runtimes"
else
    echo "(no torch with CUDA and diffusers here: Tessera alone)"
    "$bin/bench" 128 128 --device cuda:0 --warm --json 2>"$out/bench-128.err" | tee "$out/bench-128.log" || fail "bench 128"
fi
step "2048² → 8192² on cuda:0 (tiled from the card's free memory)"
"$bin/bench" 2048 2048 --device cuda:0 --memory-mb "${TESSERA_GPU_MEMORY_MB:-32768}" --json 2>"$out/bench-2048.err" | tee "$out/bench-2048.log" || fail "bench 2048"
exit $status
