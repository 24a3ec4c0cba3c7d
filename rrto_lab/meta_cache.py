"""Output metadata of ops, learned from the server, so later calls need not wait for it.

Invariant: an entry exists only for an op whose output metadata is a function of its inputs'
metadata and its non-tensor arguments (checked once per key by running the op on ``meta``
tensors: a data-dependent op such as ``nonzero`` or a boolean-mask index raises there), and the
entry is the *server's* answer for that exact key, never a meta kernel's guess (meta kernels
disagree with real ones for a few ops, e.g. ``native_batch_norm`` in eval). So a hit predicts
exactly what the server will produce; the server still checks each prediction it is sent.

A key is the op, each tensor argument's (shape, stride, offset, dtype, and whether it is remote),
every other argument, and the default dtype. A value is the result tree with each tensor as its
:class:`TensorMeta` (a new output) or ``Alias(k)`` (the k-th tensor argument itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rrto_server.protocol import TensorMeta


@dataclass(frozen=True)
class Alias:
    """An output that is the op's k-th tensor argument (in-place and ``out=`` ops)."""

    index: int


class Unpredictable(Exception):
    """This call's outputs cannot be known before the server runs it."""


def _key_leaf(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (v.is_cuda, v.dtype, tuple(v.shape), v.stride(), v.storage_offset())
    if isinstance(v, (list, tuple)):
        return tuple(_key_leaf(x) for x in v)
    if isinstance(v, float) and v != v:
        return "nan"  # nan != nan would make the key never match
    return v


def key_of(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple | None:
    """The cache key of a call, or None when an argument is not hashable."""
    key = (func, _key_leaf(args), tuple((k, _key_leaf(v)) for k, v in kwargs.items()),
           torch.get_default_dtype())
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _to_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        span = v.storage_offset() + 1 + sum((s - 1) * st for s, st in zip(v.shape, v.stride(),
                                                                           strict=True))
        if v.numel() == 0:
            span = v.storage_offset()
        base = torch.empty(max(span, 0), dtype=v.dtype, device="meta")
        return base.as_strided(v.shape, v.stride(), v.storage_offset())
    if isinstance(v, torch.device):
        return torch.device("meta")
    if isinstance(v, (list, tuple)):
        return type(v)(_to_meta(x) for x in v)
    return v


def data_dependent(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    """Whether the op's output metadata depends on tensor *values* (it fails on meta tensors)."""
    try:
        with torch.utils._mode_utils.no_dispatch(), torch.no_grad():
            func(*_to_meta(args), **{k: _to_meta(v) for k, v in kwargs.items()})
    except Exception:
        return True
    return False


class MetaCache:
    """Learned output metadata, keyed by :func:`key_of`; bounded, oldest forgotten first."""

    def __init__(self, limit: int = 65536) -> None:
        self.limit = limit
        self._entries: dict[tuple, Any] = {}
        self._unpredictable: set[tuple] = set()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple | None) -> Any:
        if key is None:
            return None
        spec = self._entries.get(key)
        if spec is None:
            self.misses += 1
        else:
            self.hits += 1
        return spec

    def learn(self, key: tuple | None, func: torch._ops.OpOverload, args: tuple, kwargs: dict,
              spec: Any) -> bool:
        """Remember the server's answer ``spec`` for ``key``; False if the op is unpredictable
        (its output metadata depends on values, or its arguments cannot be a key)."""
        if key is None or key in self._unpredictable or spec is None:
            return False
        if key in self._entries:
            return True
        if data_dependent(func, args, kwargs):
            self._unpredictable.add(key)
            return False
        if len(self._entries) >= self.limit:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = spec
        return True


def spec_of(result: Any, inputs: list[torch.Tensor]) -> Any:
    """The cacheable form of a decoded result: metas and aliases; None if it holds a non-tensor."""
    try:
        return _spec(result, {id(t): i for i, t in enumerate(inputs)})
    except Unpredictable:
        return None


def _spec(v: Any, positions: dict[int, int]) -> Any:
    if isinstance(v, torch.Tensor):
        if id(v) in positions:
            return Alias(positions[id(v)])
        return TensorMeta(v.dtype, tuple(v.shape), tuple(v.stride()), v.storage_offset())
    if isinstance(v, (list, tuple)):
        return type(v)(_spec(x, positions) for x in v)
    raise Unpredictable
