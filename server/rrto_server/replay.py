"""Server-side replay: a registered template of ops run in a tight loop on new inputs.

A template is the op sequence of one inference as the client recorded it. Registration resolves
every op once and keeps each argument as a constant, a parameter handle, or a :class:`Slot`;
replaying steps ``start..stop`` of an instance fills the slots — outputs of earlier steps of the
instance (their handles are ``base + offset``), handles carried over from the previous instance,
and the request's input payloads — runs each op, and keeps each new output under its handle, so
a tensor handed out during replay is as real as any other. Each output is checked against the
metadata recorded with the template: the server stays the authority.

(A CUDA graph of the loop would save kernel-launch time on a GPU; it needs outputs in fixed
memory, which conflicts with handing every output out as a live tensor, and is not done.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rrto_server.executor import Executor, OpError, resolve_op
from rrto_server.protocol import (
    CARRIED,
    LOCAL,
    Handle,
    Payload,
    ProtocolError,
    RemoteDevice,
    Slot,
    TensorMeta,
    tensor_from_frame,
    walk,
)


@dataclass
class Step:
    op: torch._ops.OpOverload
    name: str
    args: Any
    kwargs: Any
    offset: int  # handle of the first new output, relative to the instance base
    expect: list[TensorMeta]
    fetch: bool  # the step's outputs go back as data (``.cpu()``) and are not kept
    binders: tuple = ()  # args compiled for the loop (see _compile)
    kw_binders: tuple = ()

    def __post_init__(self) -> None:
        self.binders = tuple(_compile(a) for a in self.args)
        self.kw_binders = tuple((k, _compile(v)) for k, v in self.kwargs.items())


_PARAM, _LOCAL, _CONST, _TREE = 0, 1, 2, 3


def _special(v: Any) -> bool:
    if isinstance(v, (Slot, Handle, RemoteDevice)):
        return True
    if isinstance(v, (list, tuple)):
        return any(_special(x) for x in v)
    return False


def _compile(v: Any) -> tuple[int, Any]:
    if isinstance(v, Handle):
        return _PARAM, v.id
    if isinstance(v, Slot) and v.kind == LOCAL:
        return _LOCAL, v  # made relative once every step's offset is known
    return (_TREE, v) if _special(v) else (_CONST, v)


@dataclass
class Template:
    steps: list[Step]

    @classmethod
    def parse(cls, wire: Any) -> Template:
        if not isinstance(wire, list) or not wire:
            raise ProtocolError("a template needs a non-empty list of steps")
        steps = []
        for i, s in enumerate(wire):
            if not isinstance(s, dict) or not isinstance(s.get("args"), list) \
                    or not isinstance(s.get("kwargs"), dict):
                raise ProtocolError(f"template step {i} is malformed")
            expect = s.get("expect", [])
            offset = s.get("off", 0)
            if not isinstance(offset, int) or not isinstance(expect, list) or \
                    not all(isinstance(m, TensorMeta) for m in expect):
                raise ProtocolError(f"template step {i} has a malformed offset or expectation")
            walk([s["args"], s["kwargs"]], lambda v, i=i: _check_slot(v, i))
            steps.append(Step(resolve_op(s.get("op")), s["op"], s["args"], s["kwargs"], offset,
                              expect, bool(s.get("fetch"))))
        for step in steps:
            step.binders = tuple(_relative(b, steps) for b in step.binders)
            step.kw_binders = tuple((k, _relative(b, steps)) for k, b in step.kw_binders)
        return cls(steps)


def _relative(binder: tuple[int, Any], steps: list[Step]) -> tuple[int, Any]:
    if binder[0] == _LOCAL:
        slot = binder[1]
        return _LOCAL, steps[slot.step].offset + slot.out
    return binder


def _check_slot(v: Any, step: int) -> None:
    if isinstance(v, Slot) and v.kind == LOCAL and not 0 <= v.step < step:
        raise ProtocolError(f"template step {step} refers to a later step {v.step}")


def replay(executor: Executor, template: Template, request: dict, frames: list
           ) -> tuple[Any, list]:
    """Run steps ``start..stop`` of the instance at ``base``; return the last step's answer."""
    base, start, stop = request.get("base"), request.get("start"), request.get("stop")
    steps = template.steps
    if not all(isinstance(v, int) for v in (base, start, stop)) or \
            not 0 <= start < stop <= len(steps):
        raise ProtocolError("replay needs integer base, start, stop within the template")
    inputs, carried = iter(request.get("inputs") or ()), iter(request.get("carried") or ())
    answer: tuple[Any, list] = (None, [])
    tensors, bind_handle = executor.tensors, executor.bind_handle
    for k in range(start, stop):
        step = steps[k]
        seen: dict[int, int] = {}

        def bind(v: Any, step: Step = step, seen: dict[int, int] = seen) -> Any:
            if isinstance(v, Slot):
                if v.kind == CARRIED:
                    return bind_handle(_next(carried, int, step), seen)
                payload = _next(inputs, Payload, step)
                if not 0 <= payload.frame < len(frames):
                    raise ProtocolError(f"payload frame {payload.frame} is missing")
                return tensor_from_frame(payload.meta, frames[payload.frame])
            if isinstance(v, Handle):
                return bind_handle(v.id, seen)
            if isinstance(v, RemoteDevice):
                return executor.device
            return v

        def arg(binder: tuple[int, Any], bind: Any = bind, seen: dict[int, int] = seen) -> Any:
            kind, value = binder
            if kind == _CONST:
                return value
            if kind == _TREE:
                return walk(value, bind)
            handle = value if kind == _PARAM else base + value
            t = tensors.get(handle)
            if t is None:
                return bind_handle(handle, seen)  # raises the unknown-handle error
            seen[id(t)] = handle
            return t

        try:
            answer = executor.execute(
                step.op, step.name, [arg(b) for b in step.binders],
                {key: arg(b) for key, b in step.kw_binders}, seen, base + step.offset,
                step.fetch, None if step.fetch else step.expect)
        except OpError as e:
            raise OpError(e.op, f"{e} (replay step {k} of {len(steps)})", e.kind) from None
    return answer


def _next(values: Any, kind: type, step: Step) -> Any:
    value = next(values, None)
    if not isinstance(value, kind):
        what = "input payloads" if kind is Payload else "carried handles"
        raise ProtocolError(f"replay of {step.name}: too few {what} in the request")
    return value
