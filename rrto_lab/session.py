"""A Session: one connection to an rrto server, and the dispatch of every op on its tensors.

The session turns an intercepted ATen call into a request (remote tensors become handles, CPU
tensors become payload frames, ``cuda`` devices become "the server's device"), and the answer
back into tensors: new outputs become :class:`RemoteTensor` objects with the server's metadata,
references to inputs give back the very input object (in-place and ``out=`` ops), and
``return_and_correct_aliasing`` makes view outputs share their input's storage so autograd's
view and version tracking see what they would see on a GPU.

Handles are assigned by the client (``out`` in the request), so later modes can send ops without
waiting for the server to name their outputs. Mode ``rpc`` (this module) waits for each op.
"""

from __future__ import annotations

import gc
import logging
import os
import warnings
from typing import Any

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

from rrto_lab import aten, backend, intercept, meta_cache, recorder
from rrto_lab.client import Connection, Heartbeat
from rrto_lab.embedded import EmbeddedServer
from rrto_lab.errors import RrtoError, SessionClosed
from rrto_lab.link import LinkProcess, LinkSpec
from rrto_lab.record_replay import NOT_REPLAYED, RecordReplay
from rrto_lab.remote_tensor import RemoteTensor
from rrto_lab.sequence_search import SequenceResult
from rrto_lab.telemetry import Telemetry
from rrto_server.protocol import (
    Handle,
    NewTensor,
    Payload,
    RemoteDevice,
    TensorMeta,
    tensor_from_frame,
    tensor_to_frame,
    walk,
)

log = logging.getLogger("rrto_lab.session")
MODES = ("rpc", "async", "rrto")
_ops = torch.ops.aten
_COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
_REMOTE = RemoteDevice()
_CPU = torch.device("cpu")


def connect(address: str | None = None, *, mode: str = "rrto", token: str | None = None,
            timeout_s: float = 30.0, heartbeat_s: float = 10.0,
            link: dict | LinkSpec | None = None) -> Session:
    """Open a session with an rrto server.

    ``address`` is a ZeroMQ endpoint (``tcp://gpu-lab:5555``, ``ipc:///path``); without one,
    the ``RRTO_SERVER`` environment variable; without that, an embedded ``rrto-server`` child
    process that ends with the session. ``token`` defaults to ``RRTO_TOKEN``. ``mode`` is one of
    ``rpc`` (one round trip per op), ``async`` (ops queued, one round trip per sync point) and
    ``rrto`` (record, then replay: about one round trip per inference). ``link``
    (``{"rtt_ms": 10, "mbps": 50}``) puts an emulated network link (:mod:`rrto_lab.link`) in
    front of the server. The session is not active until :meth:`Session.activate` (or ``with``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    address = address or os.environ.get("RRTO_SERVER") or None
    token = token if token is not None else os.environ.get("RRTO_TOKEN")
    embedded = EmbeddedServer(timeout_s=max(timeout_s, 60.0)) if address is None else None
    try:
        session = Session(embedded.address if embedded else address, mode=mode,
                          token=embedded.token if embedded else token, timeout_s=timeout_s,
                          heartbeat_s=heartbeat_s, embedded=embedded)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    if link is not None:
        try:
            session.set_link(link)
        except BaseException:
            session.close()
            raise
    return session


class Session:
    """One client of one rrto server: its tensors, its counters, its activation."""

    def __init__(self, address: str, *, mode: str, token: str | None, timeout_s: float,
                 heartbeat_s: float, embedded: EmbeddedServer | None = None) -> None:
        self.address = address  # where requests go: the server, or a link in front of it
        self.server_address = address
        self.mode = mode
        self.embedded = embedded  # the server process this session started, if any
        self._link: LinkProcess | None = None
        self._heartbeat_s = heartbeat_s
        self.connection = Connection(address, timeout_s)
        self.closed = False
        self._next_handle = 1
        self._next_event = 1
        self._pending_free: list[int] = []
        self._pending_ops: list[dict] = []
        self._frames: list = []
        self.meta = meta_cache.MetaCache()
        self.telemetry = Telemetry()
        self.rr = RecordReplay(self)
        self.rr.enable(mode == "rrto")
        self._live = 0
        try:
            reply, _ = self.connection.request(
                {"type": "hello", "token": token, "client": "rrto_lab"})
        except BaseException:
            self.connection.close()
            raise
        self.sid: str = reply["sid"]
        self.device_info: dict[str, Any] = reply["device"]
        self._heartbeat: Heartbeat | None = None
        self._start_heartbeat()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.active else "inactive")
        return (f"<rrto Session {self.address} device={self.device_info.get('name')!r} "
                f"mode={self.mode} {state}>")

    def _start_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self._heartbeat = None
        if self._heartbeat_s > 0:
            self._heartbeat = Heartbeat(self.address, self.sid, self._heartbeat_s)
            self._heartbeat.start()

    @property
    def link(self) -> LinkSpec | None:
        """The emulated link in front of the server, if any."""
        return self._link.spec if self._link is not None else None

    def set_link(self, link: dict | LinkSpec | None) -> None:
        """Put an emulated link (``{"rtt_ms": 10, "mbps": 50}``) in front of the server, or
        remove it (``None``); the session and its tensors carry on."""
        self._check_open()
        spec = LinkSpec(**link) if isinstance(link, dict) else link
        if spec is not None and not self.server_address.startswith("tcp://"):
            raise RrtoError(f"an emulated link forwards TCP only; the server is at "
                            f"{self.server_address}. Start it with --listen tcp://HOST:PORT.")
        new = LinkProcess(self.server_address, spec) if spec is not None else None
        old, self._link = self._link, new
        self.address = new.address if new is not None else self.server_address
        self.connection.reconnect(self.address)
        self._start_heartbeat()
        if old is not None:
            old.stop()

    def set_mode(self, mode: str) -> None:
        """Switch mode; queued work runs first, templates are kept for a return to ``rrto``."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self._check_open()
        self.flush()
        self.telemetry.close_row()
        self.rr.enable(mode == "rrto")
        self.mode = mode

    def reset(self) -> None:
        """Forget templates, the recorded history and all statistics (tensors stay)."""
        self._check_open()
        self.flush()
        self.rr.reset()
        self.telemetry.reset()
        self.connection.messages = self.connection.bytes_sent = 0
        self.connection.bytes_received = 0

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return intercept.active_session() is self

    def activate(self) -> Session:
        """Redirect ``cuda`` in this process to this session's server."""
        self._check_open()
        intercept.install(self)
        return self

    def deactivate(self) -> None:
        """Restore torch exactly as it was; remote tensors stay usable until :meth:`close`."""
        if self.active:
            intercept.uninstall()

    def close(self) -> None:
        """Deactivate, free everything on the server, stop the embedded server if any."""
        if self.closed:
            return
        self.deactivate()
        gc.collect()  # wrappers in reference cycles (swapped parameters, views) count as dropped
        live = self._live
        if live:
            warnings.warn(f"closing the rrto session drops {live} remote tensor(s) still "
                          "referenced in this process; using them now raises SessionClosed",
                          stacklevel=2)
        # the session is ending: nothing left to run
        self._pending_ops, self._frames = [], []
        self.rr.enable(False)
        try:
            self._request({"type": "bye"})
        except RrtoError as e:
            log.warning("could not say bye to %s: %s", self.address, e)
        finally:
            self.closed = True
            if self._heartbeat is not None:
                self._heartbeat.stop()
            self.connection.close()
            for helper in (self._link, self.embedded):
                if helper is not None:
                    helper.stop()

    def __enter__(self) -> Session:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def __deepcopy__(self, memo: dict) -> Session:
        return self  # a copied remote model shares its session

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosed(
                f"this rrto session ({self.address}) is closed; its tensors are gone. "
                "Open a new one with rrto_lab.connect() and move your data again.")

    # -- statistics ----------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Session totals: ops intercepted, round trips, messages and bytes each way."""
        c = self.connection
        return {"ops": self.telemetry.ops, "rpcs": self.telemetry.rpcs, "messages": c.messages,
                "bytes_sent": c.bytes_sent, "bytes_received": c.bytes_received,
                "live_tensors": self._live, "templates": len(self.rr.templates)}

    @property
    def templates(self) -> dict:
        """The replay templates known to this session (mode rrto), by their fine tokens."""
        return self.rr.templates

    @property
    def replaying(self) -> bool:
        """Whether the session is inside a replay instance now."""
        return self.rr.instance is not None

    @property
    def inferences(self) -> list[dict[str, Any]]:
        """One row per inference (see :mod:`rrto_lab.telemetry`), oldest first."""
        return [row.as_dict() for row in self.telemetry.rows]

    @property
    def search_result(self) -> SequenceResult | None:
        """The latest Operator Sequence Search result (mode rrto)."""
        rec = self.rr.recorder
        return rec.last_result if rec is not None else None

    # -- requests ------------------------------------------------------------------------------
    def _request(self, header: dict) -> tuple[dict, list]:
        """One round trip. Queued work and pending frees ride along, in order: the server runs
        ``ops`` (queued ops and replay segments), then frees, then the request itself."""
        if header.get("type") != "replay":
            self.rr.queue_unsent()
        header["sid"] = self.sid
        if self._pending_ops:
            header["ops"], self._pending_ops = self._pending_ops, []
        if self._pending_free:
            header["free"], self._pending_free = self._pending_free, []
        frames, self._frames = self._frames, []
        c = self.connection
        sent, received = c.bytes_sent, c.bytes_received
        reply: dict = {}
        try:
            reply, reply_frames = c.request(header, frames)
            return reply, reply_frames
        finally:
            self.telemetry.round_trip(c.bytes_sent - sent, c.bytes_received - received,
                                      reply.get("t", 0.0), self._phase)

    def release(self, handle: int) -> None:
        """Called when a RemoteTensor is garbage-collected; freed with the next request."""
        self._live -= 1
        if not self.closed:
            self._pending_free.append(handle)

    def _wrap(self, handle: int, meta: Any) -> RemoteTensor:
        self._live += 1
        return RemoteTensor(self, handle, meta)

    def _payload(self, t: torch.Tensor, copy: bool = False) -> Payload:
        meta, frame = tensor_to_frame(t)
        self._frames.append(bytes(frame) if copy else frame)
        return Payload(len(self._frames) - 1, meta)

    # -- ops -----------------------------------------------------------------------------------
    def dispatch(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any:
        """Run one intercepted ATen op on the server; return what the op returns locally."""
        self._check_open()
        traits = aten.traits(func)
        if traits.decomposes:
            out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if traits.python_composite:
            return func.redispatch(_COMPOSITE, *args, **kwargs)
        if func is _ops.copy_.default and not isinstance(args[0], RemoteTensor):
            host = self.dispatch(_ops._to_copy.default, (args[1],), {"device": _CPU})
            return args[0].copy_(host, *args[2:], **kwargs)
        fetch = kwargs.get("device") == _CPU
        if fetch:
            kwargs = {k: v for k, v in kwargs.items()
                      if k not in ("device", "pin_memory", "non_blocking")}
        if self.mode == "rrto":
            out = self.rr.replay(func, args, kwargs, traits.name)
            if out is not NOT_REPLAYED:
                return self._finish(func, args, kwargs, out, traits)
        self.telemetry.op(self._phase, traits.name or aten.op_name(func))
        if fetch:
            out = self._run(func, args, kwargs, fetch=True)
        elif self.mode == "rpc":
            out = self._run(func, args, kwargs)
        else:
            key = meta_cache.key_of(func, args, kwargs)
            spec = self.meta.get(key)
            out = self._enqueue(func, args, kwargs, spec) if spec is not None \
                else self._run(func, args, kwargs, key=key)
        return self._finish(func, args, kwargs, out, traits)

    def _finish(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any,
                traits: aten.Traits) -> Any:
        if traits.resize:
            return aten.resized(func, args, kwargs)
        if traits.outs:
            aten.resize_outs(func, args, kwargs)
        if not traits.aliases or (isinstance(out, torch.Tensor)
                                  and not isinstance(out, RemoteTensor)):
            return out  # nothing to alias, or fetched data
        return return_and_correct_aliasing(func, args, kwargs, out)

    @property
    def _phase(self) -> str:
        return self.rr.phase() if self.mode == "rrto" else self.mode

    def _encode(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict,
                copy: bool) -> dict:
        """The wire form of one op; CPU tensors go to ``self._frames`` (copied if ``copy``)."""

        def encode(v: Any) -> Any:
            if isinstance(v, RemoteTensor):
                if v._rrto_session is not self:
                    v._rrto_session._check_open()
                    raise RrtoError(f"{func}: tensors of two different rrto sessions in one op")
                return Handle(v._rrto_handle)
            if isinstance(v, torch.Tensor):
                return self._payload(v, copy)
            if isinstance(v, torch.device):
                return _REMOTE if v.type in ("cuda", backend.NAME) else v
            if isinstance(v, torch.Generator):
                raise RrtoError(f"{func}: a torch.Generator cannot be sent to the rrto server; "
                                "seed the remote device with torch.cuda.manual_seed instead")
            return v

        return {"op": aten.op_name(func), "args": walk(args, encode),
                "kwargs": walk(kwargs, encode), "out": self._next_handle}

    def _run(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict,
             fetch: bool = False, key: tuple | None = None) -> Any:
        """Send one op and wait for its answer (after any queued work); learn its metadata."""
        entry = self._encode(func, args, kwargs, copy=False)
        reply, reply_frames = self._request({"type": "op", **entry, "fetch": fetch})
        tensors = aten.tensors(args, kwargs)
        inputs = {t._rrto_handle: t for t in tensors if isinstance(t, RemoteTensor)}
        made: list[int] = []

        def decode(v: Any) -> Any:
            if isinstance(v, NewTensor):
                self._next_handle = max(self._next_handle, v.handle + 1)
                made.append(v.handle)
                return self._wrap(v.handle, v.meta)
            if isinstance(v, Handle):
                return inputs[v.id]
            if isinstance(v, Payload):
                return tensor_from_frame(v.meta, reply_frames[v.frame])
            return v

        out = aten.as_returns(func, walk(reply["result"], decode))
        spec = None if fetch else meta_cache.spec_of(out, tensors)
        if fetch:
            kind = recorder.FETCH
        elif spec is None:
            kind = recorder.VALUE
        elif self.mode == "rpc" or self.meta.learn(key, func, args, kwargs, spec):
            kind = recorder.SYNC  # (rpc mode does not ask whether shapes were data-dependent)
        else:
            kind = recorder.DYNAMIC
        self.rr.record(recorder.OpRecord(func, entry["args"], entry["kwargs"], made, spec, kind))
        if kind != recorder.SYNC:
            self._sync_point()
        return out

    def _enqueue(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict,
                 spec: Any) -> Any:
        """Queue an op whose outputs are known (``spec``) and hand them out now."""
        entry = self._encode(func, args, kwargs, copy=True)
        expect: list[TensorMeta] = []
        first = self._next_handle
        out = self._make(spec, aten.tensors(args, kwargs), expect)
        entry["expect"] = expect
        self._pending_ops.append(entry)
        self.rr.record(recorder.OpRecord(func, entry["args"], entry["kwargs"],
                                         list(range(first, self._next_handle)), spec,
                                         recorder.QUEUED))
        return out

    def _make(self, spec: Any, inputs: list[torch.Tensor], made: list[TensorMeta]) -> Any:
        """Outputs for ``spec``: new wrappers with the next handles, or the aliased inputs."""
        if isinstance(spec, meta_cache.Alias):
            return inputs[spec.index]
        if isinstance(spec, TensorMeta):
            made.append(spec)
            self._next_handle += 1
            return self._wrap(self._next_handle - 1, spec)
        return type(spec)(self._make(x, inputs, made) for x in spec)

    def _sync_point(self) -> None:
        """Data came back to the notebook: an inference row ends; in mode rrto, search."""
        self.telemetry.close_row()
        self.rr.sync_point()

    def _frame(self, meta: TensorMeta, data: bytes) -> Payload:
        """Queue ``data`` as a payload frame of the next request."""
        self._frames.append(data)
        return Payload(len(self._frames) - 1, meta)

    def flush(self) -> None:
        """Run every queued op now (a round trip only if there is any)."""
        if self._pending_ops or self.rr.unsent():
            self._request({"type": "ping"})

    def upload(self, t: torch.Tensor, dtype: torch.dtype | None = None,
               memory_format: torch.memory_format = torch.preserve_format) -> RemoteTensor:
        """Copy a CPU tensor to the server (``t.to('cuda')`` when no gradient flows through it)."""
        kwargs: dict[str, Any] = {"dtype": dtype, "device": backend.DEVICE,
                                  "memory_format": memory_format}
        return self.dispatch(_ops._to_copy.default, (t,), kwargs)

    # -- device queries (torch.cuda.*) ---------------------------------------------------------
    def device_query(self, query: str, arg: Any = None) -> Any:
        self._check_open()
        header: dict[str, Any] = {"type": "device", "query": query}
        if query == "manual_seed":
            header["seed"] = int(arg) & 0xFFFF_FFFF_FFFF_FFFF
        elif query == "set_rng_state":
            header["state"] = self._payload(arg)
        reply, reply_frames = self._request(header)
        result = reply["result"]
        if isinstance(result, Payload):
            return tensor_from_frame(result.meta, reply_frames[result.frame])
        return result

    def event(self, action: str, event: int, end: int | None = None) -> Any:
        self._check_open()
        header: dict[str, Any] = {"type": "event", "action": action, "event": event}
        if end is not None:
            header["end"] = end
        return self._request(header)[0]["result"]

    def new_event_id(self) -> int:
        self._next_event += 1
        return self._next_event

