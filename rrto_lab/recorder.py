"""The recorder: the operator stream of a session in mode ``rrto``, and the search over it.

Each intercepted op is kept as an :class:`OpRecord` (its wire form, the handles it made, what
kind of answer it needed) — no tensors, so recording holds no memory on either side. At a sync
point :meth:`Recorder.search` runs Operator Sequence Search in two steps: on op names alone
(level 1 finds the candidate period ``p``), then on fine tokens computed for that ``p``, with
periods aligned back from the end: a handle argument made in the same period or the one before
is named by *how far back* its producer ran (a period-local value or loop-carried state: the
same distance in every period), any other by its handle (a parameter: the same handle in every
period). CPU tensors are inputs, named by
their metadata; other arguments by value; outputs by their metadata.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from rrto_lab.sequence_search import SequenceResult, find_sequence
from rrto_server.protocol import Handle, Payload, RemoteDevice, walk

# What an op needed from the server:
QUEUED = "queued"    # outputs predicted, sent without waiting
SYNC = "sync"        # waited for; its tensor outputs' metadata is now known and cacheable
FETCH = "fetch"      # waited for; its outputs came back as CPU data (.cpu())
VALUE = "value"      # waited for; returned a value (.item(), bool(), equal)
DYNAMIC = "dynamic"  # waited for; output metadata depends on values (nonzero, masked index)


@dataclass
class OpRecord:
    """One intercepted op, as sent."""

    func: torch._ops.OpOverload
    args: Any  # wire form: Handle / Payload / constants
    kwargs: dict
    outputs: list[int]  # new handles, in result order
    spec: Any  # result tree: TensorMeta / Alias (meta_cache), or None for FETCH / VALUE
    kind: str

    @property
    def name(self) -> str:
        return self.func.__name__


class Recorder:
    """A bounded history of records, the producer of each handle, and the search."""

    def __init__(self, max_history: int = 20_000, min_repeats: int = 2) -> None:
        self.max_history = max_history
        self.min_repeats = min_repeats
        self.records: deque[OpRecord] = deque()
        self.first = 0  # absolute index of records[0]
        self.producer: dict[int, tuple[int, int]] = {}  # handle -> (op index, output position)
        self.last_result: SequenceResult | None = None

    def __len__(self) -> int:
        return self.first + len(self.records)

    def add(self, record: OpRecord) -> None:
        index = len(self)
        for j, handle in enumerate(record.outputs):
            self.producer[handle] = (index, j)
        self.records.append(record)
        if len(self.records) > self.max_history:
            old = self.records.popleft()
            self.first += 1
            for handle in old.outputs:
                self.producer.pop(handle, None)

    def clear(self) -> None:
        self.first = len(self)
        self.records.clear()
        self.producer.clear()

    def search(self) -> SequenceResult:
        """Search the history, which ends at a sync point (see the module docstring)."""
        coarse = [r.name for r in self.records]
        level1 = find_sequence(coarse, min_repeats=self.min_repeats, min_period=2)
        if not level1.found:
            self.last_result = level1
            return level1
        fine = [self.fine_token(i, level1.period) for i in range(len(coarse))]
        self.last_result = find_sequence(coarse, fine, min_repeats=self.min_repeats,
                                         min_period=2)
        return self.last_result

    def fine_token(self, i: int, period: int) -> tuple:
        """The fine token of ``records[i]`` for a candidate ``period`` (see the module doc)."""
        record = self.records[i]
        at = self.first + i
        n = len(self)
        begin = n - period * ((n - at - 1) // period + 1)  # start of the period holding op i

        def role(v: Any) -> Any:
            if isinstance(v, Handle):
                made = self.producer.get(v.id)
                if made is not None and made[0] >= begin - period:
                    return ("d", at - made[0], made[1])  # local or carried: same in each period
                return ("h", v.id)  # made before the previous period: a parameter
            if isinstance(v, Payload):
                return ("in", v.meta)
            if isinstance(v, RemoteDevice):
                return "remote"
            return v

        kind = QUEUED if record.kind == SYNC else record.kind  # a first call waits; same op
        return (record.name, _frozen(walk(record.args, role)),
                _frozen(walk(record.kwargs, role)), _frozen(record.spec), kind)


def _frozen(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, _frozen(x)) for k, x in v.items())
    if isinstance(v, float) and v != v:
        return "nan"
    return v
