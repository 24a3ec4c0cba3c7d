"""Mode ``rrto``'s state machine: record, search at sync points, replay, diverge, record again.

The session hands every op it sends to :meth:`RecordReplay.record` and calls
:meth:`RecordReplay.sync_point` whenever data comes back to the notebook; before sending an op
it asks :meth:`RecordReplay.replay` whether the op is the next step of a template. Invariant:
every op the notebook issued runs on the server exactly once, in order — as a queued op, as a
replayed step, or as part of a segment of matched steps queued when replay stops (divergence,
or any other request that must see their effects) — so results are never wrong.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from rrto_lab import recorder, replay
from rrto_server.protocol import Payload, tensor_from_frame

if TYPE_CHECKING:
    from rrto_lab.session import Session

log = logging.getLogger("rrto_lab.record_replay")
NOT_REPLAYED = object()


class RecordReplay:
    """The recorder, the templates and the current replay instance of one session."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.recorder: recorder.Recorder | None = None  # only while mode rrto records
        self.templates: dict[tuple, replay.Template] = {}
        self.instance: replay.Instance | None = None
        self.notes: list[str] = []  # why a found sequence was not replayed
        self._ids = 0
        self._boundary = True  # the next op starts an inference (it follows a sync point)
        self._diverged = False

    def enable(self, on: bool) -> None:
        """Record (mode rrto) or not; a running instance ends, templates are kept."""
        self.instance = None
        self.recorder = recorder.Recorder() if on else None
        self._boundary, self._diverged = True, False

    def reset(self) -> None:
        """Forget templates and history."""
        self.templates.clear()
        self.notes.clear()
        self.enable(self.recorder is not None)

    def phase(self) -> str:
        if self._diverged:
            return "fallback"
        return "replay" if self.instance is not None else "record"

    def record(self, record: recorder.OpRecord) -> None:
        if self.recorder is not None:
            self.recorder.add(record)

    # -- at a sync point -----------------------------------------------------------------------
    def sync_point(self) -> None:
        """Search the history; if the last two periods are one template, start replaying it."""
        self._diverged = False
        rec = self.recorder
        if rec is None:
            return
        self._boundary = True
        result = rec.search()
        starts = result.period_starts
        if not result.found or starts[-1] - starts[-2] != result.period:
            return  # replay needs the last two periods back to back (carried values)
        n = len(rec.records)
        key = tuple(rec.fine_token(i, result.period) for i in range(n - result.period, n))
        template = self.templates.get(key)
        if template is None:
            self._ids += 1
            built = replay.build(rec, result.period, self._ids, key)
            if isinstance(built, str):
                self.notes.append(built)
                log.info("no replay: %s", built)
                return
            template = built
            self.session._request({"type": "template", "template": template.id,
                                   "steps": template.wire()})
            self.templates[key] = template
        else:
            template.last_outputs = replay.last_outputs(rec, result.period)
        self._start(template, template.last_outputs)

    def _start(self, template: replay.Template, prev: Any) -> replay.Instance:
        s = self.session
        self.instance = replay.Instance(template, s._next_handle, prev)
        s._next_handle += template.n_outputs
        if self.recorder is not None:
            self.recorder.clear()  # replayed ops are not recorded: the history restarts after
        return self.instance

    # -- per op --------------------------------------------------------------------------------
    def replay(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, name: str) -> Any:
        """The op's outputs from the current template, or NOT_REPLAYED (record it instead)."""
        inst = self.instance
        if inst is not None and not inst.match(func, args, kwargs):
            if inst.cursor > 0:
                self._diverge(inst)
                return NOT_REPLAYED
            self.instance = inst = None  # a new inference, but maybe of another template
            self._boundary = True
        if inst is None:
            if not (self._boundary and self.templates):
                self._boundary = False
                return NOT_REPLAYED
            self._boundary = False
            inst = self._enter(func, args, kwargs)
            if inst is None:
                return NOT_REPLAYED
        s = self.session
        s.telemetry.op("replay", name)
        step = inst.template.steps[inst.cursor]
        if step.kind in (recorder.FETCH, recorder.VALUE):
            out = self._request(inst, inst.cursor + 1)
        else:
            out = inst.outputs(args, kwargs, s._wrap)
        inst.cursor += 1
        if inst.cursor == inst.template.period:
            s.telemetry.close_row()
            self._start(inst.template, inst.base)
        return out

    def _enter(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict
               ) -> replay.Instance | None:
        """At a sync boundary, start a known template whose first step this op is."""
        for template in reversed(list(self.templates.values())):
            if replay.Instance(template, self.session._next_handle, None).match(func, args,
                                                                               kwargs):
                inst = self._start(template, None)
                inst.match(func, args, kwargs)  # again, to keep its inputs on this instance
                return inst
        return None

    def _diverge(self, inst: replay.Instance) -> None:
        """The op is not the template's next step: run the matched prefix, record again."""
        self.queue_unsent()
        self.instance = None
        self._diverged = True
        if self.recorder is not None:
            self.recorder.clear()

    # -- what goes to the server ---------------------------------------------------------------
    def unsent(self) -> bool:
        """Whether matched steps wait to be sent."""
        return self.instance is not None and self.instance.cursor > self.instance.start

    def queue_unsent(self) -> None:
        """Queue the matched, unsent steps so the next request runs them first."""
        if self.unsent():
            inst = self.instance
            self.session._pending_ops.append(self._segment(inst, inst.cursor))

    def _segment(self, inst: replay.Instance, stop: int) -> dict:
        body = inst.segment(stop)
        body["inputs"] = [self.session._frame(meta, data) for meta, data in inst.inputs]
        inst.inputs, inst.carried, inst.start = [], [], stop
        return body

    def _request(self, inst: replay.Instance, stop: int) -> Any:
        """Run the template up to and including a step whose answer the notebook needs."""
        reply, frames = self.session._request({"type": "replay", **self._segment(inst, stop)})
        result = reply["result"]
        if isinstance(result, Payload):
            return tensor_from_frame(result.meta, frames[result.frame])
        return result
