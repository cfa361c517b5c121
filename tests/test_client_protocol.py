"""The Python client against the protocol's golden examples, with no daemon: request
builders, event parsing, framing, paths, daemon lookup, and the client's routing and
concurrency driven by an in-process fake daemon over a socket pair."""

import io
import json
import os
import socket
import stat
import struct
import sys
import threading
import time

import pytest

from conftest import GOLDEN_DIR, load_golden

import tessera_client
from tessera_client import (Buffer, Client, DaemonNotFound, Layer, TesseraError, find_daemon,
                            runtime_dir, socket_path)
from tessera_client import messages, pixels
from tessera_client.frame import MAX_FRAME_LEN, FrameError, encode_frame, read_frame

GOLDEN_NAMES = sorted(f[:-5] for f in os.listdir(GOLDEN_DIR) if f.endswith(".json"))

# Each request golden, rebuilt from plain arguments by the client's builder.
REQUEST_BUILDS = {
    "hello": lambda: messages.hello(1, "gimp/3.0.4", token="5f2b8c0e9d4a4a61b7c3e2d1f0a9b8c7"),
    "alloc": lambda: messages.alloc(2, 640, 480, 4, "f32", encoding="srgb", alpha=True,
                                    stride=10240),
    "release": lambda: messages.release(3, "b1"),
    "submit": lambda: messages.submit(4, "classic", 2, "b1", params={"filter": "bicubic"},
                                      plugin="classic", output_sample="f32"),
    "cancel": lambda: messages.cancel(5, 7),
    "list": lambda: messages.list_(6),
    "ping": lambda: messages.ping(7),
    "render": lambda: messages.render(9, 3, 1.2, 0.8, output_sample="u16"),
    "release_job": lambda: messages.release_job(10, 3),
}


# -- goldens --------------------------------------------------------------------------------

def test_goldens_are_exactly_the_protocol_types():
    assert GOLDEN_NAMES == sorted(messages.REQUEST_TYPES + messages.EVENT_TYPES)
    assert set(REQUEST_BUILDS) == set(messages.REQUEST_TYPES) == set(messages.BUILDERS)


@pytest.mark.parametrize("name", sorted(REQUEST_BUILDS))
def test_request_builder_matches_golden(name):
    built = REQUEST_BUILDS[name]()
    assert built == load_golden(name)
    # And what goes on the wire decodes to the same message.
    assert read_frame(io.BytesIO(encode_frame(built)).read) == load_golden(name)


def test_builder_defaults():
    assert messages.hello(1, "x") == {"type": "hello", "id": 1, "protocol": 1, "client": "x"}
    lay = messages.alloc(2, 3, 2, 4)["layout"]
    assert lay == {"width": 3, "height": 2, "channels": 4, "sample": "f32", "encoding": "srgb",
                   "alpha": True}
    assert messages.alloc(2, 3, 2, 3, "u8")["layout"]["alpha"] is False
    assert messages.alloc(2, 3, 2, 2, "u16")["layout"]["alpha"] is True
    assert messages.alloc(2, 3, 2, 4, alpha=False)["layout"]["alpha"] is False
    sub = messages.submit(9, "classic", 4, Buffer("b3", "/x", 1, {}))
    assert sub == {"type": "submit", "id": 9, "model": "classic", "scale": 4, "input": "b3",
                   "params": {}}
    assert messages.release(3, Buffer("b1", "/x", 1, {})) == load_golden("release")
    with pytest.raises(TypeError):
        messages.release(3, 17)


def test_allocated_golden_parses_without_mapping(golden):
    buf = messages.parse_buffer(golden("allocated"))
    assert (buf.id, buf.path, buf.size) == ("b1", "/run/user/1000/tessera/buffers/c1-b1.buf",
                                            4915200)
    assert buf.layout == golden("alloc")["layout"]
    assert not buf.mapped and not buf.closed
    assert pixels.byte_len(buf.layout) == buf.size


def test_result_golden_parses_into_layers(golden):
    ev = golden("result")
    layers = messages.parse_layers(ev)
    assert len(layers) == 1
    layer = layers[0]
    assert isinstance(layer, Layer)
    assert layer.role == "base" and not layer.residual
    assert layer.name == "Tessera ×2 · base"
    assert (layer.blend, layer.opacity, layer.offset) == ("normal", 1.0, 0.0)
    buf = layer.buffer
    assert isinstance(buf, Buffer) and not buf.mapped
    assert (buf.id, buf.path, buf.size) == ("b2", "/run/user/1000/tessera/buffers/c1-b2.buf",
                                            19660800)
    assert buf.layout["width"] == 1280 and buf.layout["stride"] == 20480
    assert pixels.byte_len(buf.layout) == buf.size


def test_error_golden_becomes_tessera_error(golden):
    ev = golden("error")
    with pytest.raises(TesseraError) as info:
        messages.raise_if_error(ev)
    e = info.value
    assert (e.code, e.message, e.job) == ("cancelled", "job 7 was cancelled", 7)
    assert e.hint == "the job was cancelled; submit it again to rerun it"
    assert e.event == ev
    assert e.message in str(e) and e.hint in str(e)
    assert messages.raise_if_error(golden("pong")) == golden("pong")


def test_malformed_result_is_a_bad_reply(golden):
    ev = golden("result")
    del ev["layers"][0]["buffer"]["path"]
    with pytest.raises(TesseraError) as info:
        messages.parse_layers(ev)
    assert info.value.code == "bad_reply"


def test_pixels_helpers(golden):
    lay = golden("alloc")["layout"]
    assert [pixels.sample_bytes(s) for s in ("u8", "u16", "f16", "f32")] == [1, 2, 2, 4]
    assert pixels.row_bytes(lay) == 640 * 4 * 4
    assert pixels.byte_len({"width": 3, "height": 2, "channels": 3, "sample": "u8",
                            "stride": 12}) == 12 + 9
    assert pixels.byte_len({"width": 3, "height": 2, "channels": 4, "sample": "f32"}) == 96
    assert pixels.is_integer("u16") and not pixels.is_integer("f16")
    assert struct.calcsize(pixels.struct_format("f16")) == 2
    with pytest.raises(ValueError):
        pixels.sample_bytes("f64")


def test_readme_shows_every_golden_and_error_code():
    import re
    root = os.path.dirname(GOLDEN_DIR)
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name in GOLDEN_NAMES:
        with open(os.path.join(GOLDEN_DIR, name + ".json"), encoding="utf-8") as f:
            body = f.read().rstrip("\n")
        assert "```json\n" + body + "\n```" in readme, name
    with open(os.path.join(root, "src", "messages.rs"), encoding="utf-8") as f:
        src = f.read()
    enum = src[src.index("pub enum ErrorCode"):src.index("impl ErrorReply")]
    for variant in re.findall(r"^\s*(\w+),$", enum, re.M):
        code = re.sub(r"(?<!^)([A-Z])", r"_\1", variant).lower()
        assert "| `%s` |" % code in readme, code


# -- frames ---------------------------------------------------------------------------------

def test_frame_round_trip():
    msgs = [load_golden(n) for n in GOLDEN_NAMES]
    wire = b"".join(encode_frame(m) for m in msgs)
    stream = io.BytesIO(wire)
    assert [read_frame(stream.read) for _ in msgs] == msgs
    assert read_frame(stream.read) is None  # clean end between frames


def test_frame_header_is_little_endian_length():
    frame = encode_frame({"type": "ping", "id": 7})
    (length,) = struct.unpack("<I", frame[:4])
    assert length == len(frame) - 4
    assert json.loads(frame[4:].decode("utf-8")) == {"type": "ping", "id": 7}


@pytest.mark.parametrize("wire", [
    b"\x05\x00",                        # inside the header
    b"\x05\x00\x00\x00{}",              # inside the body
    encode_frame({"type": "pong", "id": 1})[:-1],
])
def test_truncated_frame_raises(wire):
    with pytest.raises(FrameError):
        read_frame(io.BytesIO(wire).read)


def test_oversized_and_non_object_frames_raise():
    with pytest.raises(FrameError):
        read_frame(io.BytesIO(b"\xff\xff\xff\x7f").read)
    with pytest.raises(FrameError):
        read_frame(io.BytesIO(struct.pack("<I", 5) + b"[1,2]").read)
    with pytest.raises(FrameError):
        read_frame(io.BytesIO(struct.pack("<I", 5) + b"{nope").read)
    with pytest.raises(FrameError):
        encode_frame({"type": "submit", "params": {"x": "a" * MAX_FRAME_LEN}})


# -- paths ----------------------------------------------------------------------------------

def test_runtime_dir_and_socket_path(clean_env, tmp_path):
    import tempfile
    uid = str(os.getuid()) if hasattr(os, "getuid") else None
    if uid is not None:
        assert runtime_dir() == os.path.join(tempfile.gettempdir(), "tessera-" + uid)
    clean_env.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert runtime_dir() == "/run/user/1000/tessera"
    assert socket_path() == "/run/user/1000/tessera/tesserad.sock"
    clean_env.setenv("TESSERA_RUNTIME_DIR", str(tmp_path / "rt"))
    assert runtime_dir() == str(tmp_path / "rt")
    assert socket_path() == os.path.join(str(tmp_path / "rt"), "tesserad.sock")
    clean_env.setenv("TESSERA_SOCKET", str(tmp_path / "other.sock"))
    assert socket_path() == str(tmp_path / "other.sock")
    assert runtime_dir() == str(tmp_path / "rt")
    clean_env.setenv("TESSERA_RUNTIME_DIR", "")  # empty counts as unset
    assert runtime_dir() == "/run/user/1000/tessera"


def test_token_lookup(clean_env, tmp_path):
    from tessera_client.paths import read_token, token_path
    clean_env.setenv("HOME", str(tmp_path))
    assert token_path() == os.path.join(str(tmp_path), ".config", "tessera", "token")
    assert read_token() is None
    clean_env.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    os.makedirs(str(tmp_path / "cfg" / "tessera"))
    (tmp_path / "cfg" / "tessera" / "token").write_text("abc123\n")
    assert read_token() == "abc123"
    clean_env.setenv("TESSERA_TOKEN", "fromenv")
    assert read_token() == "fromenv"


def _fake_exe(directory):
    os.makedirs(str(directory), exist_ok=True)
    path = os.path.join(str(directory), "tesserad")
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(path, 0o755)
    return path


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX executables")
def test_find_daemon_search_order(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path / "home"))
    clean_env.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DaemonNotFound) as info:
        find_daemon()
    e = info.value
    assert isinstance(e, TesseraError) and e.code == "daemon_not_found"
    assert "TESSERA_BIN_DIR" in e.message and "TESSERA_BIN_DIR" in e.hint
    assert os.path.join(str(tmp_path / "home"), ".local", "share", "tessera", "bin") in e.message
    assert "PATH" in e.message

    on_path = _fake_exe(tmp_path / "pathbin")
    clean_env.setenv("PATH", str(tmp_path / "pathbin"))
    assert find_daemon() == on_path

    home_data = _fake_exe(tmp_path / "home" / ".local" / "share" / "tessera" / "bin")
    assert find_daemon() == home_data

    xdg_data = _fake_exe(tmp_path / "xdg" / "tessera" / "bin")
    clean_env.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert find_daemon() == xdg_data

    clean_env.setenv("TESSERA_BIN_DIR", str(tmp_path / "bindir"))
    assert find_daemon() == xdg_data  # an empty TESSERA_BIN_DIR is passed over
    explicit = _fake_exe(tmp_path / "bindir")
    assert find_daemon() == explicit

    # Not executable: skipped.
    os.chmod(explicit, 0o644)
    assert find_daemon() == xdg_data


# -- the client against a fake daemon ---------------------------------------------------------

def _read(sock):
    return read_frame(sock.recv)


class FakeDaemon(object):
    """Answers a Client over a socket pair. ``handler(msg, send)`` answers each request after
    the hello (default: golden replies with the request's id)."""

    def __init__(self, handler=None, sock=None):
        if sock is None:
            self.client_sock, self.sock = socket.socketpair()
        else:
            self.client_sock, self.sock = None, sock
        self.received = []
        self.handler = handler or self.golden_reply
        self.send_lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve)
        self.thread.daemon = True
        self.thread.start()

    def send(self, msg):
        with self.send_lock:
            self.sock.sendall(encode_frame(msg))

    def serve(self):
        try:
            while True:
                msg = _read(self.sock)
                if msg is None:
                    break
                self.received.append(msg)
                if msg["type"] == "hello":
                    welcome = load_golden("welcome")
                    welcome["id"] = msg["id"]
                    self.send(welcome)
                else:
                    self.handler(msg, self.send)
        except (OSError, FrameError):
            pass

    @staticmethod
    def golden_reply(msg, send):
        reply = load_golden({"ping": "pong", "list": "listing", "release": "released",
                             "cancel": "ack"}[msg["type"]])
        reply["id"] = msg["id"]
        send(reply)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def fake():
    daemons = []

    def make(handler=None):
        d = FakeDaemon(handler)
        c = Client(d.client_sock, timeout=5.0)
        daemons.append((d, c))
        return d, c

    yield make
    for d, c in daemons:
        c.close()
        d.close()


def test_handshake_ping_list_release(fake, golden):
    d, c = fake()
    welcome = c.handshake("gimp/3.0.4")
    assert c.welcome == welcome and welcome["daemon"] == "tesserad 0.1.0"
    assert c.limits == golden("welcome")["limits"]
    assert d.received[0] == {"type": "hello", "id": 1, "protocol": 1, "client": "gimp/3.0.4"}
    assert c.ping()["type"] == "pong"
    listing = c.list()
    assert listing["workers"][-1]["state"] == "idle" and listing["devices"][0]["id"] == "cuda:0"
    c.release("b1")
    assert d.received[-1] == {"type": "release", "id": d.received[-1]["id"], "buffer": "b1"}
    ids = [m["id"] for m in d.received]
    assert ids == sorted(set(ids))  # fresh, increasing ids


def test_concurrent_requests_are_routed_by_id(fake):
    """Replies arrive in reverse order; each thread still gets its own."""
    pending = []
    lock = threading.Lock()

    def handler(msg, send):
        with lock:
            pending.append(msg)
            if len(pending) < 8:
                return
            batch = list(reversed(pending))
        for m in batch:
            send({"type": "pong", "id": m["id"], "echo": m["id"]})

    d, c = fake(handler)
    got = {}
    errors = []

    def worker(i):
        try:
            got[i] = c.ping()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert sorted(p["id"] for p in got.values()) == sorted(m["id"] for m in pending)
    assert all(p["echo"] == p["id"] for p in got.values())


def _buffer_file(tmp_path, name, layout):
    path = str(tmp_path / name)
    size = pixels.byte_len(layout)
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    return {"id": name, "path": path, "size": size, "layout": layout}


def test_alloc_write_submit_progress_result(fake, tmp_path, golden):
    in_layout = {"width": 2, "height": 2, "channels": 4, "sample": "u8", "stride": 8,
                 "encoding": "srgb", "alpha": True}
    out_layout = dict(in_layout, width=4, height=4, stride=16)
    in_info = _buffer_file(tmp_path, "b1", in_layout)
    out_info = _buffer_file(tmp_path, "b2", out_layout)
    with open(out_info["path"], "r+b") as f:
        f.write(b"\x80" * out_info["size"])

    def handler(msg, send):
        if msg["type"] == "alloc":
            send({"type": "allocated", "id": msg["id"], "buffer": in_info})
        elif msg["type"] == "submit":
            rid = msg["id"]
            send({"type": "queued", "id": rid, "job": 7, "position": 0})
            for done in (1, 2):
                send({"type": "progress", "id": rid, "job": 7, "done": done, "total": 2,
                      "stage": "lanczos3", "eta": None})
            result = golden("result")
            result["id"] = rid
            result["layers"][0]["buffer"] = out_info
            result["layers"].append({"role": "pixel_detail", "name": "Tessera ×2 · pixel detail",
                                     "buffer": out_info, "blend": "grain_merge", "opacity": 1.0,
                                     "offset": 0.5, "future_field": 1})
            send(result)
        else:
            FakeDaemon.golden_reply(msg, send)

    d, c = fake(handler)
    buf = c.alloc(2, 2, 4, "u8")
    assert d.received[-1]["layout"] == {"width": 2, "height": 2, "channels": 4, "sample": "u8",
                                        "encoding": "srgb", "alpha": True}
    assert buf.mapped and len(buf.view) == 16
    buf.write(bytes(range(16)))
    buf.write(b"\xff\xfe", offset=14)
    with open(in_info["path"], "rb") as f:
        assert f.read() == bytes(range(14)) + b"\xff\xfe"
    with pytest.raises(ValueError):
        buf.write(b"x" * 17)

    job = c.submit("classic", 2, buf, params={"filter": "bicubic"})
    assert (job.job, job.position) == (7, 0)
    assert d.received[-1] == {"type": "submit", "id": job.id, "model": "classic", "scale": 2,
                              "input": "b1", "params": {"filter": "bicubic"}}
    seen = []
    layers = job.wait(progress=seen.append, timeout=5)
    assert [e["done"] for e in seen] == [1, 2]
    assert job.done and job.error is None and job.seconds == 0.42
    assert [l.role for l in layers] == ["base", "pixel_detail"]
    assert layers[1].blend == "grain_merge" and layers[1].offset == 0.5 and layers[1].residual
    assert all(l.buffer.mapped for l in layers)
    assert layers[0].buffer.read(0, 4) == b"\x80" * 4
    assert list(job.events()) == [job.result]  # waiting again gives the result again
    assert job.wait() is layers
    c.release(layers[0])
    assert layers[0].buffer.closed and not layers[0].buffer.mapped
    with buf:
        pass
    assert buf.closed


def test_cancel_then_cancelled_error(fake):
    def handler(msg, send):
        if msg["type"] == "submit":
            send({"type": "queued", "id": msg["id"], "job": 7, "position": 1})
            handler.submit_id = msg["id"]
        elif msg["type"] == "cancel":
            if msg["job"] != 7:
                send({"type": "error", "id": msg["id"], "code": "unknown_job",
                      "message": "no job %d" % msg["job"], "hint": "h"})
                return
            send({"type": "ack", "id": msg["id"]})
            err = load_golden("error")
            err["id"] = handler.submit_id
            send(err)

    d, c = fake(handler)
    job = c.submit("classic", 2, "b1")
    assert job.position == 1
    job.cancel()
    assert d.received[-1] == {"type": "cancel", "id": d.received[-1]["id"], "job": 7}
    with pytest.raises(TesseraError) as info:
        job.wait(timeout=5)
    assert (info.value.code, info.value.job) == ("cancelled", 7)
    assert job.done and job.error.code == "cancelled"
    with pytest.raises(TesseraError):  # the error sticks
        job.wait()
    with pytest.raises(TesseraError) as info:
        c.cancel(99)
    assert info.value.code == "unknown_job"


def test_submit_error_raises(fake):
    def handler(msg, send):
        send({"type": "error", "id": msg["id"], "code": "unknown_model",
              "message": "no model `x`", "hint": "send list"})

    d, c = fake(handler)
    with pytest.raises(TesseraError) as info:
        c.submit("x", 2, "b1")
    assert info.value.code == "unknown_model" and "send list" in str(info.value)


def test_poll_does_not_block(fake, tmp_path, golden):
    out_info = _buffer_file(tmp_path, "b2", {"width": 1, "height": 1, "channels": 1,
                                             "sample": "f32", "stride": 4, "encoding": "linear",
                                             "alpha": False})
    release = threading.Event()

    def handler(msg, send):
        if msg["type"] != "submit":
            return
        send({"type": "queued", "id": msg["id"], "job": 3, "position": 0})

        def later():
            release.wait(5)
            send({"type": "progress", "id": msg["id"], "job": 3, "done": 1, "total": 1,
                  "stage": "x", "eta": 0.0})
            result = golden("result")
            result.update(id=msg["id"], job=3)
            result["layers"][0]["buffer"] = out_info
            send(result)
        threading.Thread(target=later).start()

    d, c = fake(handler)
    job = c.submit("classic", 1, "b1")
    t0 = time.monotonic()
    assert job.poll() == []
    assert time.monotonic() - t0 < 0.5
    release.set()
    events = []
    deadline = time.monotonic() + 5
    while not job.done and time.monotonic() < deadline:
        events.extend(job.poll())
        time.sleep(0.01)
    assert [e["type"] for e in events] == ["progress", "result"]
    assert job.layers[0].buffer.mapped


def test_timeout_leaves_job_waitable(fake):
    def handler(msg, send):
        if msg["type"] == "submit":
            send({"type": "queued", "id": msg["id"], "job": 1, "position": 0})

    d, c = fake(handler)
    job = c.submit("classic", 2, "b1")
    with pytest.raises(TesseraError) as info:
        job.wait(timeout=0.1)
    assert info.value.code == "timeout" and not job.done
    with pytest.raises(TesseraError) as info:
        c.ping(timeout=0.1)
    assert info.value.code == "timeout"
    d.send({"type": "error", "id": job.id, "job": 1, "code": "engine_failed",
            "message": "out of memory", "hint": "see the daemon log for details"})
    with pytest.raises(TesseraError) as info:
        job.wait(timeout=5)
    assert (info.value.code, info.value.job) == ("engine_failed", 1)


def test_parse_hostport():
    from tessera_client.client import parse_hostport
    assert parse_hostport("127.0.0.1:7070") == ("127.0.0.1", 7070)
    assert parse_hostport("tcp:localhost:7070") == ("localhost", 7070)
    assert parse_hostport("tcp:7070") == ("127.0.0.1", 7070)
    assert parse_hostport("[::1]:7070") == ("::1", 7070)
    with pytest.raises(ValueError):
        parse_hostport("localhost")


def test_tcp_sends_the_token_file(clean_env, tmp_path):
    clean_env.setenv("XDG_CONFIG_HOME", str(tmp_path))
    os.makedirs(str(tmp_path / "tessera"))
    (tmp_path / "tessera" / "token").write_text("s3cret\n")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    box = {}

    def accept():
        conn, _ = srv.accept()
        box["daemon"] = FakeDaemon(sock=conn)

    t = threading.Thread(target=accept)
    t.start()
    c = Client.connect(tcp="127.0.0.1:%d" % port, client="krita/5.2", timeout=5)
    try:
        t.join(5)
        assert box["daemon"].received[0] == {"type": "hello", "id": 1, "protocol": 1,
                                             "client": "krita/5.2", "token": "s3cret"}
        assert c.ping()["type"] == "pong"
    finally:
        c.close()
        box["daemon"].close()
        srv.close()


def test_disconnect_wakes_every_waiter(fake):
    def handler(msg, send):
        if msg["type"] == "submit":
            send({"type": "queued", "id": msg["id"], "job": 1, "position": 0})
        # pings are never answered

    d, c = fake(handler)
    job = c.submit("classic", 2, "b1")
    results = {}

    def wait_job():
        try:
            job.wait()
        except TesseraError as e:
            results["job"] = e

    def wait_ping():
        try:
            c.ping(timeout=30)
        except TesseraError as e:
            results["ping"] = e

    threads = [threading.Thread(target=wait_job), threading.Thread(target=wait_ping)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(d.received) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    d.close()
    for t in threads:
        t.join(5)
    assert set(results) == {"job", "ping"}
    for e in results.values():
        assert e.code == "disconnected"
        assert "closed the connection" in e.message and e.hint
    assert job.done and job.error.code == "disconnected"
    with pytest.raises(TesseraError) as info:
        c.ping()
    assert info.value.code == "disconnected"
    assert c.closed


def test_connection_level_error_reaches_every_waiter(fake):
    def handler(msg, send):
        if msg["type"] == "ping":
            send({"type": "error", "id": None, "code": "bad_frame", "message": "frame too long",
                  "hint": "reconnect"})

    d, c = fake(handler)
    with pytest.raises(TesseraError) as info:
        c.ping()
    assert info.value.code == "bad_frame"


def test_close_wakes_waiters_with_closed(fake):
    d, c = fake(lambda msg, send: None)
    box = {}

    def waiter():
        try:
            c.ping(timeout=30)
        except TesseraError as e:
            box["e"] = e

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    c.close()
    t.join(5)
    assert box["e"].code == "closed"


# -- autostart, with a fake tesserad executable ------------------------------------------------

FAKE_TESSERAD = r'''#!{python}
import json, os, socket, struct, sys, threading
threading.Timer(20, lambda: os._exit(3)).start()
path = os.environ["TESSERA_SOCKET"]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(1)
print("fake tesserad listening on", path, flush=True)
conn, _ = srv.accept()
def read(n):
    b = b""
    while len(b) < n:
        c = conn.recv(n - len(b))
        if not c:
            os.unlink(path); os._exit(0)
        b += c
    return b
while True:
    (n,) = struct.unpack("<I", read(4))
    msg = json.loads(read(n))
    reply = {{"hello": "welcome", "ping": "pong"}}[msg["type"]]
    with open(os.path.join({golden!r}, reply + ".json")) as f:
        out = json.load(f)
    out["id"] = msg["id"]
    out["seen"] = msg
    body = json.dumps(out).encode()
    conn.sendall(struct.pack("<I", len(body)) + body)
'''


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="Unix sockets")
def test_autostart_starts_the_daemon(clean_env, tmp_path):
    run = tmp_path / "rt"
    bindir = tmp_path / "bin"
    os.makedirs(str(bindir))
    exe = bindir / "tesserad"
    exe.write_text(FAKE_TESSERAD.format(python=sys.executable, golden=GOLDEN_DIR))
    os.chmod(str(exe), 0o755)
    clean_env.setenv("TESSERA_RUNTIME_DIR", str(run))
    clean_env.setenv("TESSERA_BIN_DIR", str(bindir))
    sock = str(run / "t.sock")
    with pytest.raises(TesseraError) as info:
        Client.connect(socket=sock, autostart=False)
    assert info.value.code == "connect_failed"
    c = Client.connect(socket=sock, client="test/1", timeout=10)
    try:
        assert c.welcome["daemon"] == "tesserad 0.1.0"
        assert c.welcome["seen"] == {"type": "hello", "id": 1, "protocol": 1, "client": "test/1"}
        assert c.ping()["type"] == "pong"
    finally:
        c.close()
    assert stat.S_IMODE(os.stat(str(run)).st_mode) == 0o700
    with open(str(run / "tesserad.log")) as f:
        assert "fake tesserad listening on " + sock in f.read()


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="Unix sockets")
def test_autostart_without_daemon_raises_daemon_not_found(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path))
    clean_env.setenv("PATH", str(tmp_path / "nothing"))
    clean_env.setenv("TESSERA_RUNTIME_DIR", str(tmp_path / "rt"))
    with pytest.raises(DaemonNotFound):
        Client.connect()


def test_package_exports():
    for name in ("Client", "TesseraError", "DaemonNotFound", "find_daemon", "runtime_dir",
                 "socket_path", "Buffer", "Layer", "Job"):
        assert hasattr(tessera_client, name)
