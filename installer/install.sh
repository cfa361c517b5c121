#!/usr/bin/env bash
# Builds Tessera and installs it for the current user:
#   <prefix>/bin/{tesserad,tessera}
#   <prefix>/lib/tessera/plugins/libtessera_*.so      (tesserad finds them next to itself)
#   <prefix>/python/tessera_client                    (the adapters' shared client)
#   ${XDG_CONFIG_HOME:-~/.config}/GIMP/3.0/plug-ins/tessera-upscale/   (GIMP 3: Filters → Enhance,
#                                                     with its own copy of the client)
#   ${XDG_DATA_HOME:-~/.local/share}/krita/pykrita/tessera_krita{.desktop,/}  (Krita 5 and 6: the docker)
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
gimp=${XDG_CONFIG_HOME:-$HOME/.config}/GIMP/3.0/plug-ins/tessera-upscale
rm -rf "$gimp"
install -d "$gimp"
install -m 755 adapters/gimp/tessera-upscale/tessera-upscale.py "$gimp/"
cp -r "$prefix/python/tessera_client" "$gimp/"
echo "installed the GIMP 3 plug-in into $gimp"
pykrita=${XDG_DATA_HOME:-$HOME/.local/share}/krita/pykrita
rm -rf "$pykrita/tessera_krita"
install -d "$pykrita"
install -m 644 adapters/krita/tessera_krita.desktop "$pykrita/"
cp -r adapters/krita/tessera_krita "$pykrita/"
cp -r "$prefix/python/tessera_client" "$pykrita/tessera_krita/"
find "$pykrita/tessera_krita" -name __pycache__ -prune -exec rm -rf {} +
echo "installed the Krita plugin into $pykrita (enable Tessera in Settings → Configure Krita → Python Plugin Manager)"
echo "installed into $prefix"
echo "  add $prefix/bin to PATH to run 'tessera' from anywhere"
