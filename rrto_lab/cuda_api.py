"""``torch.cuda`` while a session is active: answers about the server's real device.

Everything that describes the device (name, capability, properties, memory) comes from the
server; timing events are recorded on the server, in order with the ops around them. The server
runs a session's ops in order on one stream, so streams here are all that one stream: work
submitted on any of them is correct, and synchronizing any of them waits for all.
"""

from __future__ import annotations

import gc
from collections import namedtuple
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rrto_lab.session import Session

DeviceProperties = namedtuple(
    "DeviceProperties",
    "name major minor total_memory multi_processor_count is_remote",
)


class RemoteCuda:
    """The replacement ``torch.cuda`` functions for one session."""

    def __init__(self, session: Session) -> None:
        self.session = session
        info = session.device_info
        self.name = f"{info['name']} (remote via rrto)"
        self.properties = DeviceProperties(
            self.name, info["major"], info["minor"], info["total_memory"],
            info["multi_processor_count"], True)

    def functions(self) -> dict[str, Any]:
        s = self.session
        query = s.device_query
        nothing = _nothing
        event_cls = _event_class(s)
        stream_cls = _stream_class(s, event_cls)

        def memory(key: str):  # noqa: ANN202
            return lambda device=None: query("memory")[key]

        def manual_seed(seed: int) -> None:
            query("manual_seed", seed)

        return {
            "_lazy_init": nothing,
            "init": nothing,
            "is_available": lambda: True,
            "is_initialized": lambda: True,
            "device_count": lambda: 1,
            "current_device": lambda: 0,
            "set_device": _set_device,
            "device": _DeviceContext,
            "get_device_name": lambda device=None: self.name,
            "get_device_properties": lambda device=None: self.properties,
            "get_device_capability": lambda device=None: (self.properties.major,
                                                          self.properties.minor),
            "is_bf16_supported": lambda including_emulation=True: True,
            "synchronize": lambda device=None: query("synchronize"),
            "manual_seed": manual_seed,
            "manual_seed_all": manual_seed,
            "get_rng_state": lambda device="cuda": query("get_rng_state"),
            "set_rng_state": lambda state, device="cuda": query("set_rng_state", state),
            "get_rng_state_all": lambda: [query("get_rng_state")],
            "set_rng_state_all": lambda states: query("set_rng_state", states[0]),
            "memory_allocated": memory("allocated"),
            "max_memory_allocated": memory("peak"),
            "memory_reserved": memory("allocated"),
            "max_memory_reserved": memory("peak"),
            "reset_peak_memory_stats": lambda device=None: query("reset_peak"),
            "reset_max_memory_allocated": lambda device=None: query("reset_peak"),
            "empty_cache": self.empty_cache,
            "mem_get_info": lambda device=None: (
                self.properties.total_memory - query("memory")["allocated"],
                self.properties.total_memory),
            "Event": event_cls,
            "Stream": stream_cls,
            "stream": _StreamContext,
            "current_stream": lambda device=None: stream_cls(),
            "default_stream": lambda device=None: stream_cls(),
        }


    def empty_cache(self) -> None:
        """Collect dropped remote tensors (some sit in reference cycles) and free them now."""
        gc.collect()
        self.session.device_query("empty_cache")


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _set_device(device: Any) -> None:
    index = device.index if hasattr(device, "index") else device
    if index not in (None, 0, -1):
        raise RuntimeError(f"rrto offers one remote GPU, cuda:0; device {index} does not exist")


class _DeviceContext:
    """``with torch.cuda.device(0):`` — there is one remote device, so nothing changes."""

    def __init__(self, device: Any) -> None:
        _set_device(device)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _StreamContext:
    """``with torch.cuda.stream(s):`` — all streams are the session's one stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __enter__(self) -> Any:
        return self.stream

    def __exit__(self, *exc: object) -> None:
        return None


def _event_class(session: Session) -> type:
    class Event:
        """A timing event recorded on the server, in order with the session's ops."""

        def __init__(self, enable_timing: bool = False, blocking: bool = False,
                     interprocess: bool = False) -> None:
            self.enable_timing = enable_timing
            self.id = session.new_event_id()
            self.recorded = False

        def record(self, stream: Any = None) -> None:
            session.event("record", self.id)
            self.recorded = True

        def elapsed_time(self, end_event: Event) -> float:
            if not (self.enable_timing and end_event.enable_timing):
                raise RuntimeError("Both events must be created with argument "
                                   "'enable_timing=True'.")
            return session.event("elapsed", self.id, end_event.id)

        def synchronize(self) -> None:
            session.device_query("synchronize")

        def query(self) -> bool:
            return True

        def wait(self, stream: Any = None) -> None:
            return None

    return Event


def _stream_class(session: Session, event_cls: type) -> type:
    class Stream:
        """One of the session's streams; they are all the same in-order stream."""

        def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
            self.device = device
            self.priority = priority

        def synchronize(self) -> None:
            session.device_query("synchronize")

        def wait_stream(self, stream: Any) -> None:
            return None

        def wait_event(self, event: Any) -> None:
            return None

        def record_event(self, event: Any = None) -> Any:
            event = event or event_cls()
            event.record(self)
            return event

        def query(self) -> bool:
            return True

        def __enter__(self) -> Stream:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    return Stream

