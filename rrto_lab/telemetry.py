"""Telemetry: what every view reads — session totals and one row per inference.

Per op, :attr:`Telemetry.trace` keeps (index, op, phase) for the newest ``keep`` ops. A row is
one *inference*: before a template exists, the segment of ops between two sync points
(a sync point is where the notebook needs data back: ``.cpu()``, ``.item()``, a data-dependent
op); once replay runs, one template instance. The session calls :meth:`Telemetry.op` per
intercepted op, :meth:`Telemetry.round_trip` per request, and :meth:`Telemetry.close_row` at
each boundary. Views (magics, dashboards) read :attr:`rows` and :meth:`totals`; nothing here
talks to the server.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

PHASES = ("rpc", "async", "record", "replay", "fallback")


@dataclass
class InferenceRow:
    """One inference as the session saw it."""

    index: int
    phase: str
    ops: int = 0
    rpcs: int = 0
    messages: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    latency_s: float = 0.0
    client_cpu_s: float = 0.0
    server_s: float = 0.0  # time the server spent on this inference's requests

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Telemetry:
    """Counters for the open row, the closed rows (the newest ``keep``), and session totals."""

    def __init__(self, keep: int = 10_000) -> None:
        self.rows: deque[InferenceRow] = deque(maxlen=keep)
        self.trace: deque[tuple[int, str, str]] = deque(maxlen=keep)  # (index, op, phase)
        self.ops = 0
        self.rpcs = 0
        self._index = 0
        self._open: InferenceRow | None = None
        self._wall0 = 0.0
        self._cpu0 = 0.0

    def _row(self, phase: str) -> InferenceRow:
        if self._open is None:
            self._open = InferenceRow(self._index, phase)
            self._wall0 = time.perf_counter()
            self._cpu0 = time.process_time()
        return self._open

    def op(self, phase: str, name: str) -> None:
        self.trace.append((self.ops, name, phase))
        self.ops += 1
        row = self._row(phase)
        row.ops += 1
        if phase == "fallback" or row.phase == "fallback":
            row.phase = "fallback"
        else:
            row.phase = phase

    def round_trip(self, sent: int, received: int, server_s: float, phase: str) -> None:
        self.rpcs += 1
        row = self._row(phase)
        row.rpcs += 1
        row.messages += 1
        row.bytes_sent += sent
        row.bytes_received += received
        row.server_s += server_s

    def close_row(self) -> InferenceRow | None:
        row, self._open = self._open, None
        if row is None or row.ops == 0:
            return None
        row.latency_s = time.perf_counter() - self._wall0
        row.client_cpu_s = time.process_time() - self._cpu0
        self.rows.append(row)
        self._index += 1
        return row

    def reset(self) -> None:
        self.rows.clear()
        self.trace.clear()
        self._open = None
        self._index = 0
        self.ops = self.rpcs = 0
