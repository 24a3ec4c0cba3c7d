"""The ZeroMQ side of a session: one DEALER for requests, one for heartbeats.

Invariant: :meth:`Connection.request` either returns the reply to *this* request or raises;
a late reply to an earlier request that timed out is recognised by its id and dropped. Every
wait is bounded by ``timeout_s``, so a server that is gone is reported, never waited on forever.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any

import zmq

from rrto_lab.errors import RemoteError, ServerUnavailable
from rrto_server.protocol import ProtocolError, pack, unpack

log = logging.getLogger("rrto_lab.client")


class Connection:
    """Request/reply over a DEALER socket, with byte and message counters."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.context = zmq.Context.instance()
        self.socket = self._socket()
        self._ids = itertools.count(1)
        self.messages = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def _socket(self) -> zmq.Socket:
        s = self.context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.address)
        return s

    def request(self, header: dict, frames: list | tuple = ()) -> tuple[dict, list]:
        """Send one request and wait for its reply; raise RemoteError for an error reply."""
        request_id = next(self._ids)
        data = pack({"id": request_id, **header})
        self.socket.send_multipart([data, *frames], copy=False)
        self.messages += 1
        self.bytes_sent += len(data) + sum(memoryview(f).nbytes for f in frames)
        timeout_ms = int(self.timeout_s * 1000)
        while True:
            if not self.socket.poll(timeout_ms):
                self._reset()
                raise ServerUnavailable(
                    f"no answer from the rrto server at {self.address} within "
                    f"{self.timeout_s:g} s (request {header.get('type')!r}"
                    f"{' ' + header['op'] if 'op' in header else ''}). Is the server running "
                    f"and reachable? Start one with `rrto-server --listen {self.address}`."
                )
            parts = self.socket.recv_multipart(copy=False)
            self.bytes_received += sum(len(p) for p in parts)
            try:
                reply = unpack(parts[0].bytes)
            except ProtocolError as e:
                raise ServerUnavailable(f"the server at {self.address} sent a bad reply: {e}") \
                    from None
            if reply.get("id") != request_id:
                log.debug("dropping a late reply to request %r", reply.get("id"))
                continue
            if not reply.get("ok"):
                err: dict[str, Any] = reply.get("error") or {}
                raise RemoteError(err.get("op"), err.get("type", "Error"),
                                  err.get("message", "(no message)"))
            return reply, [p.buffer for p in parts[1:]]

    def _reset(self) -> None:
        """After a timeout, start over on a fresh socket so stale replies cannot pile up."""
        self.socket.close(0)
        self.socket = self._socket()

    def reconnect(self, address: str) -> None:
        """Talk to the same server by another route (an emulated link, or none); counters stay."""
        self.address = address
        self._reset()

    def close(self) -> None:
        self.socket.close(0)


class Heartbeat(threading.Thread):
    """Pings the session on its own socket so an idle notebook keeps its tensors on the server."""

    def __init__(self, address: str, sid: str, period_s: float) -> None:
        super().__init__(name="rrto-heartbeat", daemon=True)
        self.address, self.sid, self.period_s = address, sid, period_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.address)
        try:
            n = 0
            while not self._stop_event.wait(self.period_s):
                n += 1
                socket.send(pack({"id": n, "type": "ping", "sid": self.sid}))
                if socket.poll(int(self.period_s * 1000)):
                    socket.recv_multipart()
        finally:
            socket.close(0)

    def stop(self) -> None:
        self._stop_event.set()
