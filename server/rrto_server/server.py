"""The rrto GPU server: a ZeroMQ ROUTER that runs each session's ops on its device.

Invariant: every request gets exactly one answer, an ``ok`` reply or an error naming what failed;
nothing a client sends can stop the loop. Sessions are keyed by a random session id handed out at
``hello`` (after the token check), not by socket identity, so a client's heartbeat socket can keep
its session alive; a session silent for longer than ``session_timeout_s`` is freed.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from rrto_server import device as devices
from rrto_server.executor import Executor, OpError
from rrto_server.protocol import Payload, ProtocolError, pack, tensor_from_frame, unpack
from rrto_server.replay import Template, replay

log = logging.getLogger("rrto_server")


@dataclass
class ServerConfig:
    listen: str = "tcp://127.0.0.1:5555"
    device: str = "auto"
    token: str | None = None
    session_timeout_s: float = 120.0
    parent_pid: int | None = None  # exit when this process is gone (the embedded server)


@dataclass
class Session:
    sid: str
    executor: Executor
    events: devices.Events
    templates: dict[int, Template] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    requests: int = 0


Reply = tuple[dict, list]


class Server:
    """Binds, serves until :meth:`stop` (or the parent process dies), then frees everything."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        torch.set_grad_enabled(False)  # ops run below autograd: the client's autograd drives them
        self.device = devices.pick_device(config.device)
        self.info = devices.describe(self.device)
        self.sessions: dict[str, Session] = {}
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(config.listen)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._running = True
        self._handlers: dict[str, Callable[[Session, dict, list], Reply]] = {
            "op": self._op,
            "template": self._template,
            "replay": self._replay,
            "device": self._device,
            "event": self._event,
            "ping": lambda s, h, f: ({}, []),
            "bye": self._bye,
        }

    # -- loop ----------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        tick_ms = 1000
        try:
            while self._running:
                if poller.poll(tick_ms):
                    self._serve_one()
                self._housekeeping()
        finally:
            self.close()

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        for session in list(self.sessions.values()):
            self._end(session, "server shutting down")
        self.socket.close(0)
        self.context.term()

    def _serve_one(self) -> None:
        parts = self.socket.recv_multipart(copy=False)
        began = time.perf_counter()
        identity, frames = parts[0], parts[1:]
        header: dict[str, Any] = {}
        try:
            if not frames:
                raise ProtocolError("empty message")
            header = unpack(frames[0].bytes)
            reply, out_frames = self._dispatch(header, [f.buffer for f in frames[1:]])
            devices.synchronize(self.device)  # so "t" is the device's time, not launch time
            reply = {"id": header.get("id"), "ok": True, "t": time.perf_counter() - began,
                     **reply}
        except OpError as e:
            reply, out_frames = self._error(header, e.kind, str(e), e.op), []
        except ProtocolError as e:
            reply, out_frames = self._error(header, "ProtocolError", str(e)), []
        except Exception as e:  # a bug of ours must not end the server; the client is told
            log.exception("request %r failed", header.get("type"))
            reply, out_frames = self._error(header, type(e).__name__, str(e)), []
        self.socket.send_multipart([identity, pack(reply), *out_frames], copy=False)

    @staticmethod
    def _error(header: dict, kind: str, message: str, op: str | None = None) -> dict:
        request_id = header.get("id") if isinstance(header, dict) else None
        return {"id": request_id, "ok": False,
                "error": {"type": kind, "message": message, "op": op}}

    def _dispatch(self, header: dict, frames: list) -> Reply:
        kind = header.get("type")
        if kind == "hello":
            return self._hello(header)
        session = self.sessions.get(header.get("sid"))  # type: ignore[arg-type]
        if session is None:
            raise ProtocolError("no such session (never opened, closed, or timed out); "
                                "connect again")
        session.last_seen = time.monotonic()
        session.requests += 1
        handler = self._handlers.get(kind)  # type: ignore[arg-type]
        if handler is None:
            raise ProtocolError(f"unknown request type {kind!r}")
        free = header.get("free") or []
        if not isinstance(free, list) or not all(isinstance(h, int) for h in free):
            raise ProtocolError("'free' must be a list of handles")
        ops = header.get("ops")
        if ops:
            self._run_queued(session, ops, frames)
        # Frees come after the work issued before them. A replay request holds steps the client
        # matched before it dropped some of their tensors, so it runs first; other requests
        # (memory queries, bye) see the frees.
        if kind == "replay":
            answer = handler(session, header, frames)
            session.executor.free(free)
            return answer
        session.executor.free(free)
        return handler(session, header, frames)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        timeout = self.config.session_timeout_s
        if timeout > 0:
            for session in list(self.sessions.values()):
                if now - session.last_seen > timeout:
                    self._end(session, f"no heartbeat for {timeout:g} s")
        parent = self.config.parent_pid
        if parent is not None and os.getppid() != parent:
            log.info("parent process %d is gone; stopping", parent)
            self.stop()

    def _end(self, session: Session, why: str) -> None:
        freed = session.executor.free_all()
        session.events.clear()
        session.templates.clear()
        self.sessions.pop(session.sid, None)
        log.info("session %s ended (%s); %d tensors freed", session.sid[:8], why, freed)

    # -- handlers ------------------------------------------------------------------------------
    def _hello(self, header: dict) -> Reply:
        token = self.config.token
        offered = header.get("token")
        if token is not None and not (
            isinstance(offered, str) and hmac.compare_digest(offered.encode(), token.encode())
        ):
            raise ProtocolError("authentication failed: wrong or missing token")
        sid = secrets.token_hex(16)
        self.sessions[sid] = Session(sid, Executor(self.device), devices.Events(self.device))
        log.info("session %s opened by %s", sid[:8], header.get("client", "?"))
        return {"sid": sid, "device": self.info}, []

    @staticmethod
    def _run_queued(session: Session, ops: Any, frames: list) -> None:
        """Run ops a client queued without waiting; the first failure stops the rest."""
        if not isinstance(ops, list):
            raise ProtocolError("'ops' must be a list")
        for i, entry in enumerate(ops):
            if not isinstance(entry, dict):
                raise ProtocolError("each queued op must be a map")
            try:
                if "template" in entry:
                    replay(session.executor, Server._find_template(session, entry), entry, frames)
                    continue
                session.executor.run(entry.get("op"), entry.get("args", []),
                                     entry.get("kwargs", {}), entry.get("out", 0), False, frames,
                                     expect=entry.get("expect"))
            except OpError as e:
                raise OpError(e.op, f"{e} (queued op {i + 1} of {len(ops)}, sent without "
                              "waiting; the ops after it did not run)", e.kind) from None

    def _op(self, session: Session, header: dict, frames: list) -> Reply:
        out = header.get("out", 0)
        if not isinstance(out, int):
            raise ProtocolError("'out' must be an integer handle")
        result, out_frames = session.executor.run(
            header.get("op"), header.get("args", []), header.get("kwargs", {}), out,
            bool(header.get("fetch")), frames,
        )
        return {"result": result}, out_frames

    def _template(self, session: Session, header: dict, frames: list) -> Reply:
        tid = header.get("template")
        if not isinstance(tid, int):
            raise ProtocolError("'template' must be an integer id")
        session.templates[tid] = Template.parse(header.get("steps"))
        return {"result": len(session.templates[tid].steps)}, []

    @staticmethod
    def _find_template(session: Session, header: dict) -> Template:
        template = session.templates.get(header.get("template"))  # type: ignore[arg-type]
        if template is None:
            raise ProtocolError(f"template {header.get('template')!r} is not registered")
        return template

    def _replay(self, session: Session, header: dict, frames: list) -> Reply:
        result, out_frames = replay(session.executor, self._find_template(session, header),
                                    header, frames)
        return {"result": result}, out_frames

    def _device(self, session: Session, header: dict, frames: list) -> Reply:
        query = header.get("query")
        device = self.device
        ex = session.executor
        if query == "info":
            return {"result": self.info}, []
        if query == "synchronize":
            devices.synchronize(device)
            return {"result": None}, []
        if query == "memory":
            return {"result": {"allocated": ex.allocated, "peak": ex.peak}}, []
        if query == "reset_peak":
            ex.peak = ex.allocated
            return {"result": None}, []
        if query == "empty_cache":
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return {"result": None}, []
        if query == "manual_seed":
            seed = header.get("seed")
            if not isinstance(seed, int):
                raise ProtocolError("manual_seed needs an integer seed")
            devices.manual_seed(device, seed)
            return {"result": None}, []
        if query == "get_rng_state":
            out_frames: list = []
            state = devices.get_rng_state(device)
            return {"result": Executor._payload(state, out_frames)}, out_frames
        if query == "set_rng_state":
            payload = header.get("state")
            if not isinstance(payload, Payload) or not 0 <= payload.frame < len(frames):
                raise ProtocolError("set_rng_state needs the state as a payload")
            devices.set_rng_state(device, tensor_from_frame(payload.meta, frames[payload.frame]))
            return {"result": None}, []
        raise ProtocolError(f"unknown device query {query!r}")

    def _event(self, session: Session, header: dict, frames: list) -> Reply:
        action, event_id = header.get("action"), header.get("event")
        if not isinstance(event_id, int):
            raise ProtocolError("'event' must be an integer")
        if action == "record":
            session.events.record(event_id)
            return {"result": None}, []
        if action == "elapsed":
            end = header.get("end")
            if not isinstance(end, int):
                raise ProtocolError("'end' must be an integer")
            try:
                return {"result": session.events.elapsed_ms(event_id, end)}, []
            except ValueError as e:
                raise OpError("Event.elapsed_time", str(e), "RuntimeError") from None
        raise ProtocolError(f"unknown event action {action!r}")

    def _bye(self, session: Session, header: dict, frames: list) -> Reply:
        held = len(session.executor.tensors)
        self._end(session, "closed by the client")
        return {"result": {"freed": held}}, []

