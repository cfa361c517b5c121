"""Small pure helpers for buffer layouts (the ``layout`` dicts of the protocol).

Samples are native-endian (all supported platforms are little-endian); integer samples map
0..255 / 0..65535 to 0..1. ``struct_format`` gives the ``struct`` code of one sample, e.g. for
``struct.iter_unpack("<" + struct_format("f16") * n, row)``; ``memoryview.cast`` accepts all of
them except ``"e"`` (f16) before Python 3.12.
"""

from __future__ import annotations

from typing import Any, Dict

_SAMPLE_BYTES = {"u8": 1, "u16": 2, "f16": 2, "f32": 4}
_STRUCT_FORMAT = {"u8": "B", "u16": "H", "f16": "e", "f32": "f"}


def sample_bytes(sample: str) -> int:
    """Bytes of one sample: u8 1, u16 2, f16 2, f32 4."""
    try:
        return _SAMPLE_BYTES[sample]
    except KeyError:
        raise ValueError("unknown sample type %r (known: u8, u16, f16, f32)" % (sample,)) from None


def is_integer(sample: str) -> bool:
    """Whether samples are integers (u8, u16), where residual layers are stored as 0.5 + R."""
    sample_bytes(sample)
    return sample in ("u8", "u16")


def struct_format(sample: str) -> str:
    """The ``struct``/``array`` code of one sample: B, H, e or f."""
    sample_bytes(sample)
    return _STRUCT_FORMAT[sample]


def row_bytes(layout: Dict[str, Any]) -> int:
    """Bytes of one row's pixels, without stride padding."""
    return int(layout["width"]) * int(layout["channels"]) * sample_bytes(layout["sample"])


def stride(layout: Dict[str, Any]) -> int:
    """Bytes from one row to the next (tightly packed when the layout gives none)."""
    s = layout.get("stride")
    return row_bytes(layout) if s is None else int(s)


def byte_len(layout: Dict[str, Any]) -> int:
    """Bytes a buffer of this layout holds: every row's stride but the last, which needs only
    its pixels (the daemon's ``Layout::byte_len``)."""
    height = int(layout["height"])
    if height == 0:
        return 0
    return stride(layout) * (height - 1) + row_bytes(layout)
