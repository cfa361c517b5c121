#!/usr/bin/env bash
# Tessera's set-up command: builds in release mode (unless prebuilt binaries lie beside this
# script, as in a release tarball), then runs `tessera install` with the arguments given:
#   <prefix>/bin/{tesserad,tessera}, <prefix>/lib/tessera/plugins/, <prefix>/python/
#       (prefix: --prefix, default ~/.local/share/tessera, where the adapters look)
#   the GIMP 3 plug-in into every ~/.config/GIMP/3.x profile (3.0 if there is none yet)
#   the Krita plugin into ~/.local/share/krita/pykrita, enabled in ~/.config/kritarc
#   the default model (srgan-pair) fetched into the model store (--no-model skips it)
#   --service: a systemd user unit for tesserad
# `tessera doctor` then checks it all; `tessera uninstall` undoes it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ -x "$here/bin/tessera" ]; then
    exec "$here/bin/tessera" install "$@"
fi
cd "$here/.."
cargo build --release --workspace --locked
exec target/release/tessera install "$@"
