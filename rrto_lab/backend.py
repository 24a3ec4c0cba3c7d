"""The PrivateUse1 backend that remote tensors live on in C++ (named ``rgpu``).

PyTorch needs a real backend behind a tensor subclass for autograd to work on a CPU-only build
(see FEASIBILITY.md: a C++ ``cuda`` device kills the process at the first backward). The
registration is done once per process, on first activation, and cannot be undone; while no
session is active the backend reports itself unavailable, and its RNG functions act on nothing,
so ``torch.random.fork_rng`` and friends keep working for plain CPU code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

NAME = "rgpu"
DEVICE: torch.device  # torch.device("rgpu", 0), once registered

# The active session's answers, set by the interception layer; None while inactive.
_answer: Callable[[str, Any], Any] | None = None


class _BackendModule:
    """``torch.rgpu``: what PyTorch's generic device code calls on a registered backend."""

    @staticmethod
    def is_available() -> bool:
        return _answer is not None

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1 if _answer is not None else 0

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        if _answer is not None:
            _answer("manual_seed", int(seed))

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        if _answer is None:
            return torch.empty(0, dtype=torch.uint8)
        return _answer("get_rng_state", None)

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        if _answer is not None and state.numel():
            _answer("set_rng_state", state)

    @staticmethod
    def get_amp_supported_dtype() -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return _answer is not None

    def has_primary_context(self, dev_id: int) -> bool:
        return True

    def is_built(self) -> bool:
        return True


_registered = False


def ensure_registered() -> None:
    """Register the ``rgpu`` backend with PyTorch (once per process)."""
    global _registered, DEVICE
    if _registered:
        return
    current = torch._C._get_privateuse1_backend_name()
    if current not in ("privateuseone", NAME):
        raise RuntimeError(
            f"rrto needs PyTorch's PrivateUse1 backend, but it is already taken by {current!r}")
    if current != NAME:
        _setup_privateuseone_for_python_backend(
            rename=NAME, backend_module=_BackendModule(), hook=_Hooks())
    DEVICE = torch.device(NAME, 0)
    _registered = True


def set_answer(answer: Callable[[str, Any], Any] | None) -> None:
    global _answer
    _answer = answer
