"""Transparency sweep: PyTorch's own OpInfo database, offloaded versus local.

For every OpInfo with float32 CPU samples (up to ``SAMPLES_PER_OP`` each), the op runs once on the
CPU sample and once on a remote copy of it under an active session; the outputs (and any input the
op mutated) come back with ``.cpu()`` and must match. A remote copy keeps the exact storage layout:
each distinct base storage is uploaded whole and every tensor of the sample is rebuilt on top of it
with ``as_strided``, so views, offsets and inputs sharing memory behave as they would on a GPU.

A failing sample is caught and counted, never fatal; the sweep asserts an overall pass rate and
prints the rate, the failing ops with their first error, and the ops left out by design
(``UNSUPPORTED``). Random ops (``RANDOM``) are compared by shape, dtype and device only. The sweep
runs in the default mode, ``rrto``, whose path includes the metadata cache and replay.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import expecttest  # noqa: F401,E402  (common_methods_invocations needs it; a test dependency)
import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.utils._pytree import tree_flatten

SAMPLES_PER_OP = 5
MIN_PASS_RATE = 0.97
DTYPE = torch.float32

# Ops that cannot work through rrto by design; excluded from the denominator and printed.
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(
        ("jiterator_unary", "jiterator_binary", "jiterator_4inputs_with_extra_args",
         "jiterator_binary_return_by_ref", "jiterator_2inputs_2outputs"),
        "torch.cuda.jiterator compiles CUDA C++ in the calling process, which has no CUDA runtime",
    ),
    **dict.fromkeys(
        ("sparse.sampled_addmm", "sparse.mm.reduce", "to_sparse"),
        "sparse layouts: remote tensors are strided only (the protocol sends dense storages)",
    ),
}

# Ops whose sample args hold tensors that stay on the host, as in PyTorch's own CUDA tests.
HOST_ARGS: dict[str, str] = {
    "tensor_split": "tensor_indices_or_sections must be a CPU tensor, on a real GPU too",
}

# Ops whose values are random or uninitialised memory: only shape, dtype and device are compared.
RANDOM = frozenset({
    "bernoulli", "cauchy", "exponential", "geometric", "log_normal", "multinomial", "normal",
    "normal.in_place", "normal.number_mean", "uniform", "rand_like", "randint", "randint_like",
    "randn", "randn_like", "nn.functional.dropout", "nn.functional.dropout2d",
    "nn.functional.dropout3d", "nn.functional.alpha_dropout",
    "nn.functional.feature_alpha_dropout.with_train", "nn.functional.rrelu",
    "nn.functional.fractional_max_pool2d", "nn.functional.fractional_max_pool3d",
    "svd_lowrank", "pca_lowrank",
    "empty", "empty_like", "empty_permuted", "empty_strided", "new_empty", "new_empty_strided",
})


def _full_name(op: Any) -> str:
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


class Mismatch(AssertionError):
    """The offloaded op ran but its result differs from the local one."""


# -- trees of arguments --------------------------------------------------------------------------
def _map(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """Rebuild lists, tuples (not ``torch.Size``) and dicts, applying ``fn`` to every leaf."""
    if isinstance(tree, list):
        return [_map(v, fn) for v in tree]
    if isinstance(tree, tuple) and not isinstance(tree, torch.Size):
        items = [_map(v, fn) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


def _tensors(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map(tree, lambda v: found.append(v) if isinstance(v, torch.Tensor) else None)
    return found


class Uploader:
    """Remote copies of one sample's tensors, each storage uploaded once and viewed as locally."""

    def __init__(self) -> None:
        self.bases: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.remote_of: dict[int, torch.Tensor] = {}  # id(local tensor) -> its remote copy

    def __call__(self, v: Any) -> Any:
        if isinstance(v, torch.device) and v.type == "cpu":
            return torch.device("cuda")
        if not isinstance(v, torch.Tensor):
            return v
        if id(v) in self.remote_of:
            return self.remote_of[id(v)]
        if v.layout != torch.strided:
            raise NotImplementedError(f"a {v.layout} tensor cannot be offloaded")
        t = v.detach()
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.dtype)
        base = self.bases.get(key) if key[0] else None
        if base is None:
            n = storage.nbytes() // t.element_size()
            base = t.as_strided((n,), (1,), 0).to("cuda")
            self.bases[key] = base
        remote = torch.as_strided(base, t.shape, t.stride(), t.storage_offset())
        if v.requires_grad:
            remote.requires_grad_(True)
        self.remote_of[id(v)] = remote
        return remote


def _offload_kwargs(kwargs: dict, upload: Uploader) -> dict:
    kwargs = _map(kwargs, upload)
    if kwargs.get("device") == "cpu":
        kwargs["device"] = "cuda"
    return kwargs


# -- comparison ----------------------------------------------------------------------------------
def _compare(remote: Any, local: Any, *, random: bool) -> None:
    remote_leaves, remote_spec = tree_flatten(remote)
    local_leaves, local_spec = tree_flatten(local)
    if remote_spec != local_spec:
        raise Mismatch(f"result structure differs: remote {remote_spec}, local {local_spec}")
    for i, (r, e) in enumerate(zip(remote_leaves, local_leaves, strict=True)):
        where = f"output {i}: "
        if isinstance(e, torch.Tensor):
            if not isinstance(r, torch.Tensor):
                raise Mismatch(f"{where}remote gave a {type(r).__name__}, local a tensor")
            if e.device.type == "cpu" and r.device.type != "cuda":
                raise Mismatch(f"{where}remote output is on {r.device}, not cuda")
            if (r.shape, r.dtype) != (e.shape, e.dtype):
                raise Mismatch(f"{where}remote {r.dtype}{list(r.shape)}, "
                               f"local {e.dtype}{list(e.shape)}")
            if not random:
                torch.testing.assert_close(r.detach().cpu(), e.detach(), equal_nan=True,
                                           check_device=False, msg=lambda m, w=where: w + m)
        elif isinstance(e, float) and isinstance(r, float):
            if not (r == e or (math.isnan(r) and math.isnan(e)) or random):
                torch.testing.assert_close(r, e, msg=lambda m, w=where: w + m)
        elif type(r) is not type(e) or (r != e and not random):
            raise Mismatch(f"{where}remote {r!r}, local {e!r}")


# -- one sample ----------------------------------------------------------------------------------
def _run_sample(op: Any, op_name: str, sample: Any) -> str:
    """``"pass"`` or ``"pass (both raise)"``; raises on a transparency failure."""
    upload = Uploader()
    remote_input = _map(sample.input, upload)
    remote_args = sample.args if op_name in HOST_ARGS else _map(sample.args, upload)
    remote_kwargs = _offload_kwargs(sample.kwargs, upload)

    local_tensors = _tensors((sample.input, sample.args, sample.kwargs))
    versions = [t._version for t in local_tensors]
    try:
        expected = op(sample.input, *sample.args, **sample.kwargs)
    except Exception:
        try:
            op(remote_input, *remote_args, **remote_kwargs)
        except Exception:
            return "pass (both raise)"
        raise Mismatch("the op raises locally but not when offloaded") from None
    actual = op(remote_input, *remote_args, **remote_kwargs)
    random = op_name in RANDOM
    _compare(actual, expected, random=random)
    for t, before in zip(local_tensors, versions, strict=True):  # what in-place ops mutated
        if t._version != before and id(t) in upload.remote_of:
            _compare(upload.remote_of[id(t)], t, random=random)
    return "pass"


@dataclass
class Results:
    passed: int = 0
    both_raise: int = 0
    failed: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    unsupported: Counter = field(default_factory=Counter)
    no_samples: dict[str, str] = field(default_factory=dict)
    ops: int = 0
    seconds: float = 0.0

    @property
    def counted(self) -> int:
        return self.passed + self.both_raise + sum(len(v) for v in self.failed.values())

    @property
    def rate(self) -> float:
        return (self.passed + self.both_raise) / max(self.counted, 1)

    def summary(self) -> str:
        failures = sum(len(v) for v in self.failed.values())
        lines = [
            f"OpInfo transparency sweep: {self.ops} ops, {self.counted} float32 samples, "
            f"{self.passed + self.both_raise} passed ({self.both_raise} raise both locally and "
            f"remotely), {failures} failed: pass rate {self.rate:.2%} "
            f"(needs {MIN_PASS_RATE:.0%}) in {self.seconds:.1f} s",
        ]
        if self.failed:
            lines.append("failing ops (samples failed: first error):")
            for name, errors in sorted(self.failed.items()):
                lines.append(f"  {name} ({len(errors)}): {errors[0]}")
        if self.unsupported:
            lines.append("known unsupported, not counted (samples: reason):")
            for name, n in sorted(self.unsupported.items()):
                lines.append(f"  {name} ({n}): {UNSUPPORTED[name]}")
        for name, error in sorted(self.no_samples.items()):
            lines.append(f"no samples from PyTorch for {name}: {error}")
        return "\n".join(lines)


def _error_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:240]


def sweep(samples_per_op: int = SAMPLES_PER_OP) -> Results:
    results = Results()
    start = time.perf_counter()
    for op in op_db:
        if DTYPE not in op.supported_dtypes("cpu"):
            continue
        name = _full_name(op)
        results.ops += 1
        try:
            samples = list(islice(op.sample_inputs("cpu", DTYPE), samples_per_op))
        except Exception as e:  # a broken sample generator is PyTorch's, not rrto's
            results.no_samples[name] = _error_line(e)
            continue
        for sample in samples:
            if name in UNSUPPORTED:
                results.unsupported[name] += 1
                continue
            try:
                torch.manual_seed(0)
                outcome = _run_sample(op, name, sample)
            except Exception as e:  # every failure is one sample's, counted and reported
                results.failed[name].append(_error_line(e))
                continue
            if outcome == "pass":
                results.passed += 1
            else:
                results.both_raise += 1
    results.seconds = time.perf_counter() - start
    return results


@pytest.mark.parametrize("session", ["rrto"], indirect=True)  # the default mode, the longest path
def test_opinfo_sweep(session):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = sweep()
    summary = results.summary()
    print(f"\n[mode {session.mode}, {session.stats()['templates']} replay templates] {summary}")
    assert torch.ones(3, device="cuda").sum().item() == 3.0, "the session broke during the sweep"
    assert results.counted > 2000, summary
    assert results.rate >= MIN_PASS_RATE, summary


# -- rrto bugs the sweep found, kept as regression tests ---------------------------------------
@pytest.mark.parametrize("session", ["rpc"], indirect=True)
def test_an_op_that_fails_to_answer_leaves_the_session_usable(session):
    try:
        torch.ones(3, device="cuda").to_sparse()
    except RuntimeError:
        pass  # sparse outputs are not supported; the session must survive the attempt
    assert torch.ones(2, device="cuda").sum().item() == 2.0


@pytest.mark.parametrize("session", ["rpc"], indirect=True)
def test_fetched_data_is_aligned(session):
    for n in (16, 100, 1000, 4096):
        t = torch.arange(n, dtype=torch.float64).cuda().cpu()
        assert t.data_ptr() % 16 == 0, f"{n} float64 fetched at address {t.data_ptr():#x}"
