"""Length-prefixed frames: a 4-byte little-endian length, then that many bytes of UTF-8 JSON
(one object). Mirrors ``protocol/src/frame.rs``."""

from __future__ import annotations

import json
import struct
from typing import Any, Callable, Dict, Optional

from .errors import TesseraError

#: Largest frame either side accepts (1 MiB). Pixels never travel in frames.
MAX_FRAME_LEN = 1 << 20

_HEADER = struct.Struct("<I")


class FrameError(TesseraError):
    """A frame that cannot be read: truncated, oversized, or not one JSON object."""

    def __init__(
        self,
        code: str = "bad_reply",
        message: str = "bad frame",
        hint: str = "",
        job: Optional[int] = None,
    ) -> None:
        super().__init__(code, message, hint, job)


def encode_body(msg: Dict[str, Any]) -> bytes:
    """The JSON body of a message, compact, UTF-8."""
    return json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def encode_frame(msg: Dict[str, Any], max_len: int = MAX_FRAME_LEN) -> bytes:
    """Header and body of one frame, ready for a single ``sendall``."""
    body = encode_body(msg)
    if len(body) > max_len:
        raise FrameError(
            "bad_frame",
            "message of %d bytes is larger than the frame limit of %d bytes" % (len(body), max_len),
        )
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Dict[str, Any]:
    """Parses a frame body; it must be one JSON object."""
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FrameError("bad_reply", "the frame is not valid UTF-8 JSON: %s" % e)
    if not isinstance(msg, dict):
        raise FrameError("bad_reply",
                         "a message must be a JSON object, not %s" % type(msg).__name__)
    return msg


def read_exactly(read: Callable[[int], bytes], n: int) -> bytes:
    """Calls ``read`` until ``n`` bytes have come or it returns b"" (end of stream)."""
    chunks = []
    got = 0
    while got < n:
        chunk = read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(
    read: Callable[[int], bytes],
    max_len: int = MAX_FRAME_LEN,
) -> Optional[Dict[str, Any]]:
    """Reads one frame with ``read`` (e.g. ``stream.read`` or ``sock.recv``) and returns its
    message, or None when the stream ended cleanly between two frames.

    Raises :class:`FrameError` for a stream that ends inside a frame, a frame longer than
    ``max_len``, or a body that is not one JSON object.
    """
    header = read_exactly(read, 4)
    if not header:
        return None
    if len(header) < 4:
        raise FrameError(
            "bad_reply",
            "truncated frame: the stream ended after %d of the 4 header bytes" % len(header))
    (length,) = _HEADER.unpack(header)
    if length > max_len:
        raise FrameError(
            "bad_reply",
            "frame of %d bytes is larger than the limit of %d bytes" % (length, max_len))
    body = read_exactly(read, length)
    if len(body) < length:
        raise FrameError(
            "bad_reply",
            "truncated frame: the header announced %d bytes but the stream ended after %d"
            % (length, len(body)))
    return decode_body(body)
