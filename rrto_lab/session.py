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

from rrto_lab import backend, intercept, meta_cache
from rrto_lab.client import Connection, Heartbeat
from rrto_lab.embedded import EmbeddedServer
from rrto_lab.errors import RrtoError, SessionClosed
from rrto_lab.remote_tensor import RemoteTensor
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
MODES = ("rpc", "async")
_aten = torch.ops.aten
_REMOTE = RemoteDevice()
_CPU = torch.device("cpu")


def connect(address: str | None = None, *, mode: str = "rpc", token: str | None = None,
            timeout_s: float = 30.0, heartbeat_s: float = 10.0) -> Session:
    """Open a session with an rrto server.

    ``address`` is a ZeroMQ endpoint (``tcp://gpu-lab:5555``, ``ipc:///path``); without one,
    the ``RRTO_SERVER`` environment variable; without that, an embedded ``rrto-server`` child
    process that ends with the session. ``token`` defaults to ``RRTO_TOKEN``. The session is not
    active until :meth:`Session.activate` (or a ``with`` block).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    address = address or os.environ.get("RRTO_SERVER") or None
    token = token if token is not None else os.environ.get("RRTO_TOKEN")
    embedded = EmbeddedServer(timeout_s=max(timeout_s, 60.0)) if address is None else None
    try:
        return Session(embedded.address if embedded else address, mode=mode, token=token,
                       timeout_s=timeout_s, heartbeat_s=heartbeat_s, embedded=embedded)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise


class Session:
    """One client of one rrto server: its tensors, its counters, its activation."""

    def __init__(self, address: str, *, mode: str, token: str | None, timeout_s: float,
                 heartbeat_s: float, embedded: EmbeddedServer | None = None) -> None:
        self.address = address
        self.mode = mode
        self.embedded = embedded
        self.connection = Connection(address, timeout_s)
        self.closed = False
        self._next_handle = 1
        self._next_event = 1
        self._pending_free: list[int] = []
        self._pending_ops: list[dict] = []
        self._frames: list = []
        self.meta = meta_cache.MetaCache()
        self._live = 0
        self.ops = 0
        self.rpcs = 0
        try:
            reply, _ = self.connection.request(
                {"type": "hello", "token": token, "client": "rrto_lab"})
        except BaseException:
            self.connection.close()
            raise
        self.sid: str = reply["sid"]
        self.device_info: dict[str, Any] = reply["device"]
        self._heartbeat = Heartbeat(address, self.sid, heartbeat_s) if heartbeat_s > 0 else None
        if self._heartbeat is not None:
            self._heartbeat.start()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.active else "inactive")
        return (f"<rrto Session {self.address} device={self.device_info.get('name')!r} "
                f"mode={self.mode} {state}>")

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
        self._pending_ops, self._frames = [], []  # the session is ending: nothing left to run
        try:
            self._request({"type": "bye"})
        except RrtoError as e:
            log.warning("could not say bye to %s: %s", self.address, e)
        finally:
            self.closed = True
            if self._heartbeat is not None:
                self._heartbeat.stop()
            self.connection.close()
            if self.embedded is not None:
                self.embedded.stop()

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
        c = self.connection
        return {"ops": self.ops, "rpcs": self.rpcs, "messages": c.messages,
                "bytes_sent": c.bytes_sent, "bytes_received": c.bytes_received,
                "live_tensors": self._live}

    # -- requests ------------------------------------------------------------------------------
    def _request(self, header: dict) -> tuple[dict, list]:
        """One round trip. Ops queued by the async path and pending frees ride along, in order:
        the server runs ``ops``, then frees, then the request itself."""
        header["sid"] = self.sid
        if self._pending_ops:
            header["ops"], self._pending_ops = self._pending_ops, []
        if self._pending_free:
            header["free"], self._pending_free = self._pending_free, []
        frames, self._frames = self._frames, []
        self.rpcs += 1
        return self.connection.request(header, frames)

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
        self.ops += 1
        if func is _aten.copy_.default and not isinstance(args[0], RemoteTensor):
            return args[0].copy_(self.fetch(args[1]), *args[2:], **kwargs)
        if kwargs.get("device") == _CPU:
            kwargs = {k: v for k, v in kwargs.items()
                      if k not in ("device", "pin_memory", "non_blocking")}
            return self._run(func, args, kwargs, fetch=True)
        if self.mode == "rpc":
            out = self._run(func, args, kwargs)
        else:
            key = meta_cache.key_of(func, args, kwargs)
            spec = self.meta.get(key)
            if spec is not None:
                out = self._enqueue(func, args, kwargs, spec)
            else:
                out = self._run(func, args, kwargs)
                self.meta.learn(key, func, args, kwargs, meta_cache.spec_of(out, _tensors(
                    args, kwargs)))
        if func in _RESIZES:
            return _resized(func, args, kwargs)
        return return_and_correct_aliasing(func, args, kwargs, out)

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

        return {"op": _op_name(func), "args": walk(args, encode), "kwargs": walk(kwargs, encode),
                "out": self._next_handle}

    def _run(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict,
             fetch: bool = False) -> Any:
        """Send one op and wait for its answer (with any queued ops before it)."""
        header = {"type": "op", **self._encode(func, args, kwargs, copy=False), "fetch": fetch}
        reply, reply_frames = self._request(header)
        inputs = {t._rrto_handle: t for t in _tensors(args, kwargs) if isinstance(t, RemoteTensor)}

        def decode(v: Any) -> Any:
            if isinstance(v, NewTensor):
                self._next_handle = max(self._next_handle, v.handle + 1)
                return self._wrap(v.handle, v.meta)
            if isinstance(v, Handle):
                return inputs[v.id]
            if isinstance(v, Payload):
                return tensor_from_frame(v.meta, reply_frames[v.frame])
            return v

        return _as_returns(func, walk(reply["result"], decode))

    def _enqueue(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict,
                 spec: Any) -> Any:
        """Queue an op whose outputs are known (``spec``) and hand them out now."""
        entry = self._encode(func, args, kwargs, copy=True)
        expect: list[TensorMeta] = []
        out = self._make(spec, _tensors(args, kwargs), expect)
        entry["expect"] = expect
        self._pending_ops.append(entry)
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

    def flush(self) -> None:
        """Run every queued op now (a round trip only if there are any)."""
        if self._pending_ops:
            self._request({"type": "ping"})

    def upload(self, t: torch.Tensor, dtype: torch.dtype | None = None,
               memory_format: torch.memory_format = torch.preserve_format) -> RemoteTensor:
        """Copy a CPU tensor to the server (``t.to('cuda')`` when no gradient flows through it)."""
        kwargs: dict[str, Any] = {"dtype": dtype, "device": backend.DEVICE,
                                  "memory_format": memory_format}
        return self.dispatch(_aten._to_copy.default, (t,), kwargs)

    def fetch(self, t: RemoteTensor) -> torch.Tensor:
        """The data of a remote tensor, as a CPU tensor with the same strides where dense."""
        self._check_open()
        reply, frames = self._request({"type": "fetch", "handle": t._rrto_handle})
        payload: Payload = reply["result"]
        return tensor_from_frame(payload.meta, frames[payload.frame])

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


_RESIZES = (_aten.resize_.default, _aten.resize_as_.default)


def _resized(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> torch.Tensor:
    """Give a wrapper the shape the server's resize_ gave the real tensor.

    ``return_and_correct_aliasing`` would rerun resize_ on the wrapper under meta dispatch,
    which trips an internal assert; the result is fully determined by the arguments anyway.
    """
    t = args[0]
    size = args[1] if func is _aten.resize_.default else args[1].shape
    memory_format = kwargs.get("memory_format") or (args[2] if len(args) > 2 else None)
    stride = torch.empty(size, device="meta", memory_format=memory_format
                         or torch.contiguous_format).stride()
    with torch.utils._mode_utils.no_dispatch():
        meta_in_tls = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            _aten.as_strided_.default(t, size, stride, t.storage_offset())
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta_in_tls)
    return t


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments of a call, flattened in order (the positions ``Alias`` refers to)."""
    found: list[torch.Tensor] = []
    _collect(args, found)
    _collect(list(kwargs.values()), found)
    return found


def _collect(v: Any, found: list[torch.Tensor]) -> None:
    # Module level on purpose: a recursive closure is a reference cycle, and it would keep the
    # tensors it saw alive until the garbage collector runs (blocking Module.cpu()'s swap).
    if isinstance(v, torch.Tensor):
        found.append(v)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _collect(x, found)


def _as_returns(func: torch._ops.OpOverload, out: Any) -> Any:
    """msgpack has no tuples: a multi-output op's list of results becomes a tuple again."""
    if isinstance(out, list) and len(func._schema.returns) > 1:
        return tuple(out)
    return out


def _op_name(func: torch._ops.OpOverload) -> str:
    schema = func._schema
    if schema.name.startswith("aten::"):
        name = schema.name[len("aten::"):]
        return f"{name}.{schema.overload_name}" if schema.overload_name else name
    raise RrtoError(f"{schema.name} is not an ATen operator; rrto only forwards torch.ops.aten "
                    "ops (custom operators need to run on the CPU)")
