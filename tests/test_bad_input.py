"""Bad input gets a clear error and disturbs nobody: 30 kinds of bad frames, each answered with
an error naming the problem, while another client keeps being served."""

import json
import os
import socket
import struct

import pytest

from harness import Daemon, raw_socket

# Small limits so the limit cases are cheap.
LIMITS = ["--max-side", "4096", "--max-pixels", "1000000", "--max-buffer-bytes", "4000000",
          "--max-client-bytes", "6000000"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("bad") / "rt", LIMITS)
    yield d
    d.stop()


def send_raw(s, body):
    s.sendall(struct.pack("<I", len(body)) + body)


def send(s, msg):
    send_raw(s, json.dumps(msg).encode())


def recv(s):
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            raise EOFError("connection closed")
        head += chunk
    (n,) = struct.unpack("<I", head)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            raise EOFError("connection closed")
        body += chunk
    return json.loads(body)


def greeted(path):
    s = raw_socket(path)
    send(s, {"type": "hello", "id": 1, "protocol": 1, "client": "bad-input-test"})
    assert recv(s)["type"] == "welcome"
    return s


def alloc(s, w=4, h=4, c=3, sample="u8", rid=2):
    send(s, {"type": "alloc", "id": rid, "layout": {"width": w, "height": h, "channels": c, "sample": sample}})
    ev = recv(s)
    assert ev["type"] == "allocated", ev
    return ev["buffer"]


def submit(buffer_ref, **kw):
    msg = {"type": "submit", "id": 9, "model": "classic", "scale": 2, "input": buffer_ref}
    msg.update(kw)
    return msg


# Each case: (name, greet first?, action(socket, daemon) -> None, expected code, connection stays open?)
def frames(body):
    return lambda s, d: send_raw(s, body)


def message(msg):
    return lambda s, d: send(s, msg)


def truncated(s, d):
    s.sendall(struct.pack("<I", 100) + b'{"type": "ping", "id"')
    s.shutdown(socket.SHUT_WR)


def header_only(s, d):
    s.sendall(b"\x10\x00")
    s.shutdown(socket.SHUT_WR)


def oversized(s, d):
    s.sendall(struct.pack("<I", 0x7FFFFFFF) + b"{}")


def released_buffer(s, d):
    buf = alloc(s)
    send(s, {"type": "release", "id": 3, "buffer": buf["id"]})
    assert recv(s)["type"] == "released"
    send(s, submit(buf["id"]))


def path_outside(s, d):
    alloc(s)
    send(s, submit("/etc/passwd"))


def path_dotdot(s, d):
    buf = alloc(s)
    sneaky = os.path.join(os.path.dirname(buf["path"]), "..", "tesserad.sock")
    send(s, submit(sneaky))


KEEP_ALIVE = []


def path_of_another_client(s, d):
    other = greeted(d.socket)
    theirs = alloc(other)
    send(s, submit(theirs["path"]))
    KEEP_ALIVE.append(other)  # its buffers live as long as it stays connected


def id_of_another_client(s, d):
    other = greeted(d.socket)
    theirs = alloc(other)
    send(s, submit(theirs["id"]))
    KEEP_ALIVE.append(other)


def truncated_buffer_file(s, d):
    buf = alloc(s)
    os.truncate(buf["path"], 5)
    send(s, submit(buf["id"]))


def result_too_large(s, d):
    buf = alloc(s, w=3000, h=300)
    send(s, submit(buf["id"], scale=2))


def over_client_quota(s, d):
    alloc(s, w=1000, h=1000, c=3, rid=2)  # 3 MB of the 6 MB
    alloc(s, w=1000, h=900, c=3, rid=3)   # 2.7 MB more
    send(s, {"type": "alloc", "id": 4, "layout": {"width": 1000, "height": 200, "channels": 3, "sample": "u8"}})


def release_busy_free_buffer(s, d):
    send(s, {"type": "release", "id": 5, "buffer": "b999999"})


def bad_param(s, d):
    buf = alloc(s)
    send(s, submit(buf["id"], params={"filter": "nearest"}))


def unknown_param(s, d):
    buf = alloc(s)
    send(s, submit(buf["id"], params={"filtr": "bicubic"}))


def bad_scale(s, d):
    buf = alloc(s)
    send(s, submit(buf["id"], scale=7))


def unknown_model(s, d):
    buf = alloc(s)
    send(s, submit(buf["id"], model="no-such-model"))


def unknown_plugin(s, d):
    buf = alloc(s)
    send(s, submit(buf["id"], plugin="no-such-plugin"))


def layout(**kw):
    base = {"width": 4, "height": 4, "channels": 3, "sample": "u8"}
    base.update(kw)
    return message({"type": "alloc", "id": 2, "layout": base})


CASES = [
    ("invalid JSON", True, frames(b"{nope"), "invalid_json", True),
    ("not UTF-8", True, frames(b"\xff\xfe\x00garbage"), "invalid_json", True),
    ("empty frame", True, frames(b""), "invalid_json", True),
    ("JSON array", True, frames(b"[1, 2, 3]"), "bad_request", True),
    ("JSON string", True, frames(b'"hello"'), "bad_request", True),
    ("no type", True, message({"id": 4}), "bad_request", True),
    ("type not a string", True, message({"type": 5, "id": 4}), "bad_request", True),
    ("unknown type", True, message({"type": "frobnicate", "id": 4}), "unknown_type", True),
    ("id not an integer", True, message({"type": "ping", "id": "four"}), "bad_request", True),
    ("missing id", True, message({"type": "ping"}), "bad_request", True),
    ("wrong field type", True, layout(width="wide"), "bad_request", True),
    ("submit input not a string", True, message(submit(42)), "bad_request", True),
    ("request before hello", False, message({"type": "ping", "id": 1}), "handshake_required", True),
    ("second hello", True, message({"type": "hello", "id": 5, "protocol": 1, "client": "x"}), "handshake_required", True),
    ("protocol major mismatch", False, message({"type": "hello", "id": 1, "protocol": 99, "client": "old"}), "protocol_mismatch", False),
    ("seven channels", True, layout(channels=7), "bad_layout", True),
    ("zero width", True, layout(width=0), "bad_layout", True),
    ("stride smaller than a row", True, layout(stride=5), "bad_layout", True),
    ("alpha on three channels", True, layout(alpha=True), "bad_layout", True),
    ("huge image", True, layout(width=100000, height=100000), "limit_exceeded", True),
    ("too many bytes", True, layout(width=1000, height=1000, channels=4, sample="f32"), "limit_exceeded", True),
    ("over the connection's quota", True, over_client_quota, "limit_exceeded", True),
    ("result over the limits", True, result_too_large, "limit_exceeded", True),
    ("buffer file truncated by the client", True, truncated_buffer_file, "bad_layout", True),
    ("job on a released buffer", True, released_buffer, "unknown_buffer", True),
    ("release of an unknown buffer", True, release_busy_free_buffer, "unknown_buffer", True),
    ("path outside the buffer directory", True, path_outside, "foreign_path", True),
    ("path escaping with ..", True, path_dotdot, "foreign_path", True),
    ("another client's buffer path", True, path_of_another_client, "foreign_path", True),
    ("another client's buffer id", True, id_of_another_client, "unknown_buffer", True),
    ("unknown model", True, unknown_model, "unknown_model", True),
    ("unknown plugin", True, unknown_plugin, "unknown_plugin", True),
    ("unsupported scale", True, bad_scale, "unsupported_scale", True),
    ("bad parameter value", True, bad_param, "bad_params", True),
    ("unknown parameter", True, unknown_param, "bad_params", True),
    ("cancel of an unknown job", True, message({"type": "cancel", "id": 6, "job": 424242}), "unknown_job", True),
    ("truncated frame", True, truncated, "bad_frame", False),
    ("truncated header", True, header_only, "bad_frame", False),
    ("oversized length", True, oversized, "bad_frame", False),
]


@pytest.mark.parametrize("name,greet,action,code,stays_open", CASES, ids=[c[0] for c in CASES])
def test_bad_frame_gets_an_error_and_others_are_served(daemon, name, greet, action, code, stays_open):
    with daemon.client(client="bystander") as bystander:
        s = greeted(daemon.socket) if greet else raw_socket(daemon.socket)
        try:
            action(s, daemon)
            reply = recv(s)
            assert reply["type"] == "error", reply
            assert reply["code"] == code, reply
            assert reply["message"] and reply["hint"], reply
            if stays_open:
                # The connection still works: a greeted one answers ping; an ungreeted one
                # still asks for hello.
                send(s, {"type": "ping", "id": 77})
                follow = recv(s)
                if greet:
                    assert follow == {"type": "pong", "id": 77}, follow
                else:
                    assert follow["code"] == "handshake_required", follow
            else:
                with pytest.raises((EOFError, ConnectionResetError, BrokenPipeError)):
                    while True:
                        recv(s)
        finally:
            s.close()
        # The daemon keeps serving everybody else.
        assert bystander.ping()["type"] == "pong"
        assert bystander.list()["workers"][0]["state"] in ("idle", "busy")


def test_count_of_bad_frame_kinds():
    assert len(CASES) >= 20


def test_limits_are_checked_before_anything_is_created(daemon):
    s = greeted(daemon.socket)
    before = set(os.listdir(daemon.buffers))
    send(s, {"type": "alloc", "id": 2, "layout": {"width": 4000, "height": 4000, "channels": 4, "sample": "f32"}})
    assert recv(s)["code"] == "limit_exceeded"
    assert set(os.listdir(daemon.buffers)) == before
    s.close()


def test_tcp_needs_the_token(tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config = tmp_path / "config"
    with Daemon(tmp_path / "rt", ["--listen", "tcp:%d" % port], env={"XDG_CONFIG_HOME": str(config)}) as d:
        token_file = config / "tessera" / "token"
        assert os.stat(token_file).st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        for bad in (None, "wrong-token"):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            hello = {"type": "hello", "id": 1, "protocol": 1, "client": "tcp-test"}
            if bad:
                hello["token"] = bad
            send(s, hello)
            assert recv(s)["code"] == "unauthorized"
            s.close()
        from tessera_client import Client
        with Client.connect(tcp="127.0.0.1:%d" % port, token=token, autostart=False) as c:
            assert c.ping()["type"] == "pong"
        assert d.proc.poll() is None


def test_tcp_refuses_non_loopback_without_allow_remote(tmp_path):
    with pytest.raises(RuntimeError) as e:
        Daemon(tmp_path / "rt", ["--listen", "tcp:0.0.0.0:0"], env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert "loopback" in str(e.value)


OTHER_USER = "tessera-test-other"


@pytest.fixture
def other_user():
    """A second local user (created for the test; needs root and useradd)."""
    import pwd
    import shutil
    import subprocess
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to create a second user")
    subprocess.run(["userdel", OTHER_USER], capture_output=True)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER], check=True, capture_output=True)
    yield pwd.getpwnam(OTHER_USER)
    subprocess.run(["userdel", OTHER_USER], capture_output=True)


def as_user(user, code):
    """Runs Python `code` as `user`; returns its stdout."""
    import subprocess
    import sys

    def drop():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    # The test's own Python may live where the other user cannot go (pyenv under /root).
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    r = subprocess.run([python, "-c", code], preexec_fn=drop, capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_another_local_user_can_reach_nothing(other_user):
    """Another user on the machine can neither connect, nor open a buffer, nor read the TCP
    token, even where the folders above the daemon's are open to all."""
    import tempfile
    top = tempfile.mkdtemp(prefix="tessera-perm-")
    os.chmod(top, 0o755)
    try:
        port_probe = socket.socket()
        port_probe.bind(("127.0.0.1", 0))
        port = port_probe.getsockname()[1]
        port_probe.close()
        config = os.path.join(top, "config")
        os.makedirs(config, mode=0o755)
        with Daemon(os.path.join(top, "rt"), ["--listen", "tcp:%d" % port], env={"XDG_CONFIG_HOME": config}) as d:
            s = greeted(d.socket)
            send(s, {"type": "alloc", "id": 2, "layout": {"width": 4, "height": 4, "channels": 3, "sample": "u8"}})
            path = recv(s)["buffer"]["path"]
            token = os.path.join(config, "tessera", "token")
            probe = """
import socket
def attempt(f):
    try:
        f()
        return "allowed"
    except PermissionError:
        return "denied"
def connect():
    s = socket.socket(socket.AF_UNIX)
    s.connect(%r)
print(attempt(connect), attempt(lambda: open(%r, "rb").read(1)), attempt(lambda: open(%r).read()))
""" % (d.socket, path, token)
            assert as_user(other_user, probe) == "denied denied denied"
            # Over TCP it gets as far as hello, and no further without the token.
            hello = ("import json, socket, struct\n"
                     "s = socket.create_connection(('127.0.0.1', %d))\n"
                     "b = json.dumps({'type': 'hello', 'id': 1, 'protocol': 1, 'client': 'other'}).encode()\n"
                     "s.sendall(struct.pack('<I', len(b)) + b)\n"
                     "n = struct.unpack('<I', s.recv(4))[0]\n"
                     "body = b''\n"
                     "while len(body) < n: body += s.recv(n - len(body))\n"
                     "print(json.loads(body)['code'])\n") % port
            assert as_user(other_user, hello) == "unauthorized"
            s.close()
    finally:
        import shutil
        shutil.rmtree(top, ignore_errors=True)
