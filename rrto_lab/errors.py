"""The errors rrto raises to a person: each says what failed and what to do about it."""

from __future__ import annotations


class RrtoError(RuntimeError):
    """Base class of every rrto error."""


class ServerUnavailable(RrtoError):
    """The server did not answer within the timeout (or could not be started)."""


class RemoteError(RrtoError):
    """The server could not run an operation; carries the op and the server's own message."""

    def __init__(self, op: str | None, kind: str, message: str) -> None:
        where = f"{op}: " if op else ""
        super().__init__(f"{where}{kind}: {message}")
        self.op = op
        self.kind = kind
        self.message = message


class SessionClosed(RrtoError):
    """A remote tensor (or session) was used after its session was closed."""
