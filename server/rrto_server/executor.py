"""Runs one session's ATen ops on real tensors and keeps the tensors its client refers to.

Invariant: a session only ever reaches tensors through its own handle table, and the only
callables are overloads found under ``torch.ops.aten`` by a name of the ATen shape. Outputs that
are the very tensor of an input (in-place and ``out=`` ops) are answered as a reference to that
input's handle, so the client keeps one tensor object and aliasing stays exact; views are new
handles over the same storage, as on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from rrto_server.protocol import (
    Handle,
    NewTensor,
    Payload,
    ProtocolError,
    RemoteDevice,
    TensorMeta,
    meta_of,
    op_name_ok,
    tensor_from_frame,
    tensor_to_frame,
    walk,
)

_SCALARS = (bool, int, float, complex, str, type(None), torch.dtype, torch.layout,
            torch.memory_format)


class OpError(RuntimeError):
    """An op the server could not run; the message goes back to the client as is."""

    def __init__(self, op: str, message: str, kind: str = "RuntimeError") -> None:
        super().__init__(message)
        self.op = op
        self.kind = kind


def resolve_op(name: Any) -> torch._ops.OpOverload:
    """The ``torch.ops.aten`` overload called ``name`` (``"add.Tensor"``, ``"relu"``)."""
    if not op_name_ok(name):
        raise ProtocolError(f"{name!r} is not an ATen operator name")
    packet_name, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, packet_name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        raise ProtocolError(f"aten::{packet_name} does not exist on this server")
    op = getattr(packet, overload or "default", None)
    if not isinstance(op, torch._ops.OpOverload):
        raise ProtocolError(f"aten::{name} has no such overload on this server")
    return op


class Executor:
    """One session's tensors and the ops that act on them, on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tensors: dict[int, torch.Tensor] = {}
        self._storage_refs: dict[int, list[int]] = {}  # data_ptr -> [nbytes, handle count]
        self.allocated = 0
        self.peak = 0

    # -- handles -------------------------------------------------------------------------------
    def tensor(self, handle: int) -> torch.Tensor:
        try:
            return self.tensors[handle]
        except KeyError:
            raise ProtocolError(
                f"tensor handle {handle} is unknown to this session (freed, or never created)"
            ) from None

    def _keep(self, handle: int, t: torch.Tensor) -> None:
        if handle in self.tensors:
            raise ProtocolError(f"tensor handle {handle} is already in use")
        if t.layout != torch.strided:
            raise ValueError(f"a {t.layout} output cannot be kept: remote tensors are strided")
        storage = t.untyped_storage()
        self.tensors[handle] = t
        key = storage.data_ptr()
        if key == 0:
            return
        ref = self._storage_refs.get(key)
        if ref is None:
            self._storage_refs[key] = [storage.nbytes(), 1]
            self.allocated += storage.nbytes()
            self.peak = max(self.peak, self.allocated)
        else:
            ref[1] += 1

    def free(self, handles: list[int]) -> None:
        for handle in handles:
            t = self.tensors.pop(handle, None)
            if t is None:
                continue
            key = t.untyped_storage().data_ptr()
            ref = self._storage_refs.get(key)
            if ref is not None:
                ref[1] -= 1
                if ref[1] == 0:
                    del self._storage_refs[key]
                    self.allocated -= ref[0]

    def free_all(self) -> int:
        n = len(self.tensors)
        self.tensors.clear()
        self._storage_refs.clear()
        self.allocated = 0
        return n

    # -- ops -----------------------------------------------------------------------------------
    def run(
        self, name: str, args: list, kwargs: dict, out: int, fetch: bool, frames: list,
        expect: list | None = None,
    ) -> tuple[Any, list[memoryview]]:
        """Run ``name`` on decoded arguments; return the result tree and its payload frames.

        New tensor outputs get handles ``out, out+1, ...``; with ``fetch`` they are sent back as
        data instead and not kept. ``expect`` is the client's prediction of the new outputs'
        metadata; the server is the authority and a difference is an error, never ignored.
        """
        op = resolve_op(name)
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ProtocolError("op args must be a list and kwargs a map")
        inputs: dict[int, int] = {}

        def bind(v: Any) -> Any:
            if isinstance(v, Handle):
                return self.bind_handle(v.id, inputs)
            if isinstance(v, Payload):
                if not 0 <= v.frame < len(frames):
                    raise ProtocolError(f"payload frame {v.frame} is missing")
                return tensor_from_frame(v.meta, frames[v.frame])
            if isinstance(v, RemoteDevice):
                return self.device
            return v

        return self.execute(op, name, walk(args, bind), walk(kwargs, bind), inputs, out, fetch,
                            expect)

    def bind_handle(self, handle: int, inputs: dict[int, int]) -> torch.Tensor:
        """The tensor of ``handle``, noted in ``inputs`` so an output that is it maps back."""
        t = self.tensor(handle)
        inputs[id(t)] = handle
        return t

    def execute(
        self, op: torch._ops.OpOverload, name: str, args: Any, kwargs: Any,
        inputs: dict[int, int], out: int, fetch: bool, expect: list | None,
    ) -> tuple[Any, list[memoryview]]:
        """Run a resolved op on bound arguments (see :meth:`run`)."""
        try:
            result = op(*args, **kwargs)  # grad mode is off in the server (Server.__init__)
        except Exception as e:  # every failure of the op is the client's to see
            raise OpError(name, str(e), type(e).__name__) from e
        answer = self._answer(name, result, inputs, out, fetch)
        if expect is not None:
            self._check(name, answer[0], expect)
        return answer

    @staticmethod
    def _check(name: str, result: Any, expect: list) -> None:
        made: list[TensorMeta] = []
        walk(result, lambda v: made.append(v.meta) if isinstance(v, NewTensor) else None)
        if made != expect:
            raise OpError(name, f"the client predicted outputs {expect} but the server made "
                          f"{made}; please report this (mode='rpc' avoids predictions)",
                          "MetadataMismatch")

    def _answer(
        self, name: str, result: Any, inputs: dict[int, int], out: int, fetch: bool
    ) -> tuple[Any, list[memoryview]]:
        """The wire form of an op's result; all or nothing: on failure no output is kept, so
        the client (which never hears of them) can use those handles again."""
        kept: list[int] = []
        try:
            return self._answer_all(name, result, inputs, out, fetch, kept)
        except Exception as e:
            self.free(kept)
            if isinstance(e, (OpError, ProtocolError)):
                raise
            raise OpError(name, str(e), type(e).__name__) from e

    def _answer_all(
        self, name: str, result: Any, inputs: dict[int, int], out: int, fetch: bool,
        kept: list[int],
    ) -> tuple[Any, list[memoryview]]:
        out_frames: list[memoryview] = []
        next_handle = out

        def leaf(v: Any) -> Any:
            nonlocal next_handle
            if isinstance(v, torch.Tensor):
                if id(v) in inputs and not fetch:
                    return Handle(inputs[id(v)])
                if fetch:
                    return self._payload(v, out_frames)
                self._keep(next_handle, v)
                kept.append(next_handle)
                next_handle += 1
                return NewTensor(next_handle - 1, meta_of(v))
            if isinstance(v, _SCALARS):
                return v
            raise OpError(name, f"aten::{name} returned a {type(v).__name__}, "
                          "which rrto cannot send")

        return walk(result, leaf), out_frames

    @staticmethod
    def _payload(t: torch.Tensor, out_frames: list[memoryview]) -> Payload:
        meta, frame = tensor_to_frame(t.cpu())
        out_frames.append(frame)
        return Payload(len(out_frames) - 1, meta)

