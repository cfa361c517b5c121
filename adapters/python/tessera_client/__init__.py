"""Python client for tesserad, the Tessera upscaling daemon. Standard library only, Python 3.8+.

    from tessera_client import Client
    with Client.connect(client="myeditor/1.0") as c:
        buf = c.alloc(640, 480, 4)              # f32 sRGB RGBA, mapped
        buf.write(pixels)                       # or fill buf.view
        job = c.submit("classic", 2, buf)
        layers = job.wait(progress=print)       # Layer objects, buffers mapped
        ...
        c.release(buf)

The wire protocol is documented in protocol/README.md.
"""

from __future__ import annotations

from .buffer import Buffer, Layer
from .client import Client, Job
from .errors import DaemonNotFound, TesseraError
from .frame import MAX_FRAME_LEN, FrameError
from .messages import PROTOCOL_VERSION
from .models import BY_PARAMS, BY_RENDER, exact_render_kind, exact_render_params
from .paths import (find_daemon, log_path, read_token, runtime_dir, socket_path, start_daemon,
                    token_path)

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "Client",
    "DaemonNotFound",
    "FrameError",
    "Job",
    "Layer",
    "MAX_FRAME_LEN",
    "PROTOCOL_VERSION",
    "TesseraError",
    "exact_render_params",
    "exact_render_kind",
    "BY_PARAMS",
    "BY_RENDER",
    "find_daemon",
    "log_path",
    "read_token",
    "runtime_dir",
    "socket_path",
    "start_daemon",
    "token_path",
]
