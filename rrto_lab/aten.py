"""Small facts about ATen calls that several modules need: names, tensor arguments, returns."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from rrto_lab.errors import RrtoError

aten = torch.ops.aten
RESIZES = (aten.resize_.default, aten.resize_as_.default)


@cache
def op_name(func: torch._ops.OpOverload) -> str:
    """The wire name of an ATen overload: ``add.Tensor``, ``relu`` (for ``.default``)."""
    schema = func._schema
    if schema.name.startswith("aten::"):
        name = schema.name[len("aten::"):]
        return f"{name}.{schema.overload_name}" if schema.overload_name else name
    raise RrtoError(f"{schema.name} is not an ATen operator; rrto only forwards torch.ops.aten "
                    "ops (custom operators need to run on the CPU)")


@cache
def aliases(func: torch._ops.OpOverload) -> bool:
    """Whether an output may alias an input (views, in-place and out= ops): only those need
    ``return_and_correct_aliasing``."""
    schema = func._schema
    return any(a.alias_info is not None for a in (*schema.arguments, *schema.returns))


def tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
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


def as_returns(func: torch._ops.OpOverload, out: Any) -> Any:
    """msgpack has no tuples: a multi-output op's list of results becomes a tuple again."""
    if isinstance(out, list) and len(func._schema.returns) > 1:
        return tuple(out)
    return out


def resized(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> torch.Tensor:
    """Give a wrapper the shape the server's resize_ gave the real tensor.

    ``return_and_correct_aliasing`` would rerun resize_ on the wrapper under meta dispatch,
    which trips an internal assert; the result is fully determined by the arguments anyway.
    """
    t = args[0]
    size = args[1] if func is aten.resize_.default else args[1].shape
    memory_format = kwargs.get("memory_format") or (args[2] if len(args) > 2 else None)
    stride = torch.empty(size, device="meta", memory_format=memory_format
                         or torch.contiguous_format).stride()
    set_meta(t, size, stride, t.storage_offset())
    return t


def set_meta(t: torch.Tensor, size: Any, stride: Any, offset: int) -> None:
    """Change a wrapper's shape, strides and offset without dispatching anywhere."""
    with torch.utils._mode_utils.no_dispatch():
        meta_in_tls = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            aten.as_strided_.default(t, size, stride, offset)
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta_in_tls)


@cache
def out_arguments(func: torch._ops.OpOverload) -> tuple[str, ...]:
    """The names of an op's ``out=`` arguments (which the op may resize)."""
    return tuple(a.name for a in func._schema.arguments if a.is_out)


def resize_outs(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> None:
    """Give ``out=`` wrappers the shape the op gave the real tensors (it may resize them).

    The op runs once more on meta copies of its arguments, which computes exactly that; an op
    whose meta kernel cannot say (data-dependent shapes) keeps the metadata it had.
    """
    from rrto_lab.meta_cache import _to_meta

    margs = _to_meta(args)
    mkwargs = {k: _to_meta(v) for k, v in kwargs.items()}
    try:
        with torch.utils._mode_utils.no_dispatch():
            func(*margs, **mkwargs)
    except Exception:
        return
    for name in out_arguments(func):
        real, meta = kwargs.get(name), mkwargs.get(name)
        for r, m in zip(*((x if isinstance(x, (list, tuple)) else [x]) for x in (real, meta)),
                        strict=False):
            if isinstance(r, torch.Tensor) and (r.shape, r.stride()) != (m.shape, m.stride()):
                set_meta(r, m.shape, m.stride(), m.storage_offset())


# Composites sent whole: the server's device has a fused kernel for them.
FUSED = (aten.scaled_dot_product_attention.default,)


@cache
def decomposes(func: torch._ops.OpOverload) -> bool:
    """Whether the op is a composite that runs as other ops (it reached us below autograd)."""
    return func not in FUSED and torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), "CompositeImplicitAutograd")


@cache
def python_composite(func: torch._ops.OpOverload) -> bool:
    """A non-ATen op with a kernel of its own that only calls other ops (a custom op)."""
    return func.namespace != "aten" and torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), "CompositeExplicitAutograd")


@dataclass(frozen=True)
class Traits:
    """What the dispatch path asks of an op, worked out once per op."""

    name: str  # the wire name (op_name), or "" for a non-ATen op
    decomposes: bool
    python_composite: bool
    resize: bool
    outs: tuple[str, ...]
    aliases: bool


_traits: dict[int, Traits] = {}


def traits(func: torch._ops.OpOverload) -> Traits:
    """The op's :class:`Traits` (keyed by identity: OpOverload hashes in Python, slowly)."""
    found = _traits.get(id(func))
    if found is None:
        found = _traits[id(func)] = Traits(
            op_name(func) if func.namespace == "aten" else "", decomposes(func),
            python_composite(func), func in RESIZES, out_arguments(func), aliases(func))
    return found
