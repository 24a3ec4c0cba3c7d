"""``torch.autocast("cuda")`` for remote tensors: CUDA's casting rules on the ``rgpu`` backend.

Autocast eligibility is decided by the C++ device, which for a remote tensor is ``rgpu``, and
PyTorch registers no autocast kernels for PrivateUse1: left alone, ``autocast("cuda")`` would
silently stay in float32. So, while a session is active, entering ``autocast("cuda")`` also
enables autocast for ``rgpu`` with the same dtype, and Python kernels on the
``AutocastPrivateUse1`` key apply CUDA's policy (the op lists of ATen's ``autocast_mode.cpp``):
matrix products and convolutions run in the low-precision dtype, numerically sensitive ops in
float32, mixed-type ops in the widest input type. The casts happen above autograd, as on a GPU,
so gradients flow back through them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rrto_lab import backend

# CUDA autocast policy (ATen autocast_mode.cpp), by ATen overload name.
LOWER_PRECISION = (
    "_convolution", "_convolution.deprecated", "conv1d", "conv2d", "conv3d", "conv_tbc",
    "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", "convolution",
    "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear",
    "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "scaled_dot_product_attention",
)
FLOAT32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
    "softplus", "layer_norm", "native_layer_norm", "group_norm", "frobenius_norm.dim",
    "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "softmax.int", "log_softmax.int", "cumprod", "cumsum", "prod", "prod.dim_int",
    "linalg_vector_norm", "linalg_matrix_norm", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d",
    "upsample_bicubic2d",
)
PROMOTE = (
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler",
    "index_put", "scatter_add", "tensordot",
)

_KEY = torch._C.DispatchKey.AutocastPrivateUse1
_libraries: list[torch.library.Library] = []
_original_enter = torch.autocast.__enter__
_original_exit = torch.autocast.__exit__


def _eligible(v: Any) -> bool:
    return (isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64
            and v.device.type == "cuda")


def _cast_all(values: Any, dtype: torch.dtype) -> Any:
    if isinstance(values, (list, tuple)):
        return type(values)(_cast_all(v, dtype) for v in values)
    return values.to(dtype) if _eligible(values) and values.dtype != dtype else values


def _widest(args: tuple, kwargs: dict) -> torch.dtype | None:
    widest = None
    for v in (*args, *kwargs.values()):
        if _eligible(v):
            widest = v.dtype if widest is None else torch.promote_types(widest, v.dtype)
    return widest


def _kernel(op: torch._ops.OpOverload, policy: str) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        if policy == "lower":
            dtype = torch.get_autocast_dtype(backend.NAME)
        elif policy == "fp32":
            dtype = torch.float32
        else:
            dtype = _widest(args, kwargs)
        if dtype is not None:
            args, kwargs = _cast_all(args, dtype), {k: _cast_all(v, dtype)
                                                    for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_KEY)):
            return op(*args, **kwargs)

    return kernel


def _resolve(name: str) -> torch._ops.OpOverload | None:
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)


def _enter(self: torch.autocast) -> Any:
    result = _original_enter(self)
    if self.device == "cuda":
        self._rrto_prev = (torch.is_autocast_enabled(backend.NAME),
                           torch.get_autocast_dtype(backend.NAME))
        torch.set_autocast_enabled(backend.NAME, self._enabled)
        torch.set_autocast_dtype(backend.NAME, self.fast_dtype)
    return result


def _exit(self: torch.autocast, *exc: Any) -> Any:
    prev = self.__dict__.pop("_rrto_prev", None)
    if prev is not None:
        torch.set_autocast_enabled(backend.NAME, prev[0])
        torch.set_autocast_dtype(backend.NAME, prev[1])
    return _original_exit(self, *exc)


def install(patch: Callable[[Any, str, Any], None]) -> None:
    """Register the kernels and hook ``torch.autocast``; ``patch`` records what it replaces."""
    # Ops without a policy pass straight through, as on every other autocast key.
    passthrough = torch.library.Library("_", "IMPL")
    passthrough.fallback(torch.library.fallthrough_kernel, "AutocastPrivateUse1")
    kernels = torch.library.Library("aten", "IMPL")
    _libraries.extend((passthrough, kernels))
    for policy, names in (("lower", LOWER_PRECISION), ("fp32", FLOAT32), ("promote", PROMOTE)):
        for name in names:
            op = _resolve(name)
            if op is not None:
                kernels.impl(name, _kernel(op, policy), "AutocastPrivateUse1")
    patch(torch.autocast, "__enter__", _enter)
    patch(torch.autocast, "__exit__", _exit)


def uninstall() -> None:
    while _libraries:
        _libraries.pop()._destroy()
