"""Daemon-owned pixel buffers, memory-mapped by path, and the result layers that hold them.

Parsing and mapping are separate: :meth:`Buffer.from_info` only reads the ``buffer`` object of
an ``allocated`` or ``result`` message; :meth:`Buffer.map` opens the file.
"""

from __future__ import annotations

import mmap
from typing import Any, Dict, Optional

from .errors import TesseraError


class Buffer(object):
    """One buffer: ``id``, ``path``, ``size`` (bytes) and ``layout`` (the daemon's layout dict:
    width, height, channels, sample, stride, encoding, alpha).

    Once mapped, ``view`` is a writable ``memoryview`` of ``size`` bytes over the file.
    ``close()`` unmaps it (the daemon's copy lives on until ``Client.release``). A buffer is a
    context manager that unmaps on exit.
    """

    def __init__(
        self,
        id: str,
        path: str,
        size: int,
        layout: Dict[str, Any],
        info: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.id = id
        self.path = path
        self.size = size
        self.layout = layout
        self.info = info if info is not None else {
            "id": id, "path": path, "size": size, "layout": layout}
        self._mmap: Optional[mmap.mmap] = None
        self._view: Optional[memoryview] = None
        self._closed = False

    @classmethod
    def from_info(cls, info: Dict[str, Any]) -> Buffer:
        """Reads a protocol ``buffer`` object (no file is touched)."""
        try:
            return cls(str(info["id"]), str(info["path"]), int(info["size"]), dict(info["layout"]),
                       info)
        except (KeyError, TypeError, ValueError) as e:
            raise TesseraError("bad_reply",
                               "the daemon sent a malformed buffer: %r (%s)" % (info, e))

    # -- mapping ----------------------------------------------------------------------------

    @property
    def mapped(self) -> bool:
        return self._view is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def map(self) -> Buffer:
        """Maps the file read-write (once; later calls do nothing). Returns self."""
        if self._closed:
            raise ValueError("buffer %s was closed" % self.id)
        if self._view is not None:
            return self
        if self.size <= 0:
            raise TesseraError("map_failed", "buffer %s is empty and cannot be mapped" % self.id)
        try:
            with open(self.path, "r+b") as f:
                mm = mmap.mmap(f.fileno(), self.size, access=mmap.ACCESS_WRITE)
        except (OSError, ValueError) as e:
            raise TesseraError(
                "map_failed",
                "cannot map buffer %s at %s: %s" % (self.id, self.path, e),
                "the daemon must run as the same user on the same machine (buffers are shared "
                "files); a buffer is gone once released or once its connection closed")
        self._mmap = mm
        self._view = memoryview(mm)
        return self

    @property
    def view(self) -> memoryview:
        """The writable bytes of the buffer (maps the file on first use)."""
        if self._view is None:
            self.map()
        assert self._view is not None
        return self._view

    def close(self) -> None:
        """Unmaps the file. Never raises; idempotent.

        If memoryviews derived from ``view`` (slices, casts) are still alive, the mapping
        itself stays until they are garbage-collected.
        """
        self._closed = True
        view, mm = self._view, self._mmap
        self._view = None
        self._mmap = None
        if view is not None:
            try:
                view.release()
            except (BufferError, ValueError):
                pass
        if mm is not None:
            try:
                mm.close()
            except (BufferError, ValueError):
                pass

    # -- access -----------------------------------------------------------------------------

    def write(self, data: Any, offset: int = 0) -> None:
        """Copies a bytes-like object (bytes, bytearray, array, memoryview…) into the buffer
        at byte ``offset``."""
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        end = offset + src.nbytes
        if offset < 0 or end > self.size:
            raise ValueError("writing %d bytes at offset %d overruns buffer %s of %d bytes"
                             % (src.nbytes, offset, self.id, self.size))
        self.view[offset:end] = src

    def read(self, offset: int = 0, length: Optional[int] = None) -> bytes:
        """A copy of ``length`` bytes (default: to the end) from byte ``offset``."""
        if length is None:
            length = self.size - offset
        end = offset + length
        if offset < 0 or length < 0 or end > self.size:
            raise ValueError("reading %d bytes at offset %d overruns buffer %s of %d bytes"
                             % (length, offset, self.id, self.size))
        return self.view[offset:end].tobytes()

    def write_pixels(self, data: Any) -> None:
        """Copies tightly packed rows (``width · channels`` samples each) into the buffer,
        honouring its row stride."""
        from .pixels import row_bytes, stride
        row, step = row_bytes(self.layout), stride(self.layout)
        src = memoryview(data).cast("B")
        height = int(self.layout["height"])
        if src.nbytes != row * height:
            raise ValueError("expected %d bytes of pixels for buffer %s, got %d" % (row * height, self.id, src.nbytes))
        if row == step:
            self.write(src)
            return
        for y in range(height):
            self.write(src[y * row:(y + 1) * row], y * step)

    def read_pixels(self) -> bytes:
        """The pixels as tightly packed rows (the row stride's padding left out)."""
        from .pixels import row_bytes, stride
        row, step = row_bytes(self.layout), stride(self.layout)
        height = int(self.layout["height"])
        if row == step:
            return self.read(0, row * height)
        return b"".join(self.read(y * step, row) for y in range(height))

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        lay = self.layout
        return "Buffer(%r, %sx%sx%s %s, %s)" % (
            self.id, lay.get("width"), lay.get("height"), lay.get("channels"), lay.get("sample"),
            "mapped" if self.mapped else ("closed" if self._closed else "unmapped"))


class Layer(object):
    """One layer of a job's result, bottom first.

    ``role``: "base", "pixel_detail" or "semantic_detail" (a job's layers), or "exact" (a
    ``render``'s whole image at chosen λ); ``name``: for people;
    ``blend``: "normal", "grain_merge" or "addition"; ``opacity``; ``offset``: stored value =
    offset + R (0.5 for residuals in integer buffers, else 0); ``buffer``: a :class:`Buffer`.
    """

    def __init__(
        self,
        role: str,
        name: str,
        blend: str,
        opacity: float,
        offset: float,
        buffer: Buffer,
    ) -> None:
        self.role = role
        self.name = name
        self.blend = blend
        self.opacity = opacity
        self.offset = offset
        self.buffer = buffer

    @classmethod
    def from_info(cls, info: Dict[str, Any]) -> Layer:
        """Reads one entry of a ``result``'s ``layers`` (the buffer is not mapped)."""
        try:
            return cls(
                str(info["role"]),
                str(info["name"]),
                str(info["blend"]),
                float(info["opacity"]),
                float(info["offset"]),
                Buffer.from_info(info["buffer"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TesseraError("bad_reply",
                               "the daemon sent a malformed layer: %r (%s)" % (info, e))

    @property
    def residual(self) -> bool:
        """Whether this is a residual (detail) layer rather than a whole image."""
        return self.role in ("pixel_detail", "semantic_detail")

    def __repr__(self) -> str:
        return "Layer(%r, %r, blend=%r, opacity=%r, offset=%r, %r)" % (
            self.role, self.name, self.blend, self.opacity, self.offset, self.buffer)
