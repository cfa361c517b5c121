#!/usr/bin/env bash
# Builds, here, what tests/gpu/run.sh runs on a machine with an NVIDIA card (that machine has
# no network and no cargo): release builds with the `cuda` feature and kernels optimised for
# one architecture (CUDA_COMPUTE_CAP, default 90: H100 and H200), stripped and xz-packed into
# target/gpu-carry/ so that they travel with the working tree (the device tool's `carry`).
#
#   tests/gpu/build.sh && du -sh target/gpu-carry
set -euo pipefail
cd "$(dirname "$0")/../.."
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
eval "$(tests/gpu/toolkit.sh)"
target=target/gpu
features=(-p tessera-pisa --features tessera-pisa/cuda)
cargo build --release --locked --target-dir "$target" "${features[@]}" --lib --example bench
tests=$(cargo test --release --locked --target-dir "$target" "${features[@]}" --test parity --test tiling --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')
# The daemon, the CLI and the classic engine: CPU code, the default build.
cargo build --release --locked -p tessera-host -p tessera-classic

carry=target/gpu-carry
rm -rf "$carry" && mkdir -p "$carry"
pack() { strip --strip-debug -o "$carry/$2" "$1" && xz -T2 -6 "$carry/$2"; }
pack "$target/release/libtessera_pisa.so" libtessera_pisa.so
pack "$target/release/examples/bench" bench
while read -r name path; do pack "$path" "test-$name"; done <<<"$tests"
for f in tesserad tessera libtessera_classic.so; do pack "target/release/$f" "$f"; done
echo "compute capability $CUDA_COMPUTE_CAP, CUDA $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')" > "$carry/BUILD"
du -sh "$carry"
