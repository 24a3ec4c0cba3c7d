"""Client-side replay: templates built from recorded periods, and the check of each op against one.

A :class:`Template` is the last recorded period, with every argument given a role: a parameter
(a handle from before the period, the same in every period), a *local* (output ``j`` of step
``k`` of this instance, handle ``base + offset[k] + j``), a *carried* value (an output of the
previous instance: loop-carried state), an *input* (a CPU tensor uploaded in the period) or a
constant. During replay the model code still runs: each op is checked against the next step —
same op, same constants, the very handles the roles predict, inputs of the same metadata — and
gets its outputs from the template's metadata without a message. Any difference is a
divergence; the session then runs the matched prefix for real and records again, so results are
never wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rrto_lab import aten, backend, meta_cache, recorder
from rrto_lab.remote_tensor import RemoteTensor
from rrto_server.protocol import (
    CARRIED,
    INPUT,
    LOCAL,
    Handle,
    Payload,
    RemoteDevice,
    Slot,
    TensorMeta,
    tensor_to_frame,
    walk,
)

if TYPE_CHECKING:
    from rrto_lab.recorder import Recorder


@dataclass
class Step:
    func: torch._ops.OpOverload
    name: str
    args: Any  # spec tree: Handle (parameter), Slot, RemoteDevice, constants
    kwargs: dict
    spec: Any  # outputs: TensorMeta / Alias tree (None for fetch and value steps)
    offset: int
    expect: list[TensorMeta]
    kind: str  # recorder.QUEUED or SYNC: outputs known; FETCH / VALUE: needs an answer
    checks: tuple = ()  # the compiled form of args (see _compile)
    kwarg_checks: tuple = ()
    aliases: bool = False  # whether an output is one of the inputs

    def __post_init__(self) -> None:
        self.checks = tuple(_compile(a, self) for a in self.args)
        self.kwarg_checks = tuple((k, _compile(v, self)) for k, v in self.kwargs.items())
        self.aliases = _has_alias(self.spec)


@dataclass
class Template:
    id: int
    steps: list[Step]
    key: tuple  # the fine tokens of the period: equal keys, same template
    n_outputs: int
    last_outputs: list[list[int]] = field(default_factory=list)  # for carried values

    @property
    def period(self) -> int:
        return len(self.steps)

    def wire(self) -> list[dict]:
        """The template as the server registers it (input metadata stays here, for checks)."""
        return [{"op": aten.op_name(s.func), "args": walk(s.args, _wire),
                 "kwargs": walk(s.kwargs, _wire), "off": s.offset, "expect": s.expect,
                 "fetch": s.kind == recorder.FETCH} for s in self.steps]


@dataclass(frozen=True)
class InputSpec:
    """A CPU tensor uploaded in the period: any data, this metadata."""

    meta: TensorMeta


def _wire(v: Any) -> Any:
    return Slot(INPUT) if isinstance(v, InputSpec) else v


def metas(spec: Any) -> list[TensorMeta]:
    """The new outputs' metadata of a result spec, in order."""
    found: list[TensorMeta] = []
    walk(spec, lambda v: found.append(v) if isinstance(v, TensorMeta) else None)
    return found


def last_outputs(rec: Recorder, period: int) -> list[list[int]]:
    """The handles made by each step of the last recorded period (what carried values use)."""
    begin = len(rec.records) - period
    return [list(rec.records[begin + k].outputs) for k in range(period)]


def build(rec: Recorder, period: int, template_id: int, key: tuple) -> Template | str:
    """The template of the last ``period`` records, or the reason there can be none."""
    n = len(rec)
    begin = n - period
    steps: list[Step] = []
    offset = 0
    for k in range(period):
        r = rec.records[begin - rec.first + k]
        if r.kind == recorder.DYNAMIC:
            return (f"step {k} ({r.name}) has output shapes that depend on values; "
                    "such a sequence is not replayed")

        def role(v: Any) -> Any:
            if isinstance(v, Handle):
                made = rec.producer.get(v.id)
                if made is not None and made[0] >= begin:
                    return Slot(LOCAL, made[0] - begin, made[1])
                if made is not None and made[0] >= begin - period:
                    return Slot(CARRIED, made[0] - (begin - period), made[1])
                return v
            if isinstance(v, Payload):
                return InputSpec(v.meta)
            return v

        args, kwargs = walk(r.args, role), walk(r.kwargs, role)
        expect = metas(r.spec)
        steps.append(Step(r.func, r.name, args, kwargs, r.spec, offset, expect, r.kind))
        offset += len(r.outputs)
    for step in steps:  # local references become offsets within an instance, once
        step.checks = tuple(_resolve_local(c, steps) for c in step.checks)
        step.kwarg_checks = tuple((k, _resolve_local(c, steps)) for k, c in step.kwarg_checks)
    if steps[-1].kind not in (recorder.FETCH, recorder.VALUE):
        return "the period does not end where data comes back to the notebook"
    return Template(template_id, steps, key, offset, last_outputs(rec, period))


class Instance:
    """One replay of a template: where its handles start, and what the server still needs."""

    def __init__(self, template: Template, base: int, prev: list[list[int]] | int | None):
        self.template = template
        self.base = base
        self.prev = prev  # the previous instance's outputs: a base, the recorded lists, or None
        self.cursor = 0  # the next step to match
        self.start = 0  # the first step not yet sent to the server
        self.inputs: list[tuple[TensorMeta, bytes]] = []
        self.carried: list[int] = []

    def carried_handle(self, step: int, out: int) -> int | None:
        if self.prev is None:
            return None
        if isinstance(self.prev, int):
            return self.prev + self.template.steps[step].offset + out
        return self.prev[step][out]

    def match(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
        """Whether the op is the next step; if so its inputs and carried handles are kept."""
        step = self.template.steps[self.cursor]
        if func is not step.func or len(args) != len(step.checks) \
                or len(kwargs) != len(step.kwarg_checks):
            return False
        mark = (len(self.inputs), len(self.carried))
        for actual, check in zip(args, step.checks):  # noqa: B905 (lengths checked above)
            if not self._check(actual, check):
                break
        else:
            for key, check in step.kwarg_checks:
                if key not in kwargs or not self._check(kwargs[key], check):
                    break
            else:
                return True
        del self.inputs[mark[0]:], self.carried[mark[1]:]
        return False

    def _check(self, actual: Any, check: tuple) -> bool:
        kind, value = check
        if kind is _LOCAL:
            return type(actual) is RemoteTensor and actual._rrto_handle == self.base + value
        if kind is _PARAM:
            return type(actual) is RemoteTensor and actual._rrto_handle == value
        if kind is _CONST:
            return type(actual) is type(value) and actual == value  # value is never nan
        return _match(actual, value, self)

    def outputs(self, args: tuple, kwargs: dict, make: Any) -> Any:
        """The outputs of the step just matched, made by ``make(handle, meta)``."""
        step = self.template.steps[self.cursor]
        inputs = aten.tensors(args, kwargs) if step.aliases else []
        return _outputs(step.spec, inputs, make, [self.base + step.offset])

    def segment(self, stop: int) -> dict:
        """The request body that runs steps ``start..stop`` (inputs as payload placeholders)."""
        return {"template": self.template.id, "base": self.base, "start": self.start,
                "stop": stop, "carried": self.carried}


_LOCAL, _PARAM, _CONST, _TREE = "local", "param", "const", "tree"


def _special(spec: Any) -> bool:
    if isinstance(spec, (Slot, Handle, InputSpec, RemoteDevice)):
        return True
    if isinstance(spec, (list, tuple)):
        return any(_special(s) for s in spec)
    if isinstance(spec, dict):
        return any(_special(s) for s in spec.values())
    return False


def _compile(spec: Any, step: Step) -> tuple[str, Any]:
    """A fast check for the common arguments: a handle, or a constant; a tree otherwise."""
    if isinstance(spec, Handle):
        return _PARAM, spec.id
    if isinstance(spec, Slot) and spec.kind == LOCAL:
        return _LOCAL, spec  # the offset is known once every step is built
    if not _special(spec) and not (isinstance(spec, float) and spec != spec):
        return _CONST, spec
    return _TREE, spec


def _resolve_local(check: tuple[str, Any], steps: list[Step]) -> tuple[str, Any]:
    if check[0] is _LOCAL:
        return _LOCAL, steps[check[1].step].offset + check[1].out
    return check


def _has_alias(spec: Any) -> bool:
    if isinstance(spec, meta_cache.Alias):
        return True
    return isinstance(spec, (list, tuple)) and any(_has_alias(s) for s in spec)


def _outputs(spec: Any, inputs: list[torch.Tensor], make: Any, handle: list[int]) -> Any:
    if isinstance(spec, meta_cache.Alias):
        return inputs[spec.index]
    if isinstance(spec, TensorMeta):
        handle[0] += 1
        return make(handle[0] - 1, spec)
    return type(spec)(_outputs(x, inputs, make, handle) for x in spec)


def _match(actual: Any, spec: Any, inst: Instance) -> bool:
    if isinstance(spec, Slot) or isinstance(spec, Handle):
        if not isinstance(actual, RemoteTensor):
            return False
        h = actual._rrto_handle
        if isinstance(spec, Handle):
            return h == spec.id
        if spec.kind == LOCAL:
            return h == inst.base + inst.template.steps[spec.step].offset + spec.out
        if h != inst.carried_handle(spec.step, spec.out):
            return False
        inst.carried.append(h)
        return True
    if isinstance(spec, InputSpec):
        if not isinstance(actual, torch.Tensor) or isinstance(actual, RemoteTensor):
            return False
        meta, frame = tensor_to_frame(actual)
        if meta != spec.meta:
            return False
        inst.inputs.append((meta, bytes(frame)))
        return True
    if isinstance(spec, RemoteDevice):
        return isinstance(actual, torch.device) and actual.type in ("cuda", backend.NAME)
    if isinstance(spec, (list, tuple)):
        return (isinstance(actual, (list, tuple)) and len(actual) == len(spec)
                and all(_match(a, s, inst) for a, s in zip(actual, spec, strict=True)))
    if isinstance(spec, dict):
        return (isinstance(actual, dict) and actual.keys() == spec.keys()
                and all(_match(actual[k], s, inst) for k, s in spec.items()))
    if isinstance(actual, torch.Tensor):
        return False
    if type(actual) is not type(spec):
        return False
    return actual == spec or (actual != actual and spec != spec)  # nan equals nan here
