"""Errors raised by the client.

Every failure is a :class:`TesseraError` with a machine-readable ``code``. Codes sent by the
daemon are listed in ``protocol/README.md``; the client adds its own for things that happen on
this side of the socket:

``disconnected``      the daemon closed the connection (or it broke)
``closed``            this client was closed while a request was waiting
``timeout``           no answer within the time given; the request may still complete
``bad_reply``         the daemon sent a frame or message this client cannot read
``connect_failed``    the socket or TCP address could not be connected to
``daemon_not_found``  autostart found no ``tesserad`` executable (:class:`DaemonNotFound`)
``daemon_failed``     autostart started ``tesserad`` but could not connect to it
``map_failed``        a buffer file could not be memory-mapped
``bad_frame``         a request too large for one frame (1 MiB), refused before sending
``internal``          a bug in this client's reader thread
"""

from __future__ import annotations

from typing import Any, Dict, Optional


class TesseraError(Exception):
    """An error reply from the daemon, or a client-side failure.

    Attributes: ``code`` (str), ``message`` (str), ``hint`` (str: what the user can do about
    it, may be empty), ``job`` (the daemon job id for job errors, else None) and ``event``
    (the raw ``error`` message when the daemon sent one, else None).
    """

    def __init__(self, code: str, message: str, hint: str = "", job: Optional[int] = None) -> None:
        super().__init__(code, message, hint, job)
        self.code = code
        self.message = message
        self.hint = hint or ""
        self.job = job
        self.event: Optional[Dict[str, Any]] = None

    @classmethod
    def from_event(cls, event: Dict[str, Any]) -> TesseraError:
        """Builds the exception for an ``error`` message from the daemon."""
        err = cls(
            str(event.get("code") or "internal"),
            str(event.get("message") or "the daemon reported an error without a message"),
            str(event.get("hint") or ""),
            event.get("job"),
        )
        err.event = event
        return err

    def copy(self) -> TesseraError:
        """A fresh instance with the same fields (one per waiting thread, so tracebacks of
        concurrent raises do not mix)."""
        err = type(self)(self.code, self.message, self.hint, self.job)
        err.event = self.event
        return err

    def __str__(self) -> str:
        if self.hint:
            return "%s\nHint: %s" % (self.message, self.hint)
        return self.message

    def __repr__(self) -> str:
        return "%s(code=%r, message=%r, hint=%r, job=%r)" % (
            type(self).__name__, self.code, self.message, self.hint, self.job)


class DaemonNotFound(TesseraError):
    """No ``tesserad`` executable was found to start (code ``daemon_not_found``)."""
