"""The server's device as clients see it: properties, synchronization, RNG and timing events.

What a notebook asks of ``torch.cuda`` (device name, capability, ``manual_seed``, ``Event``) is
answered here from the real device: CUDA when the server has one, else the CPU. Timing events are
real CUDA events on a GPU and host clocks (after the ops before them have run) on the CPU.
"""

from __future__ import annotations

import os
import platform
import time
from collections import OrderedDict
from typing import Any

import torch


def pick_device(spec: str) -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: this machine's torch sees no CUDA device")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    return device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def describe(device: torch.device) -> dict[str, Any]:
    """What ``torch.cuda.get_device_properties`` and friends report for ``device``."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda", "index": device.index, "name": p.name, "major": p.major,
            "minor": p.minor, "total_memory": p.total_memory,
            "multi_processor_count": p.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda,
        }
    return {
        "type": "cpu", "index": 0, "name": f"CPU ({_cpu_name()}, {os.cpu_count()} cores)",
        "major": 0, "minor": 0,
        "total_memory": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "multi_processor_count": os.cpu_count() or 1,
        "torch": torch.__version__, "cuda": None,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MAX_EVENTS = 4096


class Events:
    """Timing events of one session, by the id the client gave them (the newest MAX_EVENTS)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._events: OrderedDict[int, Any] = OrderedDict()

    def record(self, event_id: int) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
        else:
            event = time.perf_counter()
        self._events[event_id] = event
        if len(self._events) > MAX_EVENTS:
            self._events.popitem(last=False)

    def elapsed_ms(self, start: int, end: int) -> float:
        try:
            a, b = self._events[start], self._events[end]
        except KeyError:
            raise ValueError("elapsed_time needs both events to have been recorded") from None
        if self.device.type == "cuda":
            b.synchronize()
            return float(a.elapsed_time(b))
        return (b - a) * 1000.0

    def clear(self) -> None:
        self._events.clear()


def manual_seed(device: torch.device, seed: int) -> None:
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def get_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state.clone(), device)
    else:
        torch.set_rng_state(state.clone())
