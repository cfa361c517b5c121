"""The connection to tesserad.

One background thread per :class:`Client` reads frames and routes each message by its ``id``
to the queue of the request waiting for it (job events go to the submit's queue). Requests are
written under a lock, so a client can be shared by several threads. Nothing blocks without a
bound unless the caller asks for it (``timeout=None`` on job waits); user callbacks run only in
the caller's thread, never in the reader thread.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import socket as _socket
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

from . import messages
from .buffer import Buffer, Layer
from .errors import TesseraError
from .frame import encode_frame, read_frame
from .paths import log_path, read_token, socket_path, start_daemon, token_path

#: How long autostart waits for a freshly started daemon to accept connections.
AUTOSTART_WAIT = 15.0

_NOT_RUNNING = (FileNotFoundError, ConnectionRefusedError)


def _restart_hint() -> str:
    return ("reconnect to start tesserad again, then resubmit; if it keeps happening, see its "
            "log at %s" % log_path())


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def parse_hostport(tcp: str) -> Tuple[str, int]:
    """``"HOST:PORT"`` as (host, port); also ``"[::1]:PORT"``, and ``"PORT"`` for 127.0.0.1,
    each with or without the ``"tcp:"`` of tesserad's ``--listen``."""
    spec = tcp[4:] if tcp.startswith("tcp:") else tcp
    host, _, port = spec.rpartition(":")
    if not port.isdigit():
        raise ValueError("expected HOST:PORT, not %r" % (tcp,))
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _connect_unix(path: str, timeout: Optional[float]) -> _socket.socket:
    family = getattr(_socket, "AF_UNIX", None)
    if family is None:
        raise TesseraError(
            "connect_failed", "this Python has no Unix sockets",
            "start tesserad with --listen tcp:127.0.0.1:PORT and connect with tcp='127.0.0.1:PORT'")
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def _log_tail(lines: int = 8) -> str:
    try:
        with open(log_path(), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _autostart(path: str, pass_socket: bool, timeout: Optional[float]) -> _socket.socket:
    proc = start_daemon(socket=path if pass_socket else None)
    deadline = time.monotonic() + AUTOSTART_WAIT
    delay = 0.02
    exited: Optional[int] = None
    last: Optional[OSError] = None
    while True:
        try:
            return _connect_unix(path, timeout)
        except _NOT_RUNNING as e:
            last = e
        except OSError as e:
            raise TesseraError("connect_failed",
                               "started tesserad but cannot connect to %s: %s" % (path, e),
                               "see the daemon log at %s" % log_path())
        if exited is None:
            exited = proc.poll()
            if exited is not None:
                # Another client may have started a daemon first; give its socket a moment.
                deadline = min(deadline, time.monotonic() + 1.0)
        if time.monotonic() >= deadline:
            if exited is not None:
                what = "tesserad exited with status %s before accepting connections" % exited
            else:
                what = "tesserad did not accept connections on %s within %g s (%s)" % (
                    path, AUTOSTART_WAIT, last)
            tail = _log_tail()
            if tail:
                what += "; the end of its log:\n" + tail
            raise TesseraError("daemon_failed", what, "see the daemon log at %s" % log_path())
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


class Client(object):
    """A connection to tesserad. Make one with :meth:`connect`."""

    def __init__(self, sock: _socket.socket, timeout: Optional[float] = 30.0) -> None:
        """Wraps a connected socket and starts the reader thread; no handshake (see
        :meth:`handshake`). ``timeout`` is the default for requests (None: wait forever)."""
        self.timeout = timeout
        self.welcome: Optional[Dict[str, Any]] = None
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._waiters: Dict[int, queue.Queue[Any]] = {}
        self._ids = itertools.count(1)
        self._dead: Optional[TesseraError] = None
        self._last_conn_error: Optional[TesseraError] = None
        self._tcp = False
        self._reader = threading.Thread(target=self._read_loop, name="tessera-client-reader")
        self._reader.daemon = True
        self._reader.start()

    # -- connecting -------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        socket: Optional[str] = None,
        tcp: Optional[str] = None,
        token: Optional[str] = None,
        autostart: bool = True,
        client: str = "tessera-python/0.1",
        timeout: Optional[float] = 30.0,
    ) -> Client:
        """Connects, says hello and waits for ``welcome``.

        ``socket``: Unix socket path (default :func:`socket_path`). ``tcp``: ``"HOST:PORT"``
        instead; its token is ``token``, else ``$TESSERA_TOKEN``, else the token file. On the
        Unix socket a token is sent only when given. ``autostart`` (Unix socket only): when
        nothing listens, start ``tesserad`` (see :func:`find_daemon`) and wait up to 15 s.
        """
        if tcp:
            try:
                host, port = parse_hostport(tcp)
                sock = _socket.create_connection((host, port), timeout)
                sock.settimeout(None)
            except (OSError, ValueError) as e:
                raise TesseraError(
                    "connect_failed", "cannot connect to tesserad at %s: %s" % (tcp, e),
                    "start tesserad with --listen tcp:%s" % tcp)
            if token is None:
                token = read_token()
        else:
            path = socket or socket_path()
            try:
                sock = _connect_unix(path, timeout)
            except _NOT_RUNNING as e:
                if not autostart:
                    raise TesseraError(
                        "connect_failed",
                        "tesserad is not running: cannot connect to %s (%s)" % (path, e.strerror),
                        "start tesserad, or connect with autostart")
                sock = _autostart(path, socket is not None, timeout)
            except OSError as e:
                raise TesseraError("connect_failed", "cannot connect to %s: %s" % (path, e),
                                   "check that tesserad runs as your user")
        c = cls(sock, timeout=timeout)
        c._tcp = bool(tcp)
        try:
            c.handshake(client, token)
        except BaseException:
            c.close()
            raise
        return c

    def handshake(
        self,
        client: str = "tessera-python/0.1",
        token: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Dict[str, Any]:
        """Sends ``hello`` and returns the ``welcome`` (also kept as :attr:`welcome`)."""
        try:
            ev = self._call(messages.hello, (client, token), "welcome", timeout)
        except TesseraError as e:
            if e.code == "unauthorized" and self._tcp:
                e.hint = "%s (this client looked in $TESSERA_TOKEN and %s%s)" % (
                    e.hint, token_path(), "" if token is None else "; a token was sent")
            raise
        self.welcome = ev
        return ev

    # -- properties of the daemon -----------------------------------------------------------

    @property
    def plugins(self) -> List[Dict[str, Any]]:
        return list((self.welcome or {}).get("plugins", []))

    @property
    def devices(self) -> List[Dict[str, Any]]:
        """The devices that have a worker, best first: ``{id, name, memory_bytes, ...}``."""
        return list((self.welcome or {}).get("devices", []))

    @property
    def limits(self) -> Dict[str, Any]:
        return dict((self.welcome or {}).get("limits", {}))

    @property
    def closed(self) -> bool:
        return self._dead is not None

    # -- requests ---------------------------------------------------------------------------

    def ping(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Round trip; returns the ``pong``."""
        return self._call(messages.ping, (), "pong", timeout)

    def list(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The ``listing``: plugins with their models, and workers."""
        return self._call(messages.list_, (), "listing", timeout)

    def alloc(
        self,
        width: int,
        height: int,
        channels: int,
        sample: str = "f32",
        encoding: str = "srgb",
        alpha: Optional[bool] = None,
        stride: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> Buffer:
        """Allocates a daemon buffer and maps it. ``alpha`` defaults to True for 2 or 4
        channels; no ``stride`` means tightly packed rows."""
        ev = self._call(messages.alloc, (width, height, channels, sample, encoding, alpha, stride),
                        "allocated", timeout)
        buf = messages.parse_buffer(ev)
        try:
            buf.map()
        except TesseraError:
            try:
                self._call(messages.release, (buf.id,), "released", timeout)
            except TesseraError:
                pass
            raise
        return buf

    def release(self, buf_or_id: Any, timeout: Optional[float] = None) -> None:
        """Unmaps a :class:`Buffer` (or a :class:`Layer`'s buffer) here, then frees it in the
        daemon. A buffer id or path string is only freed in the daemon."""
        if isinstance(buf_or_id, Layer):
            buf_or_id = buf_or_id.buffer
        if isinstance(buf_or_id, Buffer):
            buf_or_id.close()
        self._call(messages.release, (buf_or_id,), "released", timeout)

    def submit(
        self,
        model: str,
        scale: int,
        buf_or_id: Any,
        params: Optional[Dict[str, Any]] = None,
        plugin: Optional[str] = None,
        output_sample: Optional[str] = None,
        timeout: Optional[float] = None,
        device: Optional[str] = None,
    ) -> Job:
        """Submits a job on an input buffer and waits for ``queued``. Returns a :class:`Job`.
        ``device`` (``cpu``, ``cuda:0``: one of :attr:`devices`) overrides the daemon's choice,
        the best device whose worker runs the model."""
        return self._start_job(lambda rid: messages.submit(rid, model, scale, buf_or_id, params,
                                                            plugin, output_sample, device), timeout)

    def render(
        self,
        job: Any,
        lambda_pix: float,
        lambda_sem: float,
        output_sample: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Job:
        """An exact render of a finished job (a :class:`Job` or its id) at (λ_pix, λ_sem), for
        models whose ``exact_render`` is true: a :class:`Job` of its own whose result is one
        ``exact`` layer, the whole image at those λ."""
        job_id = job.job if isinstance(job, Job) else int(job)
        return self._start_job(lambda rid: messages.render(rid, job_id, lambda_pix, lambda_sem,
                                                            output_sample), timeout)

    def release_job(self, job: Any, timeout: Optional[float] = None) -> None:
        """Frees what a finished job kept for exact renders (its latents, its input)."""
        job_id = job.job if isinstance(job, Job) else int(job)
        self._call(messages.release_job, (job_id,), "ack", timeout)

    def _start_job(self, build: Any, timeout: Optional[float]) -> Job:
        rid, q = self._register()
        try:
            self._send(build(rid))
            first = self._get(q, _deadline(self.timeout if timeout is None else timeout),
                              "the daemon to queue the job")
        except BaseException:
            self._unregister(rid)
            raise
        t = first.get("type")
        if t == "error":
            self._unregister(rid)
            raise TesseraError.from_event(first)
        if t not in ("queued", "progress", "result") or "job" not in first:
            self._unregister(rid)
            raise TesseraError("bad_reply", "expected `queued` after submit, got %r" % (first,))
        job = Job(self, rid, q, int(first["job"]), int(first.get("position") or 0))
        if t != "queued":
            job._pending.append(first)
        return job

    def cancel(self, job: Any, timeout: Optional[float] = None) -> None:
        """Cancels a job (a :class:`Job` or a daemon job id) and waits for ``ack``. The job
        itself then ends with error code ``cancelled``."""
        job_id = job.job if isinstance(job, Job) else int(job)
        self._call(messages.cancel, (job_id,), "ack", timeout)

    def close(self) -> None:
        """Closes the connection; every waiting request fails with code ``closed``. The
        daemon frees this connection's buffers; buffers mapped here stay readable."""
        self._die(TesseraError("closed", "this Tessera client was closed"))
        try:
            self._sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader is not threading.current_thread():
            self._reader.join(1.0)
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- machinery --------------------------------------------------------------------------

    def _register(self) -> Tuple[int, queue.Queue[Any]]:
        q: queue.Queue[Any] = queue.Queue()
        with self._lock:
            if self._dead is not None:
                raise self._dead.copy()
            rid = next(self._ids)
            self._waiters[rid] = q
        return rid, q

    def _unregister(self, rid: int) -> None:
        with self._lock:
            self._waiters.pop(rid, None)

    def _send(self, msg: Dict[str, Any]) -> None:
        data = encode_frame(msg)
        with self._send_lock:
            if self._dead is not None:
                raise self._dead.copy()
            try:
                self._sock.sendall(data)
            except OSError as e:
                err = TesseraError("disconnected",
                                   "the connection to tesserad broke while sending: %s" % e,
                                   _restart_hint())
                self._die(err)
                try:
                    self._sock.shutdown(_socket.SHUT_RDWR)
                except OSError:
                    pass
                raise err.copy()

    def _get(self, q: queue.Queue[Any], deadline: Optional[float], what: str) -> Dict[str, Any]:
        """The next message for a request, raising errors pushed by the reader. Messages
        already queued come before a disconnect."""
        item = self._poll(q)
        if item is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise self._timeout(what)
            try:
                item = q.get(timeout=remaining)
            except queue.Empty:
                raise self._timeout(what) from None
            if isinstance(item, TesseraError):
                raise item
        return item

    def _poll(self, q: queue.Queue[Any]) -> Optional[Dict[str, Any]]:
        """Like :meth:`_get` without blocking: None when nothing has come."""
        try:
            item = q.get_nowait()
        except queue.Empty:
            if self._dead is not None:
                raise self._dead.copy()
            return None
        if isinstance(item, TesseraError):
            raise item
        msg: Dict[str, Any] = item
        return msg

    @staticmethod
    def _timeout(what: str) -> TesseraError:
        return TesseraError("timeout", "timed out waiting for %s" % what,
                            "the daemon may be busy; try again with a longer timeout")

    def _call(
        self,
        build: Callable[..., Dict[str, Any]],
        args: Tuple[Any, ...],
        expect: str,
        timeout: Optional[float],
    ) -> Dict[str, Any]:
        """Sends one request built by ``build(id, *args)`` and returns its ``expect`` reply."""
        rid, q = self._register()
        try:
            self._send(build(rid, *args))
            deadline = _deadline(self.timeout if timeout is None else timeout)
            ev = self._get(q, deadline, "`%s`" % expect)
            t = ev.get("type")
            if t == "error":
                raise TesseraError.from_event(ev)
            if t != expect:
                raise TesseraError("bad_reply", "expected `%s`, got %r" % (expect, ev))
            return ev
        finally:
            self._unregister(rid)

    def _read_loop(self) -> None:
        err: Optional[TesseraError] = None
        try:
            while True:
                msg = read_frame(self._sock.recv)
                if msg is None:
                    break
                self._route(msg)
        except TesseraError as e:
            err = e
        except OSError as e:
            err = TesseraError("disconnected", "the connection to tesserad broke: %s" % e,
                               _restart_hint())
        except Exception as e:  # a bug here must still wake every waiter
            err = TesseraError("internal", "the Tessera client's reader failed: %r" % (e,))
        if err is None:
            message = "tesserad closed the connection"
            if self._last_conn_error is not None:
                message += " after an error: %s" % self._last_conn_error.message
            err = TesseraError("disconnected", message, _restart_hint())
        self._die(err)

    def _route(self, msg: Dict[str, Any]) -> None:
        rid = msg.get("id")
        if rid is None:
            if msg.get("type") == "error":
                err = TesseraError.from_event(msg)
                self._last_conn_error = err
                with self._lock:
                    waiting = list(self._waiters.values())
                for q in waiting:
                    q.put(err.copy())
            return
        if not isinstance(rid, int):
            return
        with self._lock:
            waiter = self._waiters.get(rid)
        if waiter is not None:
            waiter.put(msg)
        # Anything else answers a request nobody waits for any more (timed out): dropped.

    def _die(self, err: TesseraError) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = err
            dead = self._dead
            waiting = list(self._waiters.values())
        for q in waiting:
            q.put(dead.copy())


class Job(object):
    """A submitted job: ``job`` (the daemon's job id), ``id`` (the submit's request id),
    ``position`` (in the queue when it was queued). Consume its events from one thread.

    After the end: ``done`` is True and either ``result`` (the ``result`` message),
    ``layers`` and ``seconds`` are set, or ``error`` (a :class:`TesseraError`).
    """

    def __init__(self, client: Client, id: int, q: queue.Queue[Any], job: int,
                 position: int) -> None:
        self.client = client
        self.id = id
        self.job = job
        self.position = position
        self.done = False
        self.result: Optional[Dict[str, Any]] = None
        self.layers: Optional[List[Layer]] = None
        self.seconds: Optional[float] = None
        self.error: Optional[TesseraError] = None
        self.last_progress: Optional[Dict[str, Any]] = None
        self._queue = q
        self._pending: Deque[Dict[str, Any]] = collections.deque()

    def _finish(self, error: Optional[TesseraError] = None) -> None:
        self.done = True
        self.error = error
        self.client._unregister(self.id)

    def _next(self, deadline: Optional[float], block: bool = True) -> Optional[Dict[str, Any]]:
        """The next event that matters (progress or result), None when not blocking and
        nothing came; raises the job's error."""
        while True:
            if self._pending:
                ev: Optional[Dict[str, Any]] = self._pending.popleft()
            else:
                try:
                    if block:
                        ev = self.client._get(self._queue, deadline, "job %d" % self.job)
                    else:
                        ev = self.client._poll(self._queue)
                except TesseraError as e:
                    if self.client._dead is not None:  # the connection is gone, so is the job
                        self._finish(e.copy())
                    raise
                if ev is None:
                    return None
            assert ev is not None
            t = ev.get("type")
            if t == "progress":
                self.last_progress = ev
                return ev
            if t == "result":
                self.result = ev
                self.seconds = ev.get("seconds")
                try:
                    self.layers = messages.parse_layers(ev)
                    for layer in self.layers:
                        layer.buffer.map()
                except TesseraError as e:
                    for layer in self.layers or []:
                        layer.buffer.close()
                    self._finish(e)
                    raise e.copy()
                self._finish()
                return ev
            if t == "error":
                err = TesseraError.from_event(ev)
                self._finish(err)
                raise err.copy()
            if t == "queued":
                self.position = int(ev.get("position") or 0)
            # Other types (from a newer daemon) are skipped.

    def events(self, timeout: Optional[float] = None) -> Iterator[Dict[str, Any]]:
        """Yields ``progress`` messages, then the ``result`` message, and stops. Raises
        :class:`TesseraError` for the job's error. ``timeout``: seconds for the whole wait
        (None: no limit); on timeout the job goes on and can be waited for again. After the
        end it yields just the result (or raises the error) again."""
        if self.done:
            if self.error is not None:
                raise self.error.copy()
            if self.result is not None:
                yield self.result
            return
        deadline = _deadline(timeout)
        while True:
            ev = self._next(deadline)
            assert ev is not None
            yield ev
            if ev.get("type") == "result":
                return

    def wait(
        self,
        progress: Optional[Callable[[Dict[str, Any]], Any]] = None,
        timeout: Optional[float] = None,
    ) -> List[Layer]:
        """Waits for the end and returns the result layers, bottom first, mapped. Calls
        ``progress(event)`` in this thread for each ``progress`` message."""
        for ev in self.events(timeout):
            if progress is not None and ev.get("type") == "progress":
                progress(ev)
        assert self.layers is not None
        return self.layers

    def poll(self) -> List[Dict[str, Any]]:
        """The events that have arrived, without blocking (for GUI timers). Raises the job's
        error; after the result, ``done`` is True and ``layers`` is set."""
        out: List[Dict[str, Any]] = []
        if self.done:
            if self.error is not None:
                raise self.error.copy()
            return out
        while not self.done:
            ev = self._next(None, block=False)
            if ev is None:
                break
            out.append(ev)
        return out

    def cancel(self, timeout: Optional[float] = None) -> None:
        """Asks the daemon to cancel and waits for ``ack``; the job then ends with error code
        ``cancelled`` (wait() raises it). Raises ``unknown_job`` when it had already ended."""
        self.client.cancel(self.job, timeout)

    def __repr__(self) -> str:
        state = "running"
        if self.done:
            state = "failed: %s" % self.error.code if self.error is not None else "done"
        return "Job(%d, %s)" % (self.job, state)
