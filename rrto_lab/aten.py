"""Small facts about ATen calls that several modules need: names, tensor arguments, returns."""

from __future__ import annotations

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
    with torch.utils._mode_utils.no_dispatch():
        meta_in_tls = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            aten.as_strided_.default(t, size, stride, t.storage_offset())
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta_in_tls)
    return t
