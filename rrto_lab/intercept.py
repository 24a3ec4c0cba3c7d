"""Activation: the exact set of changes to torch that make ``cuda`` mean "the rrto server".

Invariant: :func:`install` records every attribute it replaces and :func:`uninstall` puts each one
back (or deletes it, where it was inherited), so after leaving a session torch is as it was —
``torch.cuda.is_available()`` is False again on a CPU machine. No torch mode is pushed; plain CPU
code pays nothing. The pieces:

- ``torch.cuda.*`` answers from the server (:mod:`rrto_lab.cuda_api`);
- ``Tensor.to`` / ``Tensor.cuda`` map ``cuda`` and ``cuda:0`` to the ``rgpu`` backend, and upload a
  CPU tensor in one request when no gradient needs to flow through the copy;
- ``torch.tensor`` / ``as_tensor`` / ``asarray`` with a ``cuda`` device build on the CPU and
  upload (their C++ path would take a CUDA device guard, which a CPU build does not have);
- Python fallback kernels on the ``CUDA`` and ``PrivateUse1`` dispatch keys catch factories
  (``torch.randn(..., device="cuda")``) and the allocations inside host-to-device copies;
- ``nn.Module._apply`` swaps parameters instead of assigning ``.data`` (which drops subclasses);
- ``torch.autocast("cuda")`` also enables autocast for ``rgpu`` (:mod:`rrto_lab.autocast`);
- attention (``scaled_dot_product_attention``) goes to the server as one op when no gradient
  flows through it, so a GPU server runs its fused kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rrto_lab import autocast, backend
from rrto_lab.cuda_api import RemoteCuda
from rrto_lab.errors import RrtoError

if TYPE_CHECKING:
    from rrto_lab.session import Session

_MISSING = object()


class _Activation:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.saved: list[tuple[Any, str, Any]] = []
        self.library: torch.library.Library | None = None
        self.aten_library: torch.library.Library | None = None
        self.swap_before = torch.__future__.get_swap_module_params_on_conversion()

    def patch(self, owner: Any, name: str, value: Any) -> None:
        self.saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def restore(self) -> None:
        for owner, name, old in reversed(self.saved):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self.saved.clear()


_current: _Activation | None = None


def active_session() -> Session | None:
    return _current.session if _current is not None else None


def install(session: Session) -> None:
    """Make ``cuda`` in this process mean ``session``'s server."""
    global _current
    if _current is not None:
        if _current.session is session:
            return
        raise RrtoError("another rrto session is active in this process; deactivate it first")
    backend.ensure_registered()
    act = _Activation(session)
    try:
        for name, value in RemoteCuda(session).functions().items():
            act.patch(torch.cuda, name, value)
        act.patch(torch.Tensor, "to", _make_to(session))
        act.patch(torch.Tensor, "cuda", _tensor_cuda)
        act.patch(torch.Tensor, "pin_memory", _pin_memory)
        act.patch(torch.Tensor, "is_pinned", _is_pinned)
        for name in ("tensor", "as_tensor", "asarray"):
            act.patch(torch, name, _make_from_data(getattr(torch, name)))
        act.library = torch.library.Library("_", "IMPL")
        fallback = _make_fallback(session)
        act.library.fallback(fallback, "CUDA")
        act.library.fallback(fallback, "PrivateUse1")
        # C++ code that copies host data into a remote tensor with the Python key excluded
        # (list indices) reaches PrivateUse1; a fallback there trips an assert, a kernel works.
        act.aten_library = torch.library.Library("aten", "IMPL")
        act.aten_library.impl("copy_", _make_copy(session), "PrivateUse1")
        # Attention is one op on a GPU (flash / memory-efficient kernels); left alone, its
        # composite runs here and the server sees bmm + softmax + bmm.
        act.aten_library.impl("scaled_dot_product_attention", _fused_attention,
                              "AutogradPrivateUse1")
        autocast.install(act.patch)
        torch.__future__.set_swap_module_params_on_conversion(True)
        backend.set_answer(session.device_query)
    except BaseException:
        _undo(act)
        raise
    _current = act


def uninstall() -> None:
    """Put back everything :func:`install` changed."""
    global _current
    if _current is not None:
        act, _current = _current, None
        _undo(act)


def _undo(act: _Activation) -> None:
    backend.set_answer(None)
    torch.__future__.set_swap_module_params_on_conversion(act.swap_before)
    for library in (act.library, act.aten_library):
        if library is not None:
            library._destroy()
    autocast.uninstall()
    act.restore()


# -- Tensor methods while active ---------------------------------------------------------------
_original_to = torch.Tensor.to


def _remote_device(device: torch.device) -> torch.device:
    if device.index not in (None, 0):
        raise RrtoError(f"rrto offers one remote GPU, cuda:0; {device} does not exist")
    return backend.DEVICE


def _make_to(session: Session):  # noqa: ANN202
    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # _parse_to rejects `copy` in every form: the keyword, or the last positional argument of
        # to(device, dtype, non_blocking, copy), to(dtype, non_blocking, copy),
        # to(tensor, non_blocking, copy).
        copy = bool(kwargs.pop("copy", False))
        if len(args) == 4 or (len(args) == 3 and isinstance(args[0], (torch.dtype, torch.Tensor))):
            copy, args = bool(args[-1]), args[:-1]
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or device.type not in ("cuda", backend.NAME):
            return _original_to(self, *args, copy=copy, **kwargs)
        target = _remote_device(device)
        if isinstance(self, torch.nn.parameter.UninitializedTensorMixin):
            raise RrtoError("rrto cannot move an uninitialized (lazy) parameter to the remote "
                            "GPU: run the model once on a sample input before .cuda(), or use "
                            "a layer with explicit sizes")
        if (self.device.type == "cpu" and not copy
                and not (self.requires_grad and torch.is_grad_enabled())):
            return session.upload(self, dtype, memory_format or torch.preserve_format)
        return _original_to(self, target, dtype, non_blocking, copy,
                            memory_format=memory_format or torch.preserve_format)

    return to


def _tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False,
                 memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    if isinstance(device, int):
        device = torch.device("cuda", device)
    target = torch.device("cuda") if device is None else torch.device(device)
    if target.type != "cuda":
        raise RuntimeError(f"Invalid device, must be cuda device, got {target}")
    return self.to(target, non_blocking=non_blocking, memory_format=memory_format)


def _cuda_target(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA device
    return torch.device(device).type in ("cuda", backend.NAME)


def _make_from_data(original: Any):  # noqa: ANN202
    def from_data(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if original is torch.as_tensor and len(args) >= 2:
            kwargs["device"], args = args[1], args[:1]
        device = kwargs.get("device")
        if not _cuda_target(device):
            return original(data, *args, **kwargs)
        kwargs.pop("device")
        requires_grad = kwargs.pop("requires_grad", False)
        kwargs.pop("pin_memory", None)
        target = torch.device("cuda", device) if isinstance(device, int) else device
        if isinstance(data, torch.Tensor) and data.is_cuda:
            t = data.to(dtype=kwargs.get("dtype") or (args[0] if args else None) or data.dtype)
        else:
            t = original(data, *args, **kwargs).to(target)
        return t.requires_grad_(True) if requires_grad else t

    return from_data


def _pin_memory(self: torch.Tensor, device: Any = None) -> torch.Tensor:
    """Pinned memory only speeds up real DMA; here the copy goes over the network anyway."""
    return self


def _is_pinned(self: torch.Tensor, device: Any = None) -> bool:
    return False


# -- dispatch-key fallbacks ------------------------------------------------------------------
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


def _fused_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Send attention as one op when no gradient flows through it (inference); with a
    gradient, run PyTorch's composite as usual, so autograd records its parts."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (*args, *kwargs.values())):
        return _SDPA.decompose(*args, **kwargs)
    with _BELOW_AUTOGRAD():
        return _SDPA(*args, **kwargs)


def _make_copy(session: Session):  # noqa: ANN202
    def copy_(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        return session.dispatch(torch.ops.aten.copy_.default, (self, src, non_blocking), {})

    return copy_


def _make_fallback(session: Session):  # noqa: ANN202
    def fallback(op: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
        return session.dispatch(op, args, kwargs)

    return fallback
