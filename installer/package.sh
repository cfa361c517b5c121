#!/usr/bin/env bash
# Release packages for users without a Rust toolchain, both in the layout `tessera install`
# reads (bin/, lib/tessera/plugins/, share/tessera/adapters/):
#   <out>/tessera-VERSION-linux-ARCH.tar.gz   unpack, then ./install.sh [--prefix P] [--service]
#   <out>/tessera_VERSION_DEBARCH.deb          the same tree in /usr/lib/tessera, tessera and
#                                              tesserad on /usr/bin; each user then runs
#                                              `tessera install` (plug-ins live in user profiles)
# Usage: installer/package.sh [--no-build] [--bin-dir DIR] [--out DIR]
#   --no-build     package what DIR already holds (default DIR: target/release, built here)
#   --out DIR      where the packages go (default: dist)
set -euo pipefail
cd "$(dirname "$0")/.."
build=1 bins=target/release out=dist
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0 ;;
        --bin-dir) bins=$2; shift ;;
        --out) out=$2; shift ;;
        *) echo "package.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$build" = 1 ]; then
    cargo build --release --workspace --locked
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
debarch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
name=tessera-$version-linux-$(uname -m)
mkdir -p "$out"
out=$(cd "$out" && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# The tree `tessera install` copies from (host/src/install.rs, Sources::beside).
layout() {
    install -d "$1/bin" "$1/lib/tessera/plugins" "$1/share/tessera"
    install -m 755 "$bins/tesserad" "$bins/tessera" "$1/bin/"
    install -m 644 "$bins"/libtessera_*.so "$1/lib/tessera/plugins/"
    # Debug information is for developers (a debug build's is most of its size).
    strip --strip-debug "$1"/bin/* "$1"/lib/tessera/plugins/*
    cp -r adapters "$1/share/tessera/adapters"
    find "$1/share/tessera/adapters" -name __pycache__ -prune -exec rm -rf {} +
    find "$1/share/tessera/adapters" -type f -exec chmod 644 {} +
    chmod 755 "$1/share/tessera/adapters/gimp/tessera-upscale/tessera-upscale.py"
}

layout "$stage/$name"
install -m 755 installer/install.sh "$stage/$name/install.sh"
install -m 644 README.md "$stage/$name/README.md"
tar -C "$stage" --owner=0 --group=0 -czf "$out/$name.tar.gz" "$name"
echo "$out/$name.tar.gz"

deb=$stage/deb
layout "$deb/usr/lib/tessera"
install -d "$deb/usr/bin" "$deb/DEBIAN"
ln -s ../lib/tessera/bin/tessera "$deb/usr/bin/tessera"
ln -s ../lib/tessera/bin/tesserad "$deb/usr/bin/tesserad"
size=$(du -sk "$deb/usr" | cut -f1)
cat > "$deb/DEBIAN/control" <<CONTROL
Package: tessera
Version: $version
Architecture: $debarch
Maintainer: Tessera <tessera@localhost>
Depends: libc6 (>= 2.31), libgcc-s1
Recommends: python3
Suggests: gimp (>= 3.0), krita
Installed-Size: $size
Section: graphics
Priority: optional
Description: upscale images into blendable layers inside GIMP 3 and Krita
 Tessera's daemon (tesserad), command line (tessera) and engines: classic resampling,
 SRResNet/SRGAN and Real-ESRGAN, and PiSA-SR one-step diffusion. Each user runs
 "tessera install" once to put the GIMP 3 plug-in and the Krita plugin in place.
CONTROL
dpkg-deb --root-owner-group -Zgzip --build "$deb" "$out/tessera_${version}_${debarch}.deb" >/dev/null
echo "$out/tessera_${version}_${debarch}.deb"
