#!/usr/bin/env bash
# Builds Tessera and installs it for the current user:
#   <prefix>/bin/{tesserad,tessera}
#   <prefix>/lib/tessera/plugins/libtessera_*.so      (tesserad finds them next to itself)
#   <prefix>/python/tessera_client                    (the adapters' shared client)
# <prefix> defaults to ${XDG_DATA_HOME:-~/.local/share}/tessera, where the Python client
# looks for tesserad; pass another as the first argument.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-${XDG_DATA_HOME:-$HOME/.local/share}/tessera}
cd "$here"
cargo build --release --workspace --locked
install -d "$prefix/bin" "$prefix/lib/tessera/plugins" "$prefix/python"
install -m 755 target/release/tesserad target/release/tessera "$prefix/bin/"
for lib in target/release/libtessera_*.so target/release/libtessera_*.dylib; do
    [ -e "$lib" ] && install -m 644 "$lib" "$prefix/lib/tessera/plugins/"
done
rm -rf "$prefix/python/tessera_client"
cp -r adapters/python/tessera_client "$prefix/python/"
find "$prefix/python" -name __pycache__ -prune -exec rm -rf {} +
echo "installed into $prefix"
echo "  add $prefix/bin to PATH to run 'tessera' from anywhere"
