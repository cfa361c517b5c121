"""Builders for every request and readers for the events that carry data, with no I/O.

Each builder returns exactly the dict that goes on the wire (see ``protocol/golden/``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .buffer import Buffer, Layer
from .errors import TesseraError

#: Major protocol version this client speaks.
PROTOCOL_VERSION = 1

REQUEST_TYPES = ("hello", "alloc", "release", "submit", "cancel", "list", "ping", "render",
                 "release_job")
EVENT_TYPES = ("welcome", "allocated", "released", "queued", "progress", "result", "error",
               "ack", "listing", "pong")

#: Sample types and colour encodings a layout may name.
SAMPLE_TYPES = ("u8", "u16", "f16", "f32")
ENCODINGS = ("srgb", "linear")


def hello(
    id: int,
    client: str,
    token: Optional[str] = None,
    protocol: int = PROTOCOL_VERSION,
) -> Dict[str, Any]:
    msg: Dict[str, Any] = {"type": "hello", "id": id, "protocol": protocol, "client": client}
    if token is not None:
        msg["token"] = token
    return msg


def layout_request(
    width: int,
    height: int,
    channels: int,
    sample: str = "f32",
    encoding: str = "srgb",
    alpha: Optional[bool] = None,
    stride: Optional[int] = None,
) -> Dict[str, Any]:
    """The ``layout`` of an ``alloc``. ``alpha`` defaults to True for 2 or 4 channels; a
    missing ``stride`` means tightly packed rows."""
    if alpha is None:
        alpha = channels in (2, 4)
    lay: Dict[str, Any] = {"width": int(width), "height": int(height),
                           "channels": int(channels), "sample": sample}
    if stride is not None:
        lay["stride"] = int(stride)
    lay["encoding"] = encoding
    lay["alpha"] = bool(alpha)
    return lay


def alloc(
    id: int,
    width: int,
    height: int,
    channels: int,
    sample: str = "f32",
    encoding: str = "srgb",
    alpha: Optional[bool] = None,
    stride: Optional[int] = None,
) -> Dict[str, Any]:
    return {"type": "alloc", "id": id,
            "layout": layout_request(width, height, channels, sample, encoding, alpha, stride)}


def buffer_ref(buf_or_id: Any) -> str:
    """A buffer's id from a :class:`Buffer`, or the given id or path string."""
    if isinstance(buf_or_id, Buffer):
        return buf_or_id.id
    if isinstance(buf_or_id, str):
        return buf_or_id
    raise TypeError("expected a Buffer or a buffer id, not %r" % (buf_or_id,))


def release(id: int, buffer: Any) -> Dict[str, Any]:
    return {"type": "release", "id": id, "buffer": buffer_ref(buffer)}


def submit(
    id: int,
    model: str,
    scale: int,
    input: Any,
    params: Optional[Dict[str, Any]] = None,
    plugin: Optional[str] = None,
    output_sample: Optional[str] = None,
    device: Optional[str] = None,
) -> Dict[str, Any]:
    msg: Dict[str, Any] = {"type": "submit", "id": id}
    if plugin is not None:
        msg["plugin"] = plugin
    msg["model"] = model
    msg["scale"] = int(scale)
    msg["input"] = buffer_ref(input)
    msg["params"] = dict(params) if params else {}
    if output_sample is not None:
        msg["output_sample"] = output_sample
    if device is not None:
        msg["device"] = device
    return msg


def cancel(id: int, job: int) -> Dict[str, Any]:
    return {"type": "cancel", "id": id, "job": int(job)}


def render(
    id: int,
    job: int,
    lambda_pix: float,
    lambda_sem: float,
    output_sample: Optional[str] = None,
) -> Dict[str, Any]:
    """An exact render of finished job ``job`` at (λ_pix, λ_sem): answered like a submit,
    with one ``exact`` layer."""
    msg: Dict[str, Any] = {"type": "render", "id": id, "job": int(job),
                           "lambda_pix": float(lambda_pix), "lambda_sem": float(lambda_sem)}
    if output_sample is not None:
        msg["output_sample"] = output_sample
    return msg


def release_job(id: int, job: int) -> Dict[str, Any]:
    """Frees what a finished job kept for exact renders."""
    return {"type": "release_job", "id": id, "job": int(job)}


def list_(id: int) -> Dict[str, Any]:
    return {"type": "list", "id": id}


def ping(id: int) -> Dict[str, Any]:
    return {"type": "ping", "id": id}


#: Request builders by message type.
BUILDERS = {
    "hello": hello,
    "alloc": alloc,
    "release": release,
    "submit": submit,
    "cancel": cancel,
    "list": list_,
    "ping": ping,
    "render": render,
    "release_job": release_job,
}


# -- events ---------------------------------------------------------------------------------

def parse_buffer(event: Dict[str, Any]) -> Buffer:
    """The (unmapped) buffer of an ``allocated`` event."""
    if "buffer" not in event:
        raise TesseraError("bad_reply", "`allocated` without a buffer: %r" % (event,))
    return Buffer.from_info(event["buffer"])


def parse_layers(event: Dict[str, Any]) -> List[Layer]:
    """The layers of a ``result`` event, bottom first, with unmapped buffers."""
    layers = event.get("layers")
    if not isinstance(layers, list):
        raise TesseraError("bad_reply", "`result` without a list of layers: %r" % (event,))
    return [Layer.from_info(info) for info in layers]


def raise_if_error(event: Dict[str, Any]) -> Dict[str, Any]:
    """Raises :class:`TesseraError` for an ``error`` event; returns any other unchanged."""
    if event.get("type") == "error":
        raise TesseraError.from_event(event)
    return event
