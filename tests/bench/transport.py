#!/usr/bin/env python3
"""Transport benchmark: a layer through tesserad's shared memory vs through PNG files.

    python3 tests/bench/transport.py [--size 8192] [--repeat 3]

Tessera path (Python client, a real tesserad from target/debug in a private runtime dir):
alloc an N x N RGBA f32 buffer, write the pixels into its mapping, submit model "classic" at
scale 1 (an exact copy, so the job measures transport, not resampling) with f32 output, wait,
copy the result layer back into a preallocated bytearray, release both buffers.

PNG path (what editor plug-ins that shell out to an upscaler do: export the layer to PNG, let
the upscaler read it, import a PNG back): the same pixels as a 16-bit RGBA PNG, encoded to a
file and decoded again with the standard library only (zlib level 6, filter type 0 on every
row); and, when Pillow is importable, with Pillow, which has no 16-bit RGBA mode and so works
on the 8-bit RGBA version of the pixels.

The f32 pixels are u16 values / 65535, so the 16-bit PNG holds them exactly; both the f32 and
the u16/u8 pixels are prepared before any timing (the f32 -> u16 conversion is done by the
editor's own, native exporter, not by a Python plug-in, so it is not charged to the PNG path).

Not a pytest test: it needs several GiB of memory at the default size. Use --size 1024 for a
quick smoke run.
"""

from __future__ import annotations

import argparse
import array
import math
import os
import platform
import random
import resource
import shutil
import statistics
import struct
import sys
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
for _p in (os.path.join(ROOT, "adapters", "python"), TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import harness  # noqa: E402  (tests/harness.py)

try:
    from PIL import Image
    import PIL
except ImportError:  # Pillow is optional
    Image = None
    PIL = None

GIB = 1 << 30
TILE_ROWS = 64           # the test image repeats every 64 rows (zlib's 32 KiB window cannot see it)
CROP = 2048              # side of the crop used when a full-size PNG round trip is too slow
PNG_FULL_LIMIT = 60.0    # seconds: above this (estimated) a PNG round trip is measured on the crop
IDAT_BYTES = 1 << 20     # IDAT chunk size of the stdlib encoder
PNG_SIG = b"\x89PNG\r\n\x1a\n"

pc = time.perf_counter


# -- pixels ---------------------------------------------------------------------------------

def make_pixels(size):
    """The test image as (f32 native-endian RGBA bytes, u16 big-endian RGBA bytes, u8 RGBA
    bytes), all bytearrays of the same N x N pixels.

    Photo-like content: smooth colour gradients plus +-256/65535 noise (about one 8-bit step),
    opaque alpha. Rows repeat with a period of 64, far beyond zlib's window, so PNG compresses
    it like the 64-row tile."""
    w = h = size
    rows = min(TILE_ROWS, h)
    rng = random.Random(20240601)
    tile = array.array("H")
    for y in range(rows):
        fy = y / rows
        for x in range(w):
            fx = x / w
            base = (0.5 + 0.35 * math.sin(6.3 * fx + 2.0 * fy),
                    0.5 + 0.30 * math.cos(4.1 * fx - 3.0 * fy),
                    0.45 + 0.40 * fx * (1.0 - fy))
            for b in base:
                v = int(b * 65535.0 + (rng.random() - 0.5) * 512.0)
                tile.append(0 if v < 0 else 65535 if v > 65535 else v)
            tile.append(65535)
    f32 = array.array("f", [v / 65535.0 for v in tile])
    u8 = bytearray(v >> 8 for v in tile)
    if sys.byteorder == "little":
        tile.byteswap()                           # PNG samples are big-endian

    def fill(t):
        t = bytearray(t)
        row = len(t) // rows
        whole, part = divmod(h, rows)
        out = t * whole
        out += t[:part * row]
        return out

    return fill(f32.tobytes()), fill(tile.tobytes()), fill(u8)


def crop(px, size, side, bpp):
    """The top-left side x side pixels of an N x N image with bpp bytes per pixel."""
    row, out = size * bpp, bytearray()
    for y in range(side):
        out += px[y * row:y * row + side * bpp]
    return out


# -- PNG with the standard library ----------------------------------------------------------

def _chunk(f, tag, data):
    f.write(struct.pack(">I", len(data)))
    f.write(tag)
    f.write(data)
    f.write(struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)) & 0xFFFFFFFF))


def stdlib_encode(path, side, px):
    """Writes big-endian u16 RGBA rows as a 16-bit RGBA PNG: filter type 0, zlib level 6."""
    row = side * 8
    mv = memoryview(px)
    z = zlib.compressobj(6)
    with open(path, "wb") as f:
        f.write(PNG_SIG)
        _chunk(f, b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0))
        pending, n = [], 0
        for y in range(side):
            for piece in (z.compress(b"\x00"), z.compress(mv[y * row:(y + 1) * row])):
                if piece:
                    pending.append(piece)
                    n += len(piece)
            if n >= IDAT_BYTES:
                _chunk(f, b"IDAT", b"".join(pending))
                pending, n = [], 0
        pending.append(z.flush())
        _chunk(f, b"IDAT", b"".join(pending))
        _chunk(f, b"IEND", b"")


def stdlib_decode(path):
    """Reads a 16-bit RGBA PNG (CRCs checked, IDAT inflated, filter bytes stripped: only
    filter type 0 is handled, which is what stdlib_encode writes). Returns the u16 rows."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != PNG_SIG:
        raise ValueError("not a PNG")
    mv = memoryview(data)
    z = zlib.decompressobj()
    raw = bytearray()
    pos, side = 8, None
    while True:
        n, tag = struct.unpack_from(">I4s", data, pos)
        body = mv[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + n)
        if zlib.crc32(body, zlib.crc32(tag)) & 0xFFFFFFFF != crc:
            raise ValueError("bad CRC in %r" % tag)
        pos += 12 + n
        if tag == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if (depth, ctype, interlace) != (16, 6, 0) or w != h:
                raise ValueError("only square 16-bit RGBA, non-interlaced")
            side = w
        elif tag == b"IDAT":
            raw += z.decompress(body)
        elif tag == b"IEND":
            break
    raw += z.flush()
    row = side * 8
    stride = row + 1
    if len(raw) != side * stride:
        raise ValueError("IDAT holds %d bytes, expected %d" % (len(raw), side * stride))
    out = bytearray(side * row)
    om, rm = memoryview(out), memoryview(raw)
    for y in range(side):
        if raw[y * stride] != 0:
            raise NotImplementedError("filter type %d" % raw[y * stride])
        om[y * row:(y + 1) * row] = rm[y * stride + 1:(y + 1) * stride]
    return out


# -- PNG with Pillow (8-bit RGBA: Pillow has no 16-bit RGBA mode) ---------------------------

def pillow_encode(path, side, px):
    im = Image.frombytes("RGBA", (side, side), px)
    im.save(path, "PNG", compress_level=6)


def pillow_decode(path):
    with Image.open(path) as im:
        im.load()
        return im.tobytes()


# -- measuring ------------------------------------------------------------------------------

def png_round_trips(label, encode, decode, px, size, bpp, repeat, folder):
    """Encodes and decodes `repeat` times. When one round trip at full size would take more
    than PNG_FULL_LIMIT seconds (estimated from a CROP x CROP crop), measures the crop and
    scales linearly by pixel count. Returns a dict of median seconds (full-size equivalent)."""
    path = os.path.join(folder, label + ".png")

    def once(side, pixels):
        t0 = pc()
        encode(path, side, pixels)
        t1 = pc()
        back = decode(path)
        t2 = pc()
        if back != pixels:
            raise AssertionError("%s: decoded pixels differ from the encoded ones" % label)
        return t1 - t0, t2 - t1, os.path.getsize(path)

    runs, side, pixels, scale = [], size, px, 1.0
    if size > CROP:
        small = crop(px, size, CROP, bpp)
        first = once(CROP, small)
        estimate = (first[0] + first[1]) * (size * size) / (CROP * CROP)
        if estimate > PNG_FULL_LIMIT:
            side, pixels, scale = CROP, small, (size * size) / (CROP * CROP)
            runs.append(first)
        del small
    while len(runs) < repeat:
        runs.append(once(side, pixels))
    os.remove(path)
    enc = statistics.median(r[0] for r in runs) * scale
    dec = statistics.median(r[1] for r in runs) * scale
    return {"encode": enc, "decode": dec, "total": enc + dec, "measured_side": side,
            "scale": scale, "file_bytes": runs[-1][2] * scale, "bytes": size * size * bpp}


def tessera_once(client, size, src, out):
    t = {}
    t0 = pc()
    buf = client.alloc(size, size, 4, sample="f32")
    t1 = pc()
    if buf.size != len(src):
        raise AssertionError("buffer is %d bytes, pixels are %d" % (buf.size, len(src)))
    buf.view[:] = src
    t2 = pc()
    job = client.submit("classic", 1, buf, output_sample="f32")
    layers = job.wait(timeout=None)
    t3 = pc()
    res = layers[0].buffer
    if res.size != len(out):
        raise AssertionError("result is %d bytes, expected %d" % (res.size, len(out)))
    memoryview(out)[:] = res.view
    t4 = pc()
    client.release(buf)
    for layer in layers:
        client.release(layer)
    t5 = pc()
    t.update(alloc=t1 - t0, write=t2 - t1, submit=t3 - t2, read=t4 - t3, release=t5 - t4,
             total=t5 - t0, job_seconds=job.seconds or 0.0, layers=len(layers))
    if out != src:
        raise AssertionError("the x1 result differs from the input")
    return t


def pick_tmp(need):
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        st = os.statvfs(shm)
        free = st.f_bavail * st.f_frsize
        if free >= need:
            return shm, free, "tmpfs /dev/shm"
    st = os.statvfs(tempfile.gettempdir())
    return tempfile.gettempdir(), st.f_bavail * st.f_frsize, "fallback (/dev/shm missing or < %.1f GiB free)" % (need / GIB)


# -- main -----------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8192, help="layer side in pixels (default 8192)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each path; medians are shown")
    args = ap.parse_args()
    size, repeat = args.size, max(1, args.repeat)
    if size < 1:
        ap.error("--size must be positive")

    f32_bytes = size * size * 16
    mpx = size * size / 1e6
    need = max(3 * GIB, 3 * f32_bytes)
    base, free, why = pick_tmp(need)
    runtime = tempfile.mkdtemp(prefix="tessera-bench-", dir=base)
    png_dir = os.path.join(runtime, "png")
    os.makedirs(png_dir)

    print("Tessera transport benchmark: %dx%d RGBA f32 layer (%.1f Mpx, %d bytes = %.3f GiB)"
          % (size, size, mpx, f32_bytes, f32_bytes / GIB))
    print("python %s, %s, Pillow %s" % (platform.python_version(), platform.machine(),
                                        PIL.__version__ if PIL else "not installed"))
    print("temp dir: %s (%s, %.1f GiB free)" % (runtime, why, free / GIB))
    daemon_exe = harness.exe("tesserad")
    debug = os.sep + "debug" + os.sep in daemon_exe
    print("tesserad: %s%s" % (daemon_exe, " (unoptimised debug build)" if debug else ""))

    t0 = pc()
    f32, u16, u8 = make_pixels(size)
    print("pixels prepared in %.1f s (not timed below)" % (pc() - t0))

    limit = str(max(8 * GIB, 4 * f32_bytes))
    daemon = None
    try:
        daemon = harness.Daemon(runtime, args=[
            "--max-side", str(max(65536, size)),
            "--max-pixels", str(max(1 << 30, size * size)),
            "--max-buffer-bytes", str(max(8 * GIB, f32_bytes)),
            "--max-client-bytes", limit])
        out = bytearray(f32_bytes)
        runs = []
        with daemon.client(timeout=120.0) as client:
            # Warm-up on a tiny layer, so the plug-in's first job is not in the figures.
            tessera_once(client, 16, make_pixels(16)[0], bytearray(16 * 16 * 16))
            for _ in range(repeat):
                runs.append(tessera_once(client, size, f32, out))
        del out
        tess = {k: statistics.median(r[k] for r in runs)
                for k in ("alloc", "write", "submit", "read", "release", "total", "job_seconds")}

        std = png_round_trips("stdlib16", stdlib_encode, stdlib_decode, u16, size, 8, repeat,
                              png_dir)
        pil = None
        if Image is not None:
            Image.MAX_IMAGE_PIXELS = None
            pil = png_round_trips("pillow8", pillow_encode, pillow_decode, u8, size, 4, repeat,
                                  png_dir)
    finally:
        code = daemon.stop() if daemon is not None else None
        shutil.rmtree(runtime, ignore_errors=True)

    def row(name, secs, nbytes, note=""):
        gbs = "%7.2f" % (nbytes / secs / 1e9) if nbytes and secs > 0 else "      -"
        rate = "%8.1f" % (mpx / secs) if secs > 0 else "       -"
        print(("  %-34s %9.3f %s %s  %s" % (name, secs, rate, gbs, note)).rstrip())

    print()
    print("Medians of %d run(s). Mpx/s counts layer pixels; GB/s = 10^9 bytes/s of the bytes "
          "that path handles." % repeat)
    print("  %-34s %9s %8s %7s" % ("phase", "seconds", "Mpx/s", "GB/s"))
    print("Tessera, shared memory, f32 (%.3f GiB in, %.3f GiB out):" % (f32_bytes / GIB, f32_bytes / GIB))
    row("alloc", tess["alloc"], f32_bytes)
    row("write (memoryview copy in)", tess["write"], f32_bytes)
    row("submit + wait (classic x1)", tess["submit"], f32_bytes,
        "daemon job time %.3f s" % tess["job_seconds"])
    row("read-back (copy out)", tess["read"], f32_bytes)
    row("release x2", tess["release"], f32_bytes)
    row("round trip", tess["total"], 2 * f32_bytes, "GB/s over in + out")

    def png_block(title, r):
        note = ""
        if r["scale"] != 1.0:
            note = "scaled x%g from a %dx%d crop" % (r["scale"], r["measured_side"], r["measured_side"])
        print("%s (%.3f GiB raw, PNG file %.0f MiB%s):" % (
            title, r["bytes"] / GIB, r["file_bytes"] / (1 << 20),
            ", estimated" if r["scale"] != 1.0 else ""))
        row("encode (filter+deflate+write)", r["encode"], r["bytes"], note)
        row("decode (read+inflate+unfilter)", r["decode"], r["bytes"], note)
        row("round trip", r["total"], 2 * r["bytes"], "GB/s over in + out")

    png_block("PNG 16-bit RGBA, stdlib zlib level 6, filter 0", std)
    if pil is not None:
        png_block("PNG 8-bit RGBA, Pillow %s compress_level 6 (no 16-bit RGBA in Pillow)"
                  % PIL.__version__, pil)
    else:
        print("PNG via Pillow: skipped, Pillow is not installed")

    print()
    print("Ratio PNG round trip / Tessera round trip (times faster through shared memory):")
    print("  stdlib 16-bit PNG: %6.1fx" % (std["total"] / tess["total"]))
    if pil is not None:
        print("  Pillow  8-bit PNG: %6.1fx  (half the bytes of the 16-bit file, 8-bit precision)"
              % (pil["total"] / tess["total"]))
    print("  (PNG is charged one encode + one decode; the plug-in workflow does both twice:"
          " layer out, result back.)")
    print()
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print("peak RSS: benchmark process %.2f GiB (mapped buffers included), tesserad %.2f GiB;"
          " tesserad exit code %s" % (me / (1 << 20), kids / (1 << 20), code))


if __name__ == "__main__":
    main()
