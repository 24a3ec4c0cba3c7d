"""RemoteTensor: a tensor whose data lives on the rrto server and which says ``device='cuda:0'``.

In C++ it is a wrapper subclass on the ``rgpu`` (PrivateUse1) backend with no data of its own, so
autograd, views and in-place bookkeeping run in the notebook exactly as for a real tensor; every
ATen op on it reaches ``__torch_dispatch__`` and goes to its session. Python code sees a CUDA
tensor: ``.device``, ``.is_cuda`` and ``get_device()`` answer as on a GPU. The few Tensor methods
that read host memory directly (``tolist``, ``repr``, pickling) fetch the data once instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rrto_lab import backend
from rrto_server.protocol import TensorMeta

if TYPE_CHECKING:
    from rrto_lab.session import Session

CUDA = torch.device("cuda", 0)
# Wrappers own no memory; a large virtual storage lets resize_ and out= growth pass C++ checks.
_VIRTUAL_STORAGE_BYTES = 1 << 48


class RemoteTensor(torch.Tensor):
    """A handle to a tensor on the rrto server, on the remote ``cuda:0`` device."""

    _rrto_session: Session
    _rrto_handle: int

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, session: Session, handle: int, meta: TensorMeta,
                requires_grad: bool = False) -> RemoteTensor:
        t = torch.Tensor._make_wrapper_subclass(
            cls, meta.shape, strides=meta.stride, storage_offset=meta.offset, dtype=meta.dtype,
            device=backend.DEVICE, requires_grad=requires_grad,
            storage_size=_VIRTUAL_STORAGE_BYTES,
        )
        t._rrto_session = session
        t._rrto_handle = handle
        return t

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        return session_of(args, kwargs).dispatch(func, args, kwargs or {})

    # -- what Python code asks of a CUDA tensor ------------------------------------------------
    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def get_device(self) -> int:
        return 0

    # -- host-memory readers: fetch once -------------------------------------------------------
    def tolist(self) -> Any:
        return self.detach().cpu().tolist()

    def numpy(self, *, force: bool = False) -> Any:
        if force:
            return self.detach().cpu().numpy()
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to "
                        "copy the tensor to host memory first.")

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        text = repr(self.detach().cpu())
        cut = text.rfind("]") + 1 if "]" in text else len("tensor(")
        at = text.find(", ", cut)
        at = len(text) - 1 if at < 0 else at
        suffix = f", device='{CUDA}'"
        tail = text[at:-1]
        if self.grad_fn is not None:
            tail += f", grad_fn=<{type(self.grad_fn).__name__}>"
        elif self.requires_grad:
            tail += ", requires_grad=True"
        return text[:at] + suffix + tail + ")"

    def __format__(self, spec: str) -> str:
        if self.dim() == 0:
            return self.item().__format__(spec)
        return object.__format__(self, spec)

    def __reduce_ex__(self, proto: int) -> Any:
        """Pickle (and ``torch.save``) the data as a CPU tensor: loadable without rrto."""
        cpu = self.detach().cpu()
        if getattr(self, "_is_param", False):
            return torch.nn.Parameter(cpu, self.requires_grad).__reduce_ex__(proto)
        if self.requires_grad and self.is_leaf:
            cpu.requires_grad_(True)
        return cpu.__reduce_ex__(proto)

    def __deepcopy__(self, memo: dict) -> RemoteTensor:
        with torch.no_grad():
            new = self.clone()
        if self.is_leaf and self.requires_grad:
            new.requires_grad_(True)
        if getattr(self, "_is_param", False):
            new._is_param = True
        memo[id(self)] = new
        return new

    def __del__(self) -> None:
        session = self.__dict__.get("_rrto_session")
        if session is not None:
            session.release(self._rrto_handle)


def session_of(args: Any, kwargs: Any) -> Session:
    """The session of the first remote tensor among an op's arguments."""
    for a in _flat(args):
        if isinstance(a, RemoteTensor):
            return a._rrto_session
    for a in _flat(kwargs.values() if kwargs else ()):
        if isinstance(a, RemoteTensor):
            return a._rrto_session
    raise RuntimeError("an rgpu op without any remote tensor argument")


def _flat(values: Any):  # noqa: ANN202
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v
