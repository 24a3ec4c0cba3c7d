"""Operator Sequence Search: find the operator sequence that one inference issues.

Pure (stdlib only); works on any hashable tokens. ``coarse`` tokens are op names; ``fine`` tokens
add shapes, dtypes, scalar args and argument roles, and refine them (equal fine, equal coarse).

Definition. The stream ``t[0:n]`` (fine tokens, or coarse ones if no fine are given) ends at a sync
point. An *explanation* is a period ``p >= min_period`` and ``r >= min_repeats`` non-overlapping
occurrences of the template ``T = t[n-p:n]``, the last being ``T`` itself: periods are counted back
from the end. A period is contiguous; every op outside the periods is noise: the init prefix and
the ops between two periods. It leaves ``p + (n - r*p)`` ops unexplained (template plus noise). The
result is the explanation leaving the fewest, then the one with the smallest ``p``; its periods are
chosen right-greedily (each is the latest occurrence ending before the next one starts), so
``start`` is well defined. Nothing is found when no explanation exists; with ``min_period=1`` that
is exactly when the last op occurs fewer than ``min_repeats`` times.

Trade-offs of this rule, on purpose: (1) a prefix ending with the tail ``T[k:]`` of a period counts
as one more occurrence of that shorter template when that explains as much (``r*k <= p`` for r
whole periods); cut histories at a period boundary (``SequenceSearch`` does). (2) Noise that recurs
identically in every gap joins a longer period when that explains more; one-off noise stays noise.
(3) An op inserted inside a period breaks it (its ops become noise; ``explain()`` says so) unless
the period's tail alone explains more.

Algorithm. On the reversed stream a Z-function, evaluated only where the last op recurs, tells for
each position i the longest suffix of the stream that also ends at ``n-i``: in linear time, every
occurrence of every template. As p grows, the right-greedy chain of occurrences changes only at a Z
value or at a gap between chained occurrences; between two such breakpoints the score ``(r-1)*p``
grows with p, so only breakpoints are candidates. Level 1 walks them on coarse tokens; level 2
re-walks, on fine tokens, only the coarse pieces whose score could beat the best so far (a fine
match is a coarse match, so the coarse score bounds the fine one). The walk stops once no larger p
can win: ``(r-1)*p <= min(n-p, farthest occurrence)``. Cost: one linear pass plus one chain walk
(``O(r log n)``) per candidate; realistic streams have a handful, a stream of one repeated op more.
Online (``SequenceSearch``): ``push`` is O(1); confirming the known sequence at the next sync point
is O(new ops); a fresh search is the pass above over at most ``max_history`` ops.
"""

from __future__ import annotations

import logging
import random
from bisect import bisect_left
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import cached_property

__all__ = [
    "Rejection", "SequenceResult", "SequenceSearch", "SyntheticStream", "find_sequence",
    "synthetic_stream",
]

log = logging.getLogger(__name__)
_MAX_TOKENS = 0x110000  # distinct tokens per level: each is encoded as one str code point


def _encode(tokens: Sequence[Hashable], table: dict[Hashable, str]) -> str:
    """Map tokens to one code point each (extending ``table``); equal tokens, equal code points."""
    new = [t for t in dict.fromkeys(tokens) if t not in table]
    if len(table) + len(new) > _MAX_TOKENS:
        raise ValueError(f"more than {_MAX_TOKENS} distinct tokens: bound the history "
                         "(max_history=...) or drop per-call values from the fine tokens")
    table.update(zip(new, map(chr, range(len(table), len(table) + len(new))), strict=True))
    return "".join(map(table.__getitem__, tokens))


def _common(s: str, a: int, b: int) -> int:
    """Length of the longest common prefix of ``s[a:]`` and ``s[b:]`` (b < a), by galloping."""
    limit, t = len(s) - a, 0
    while t < limit and t < 8:
        if s[a + t] != s[b + t]:
            return t
        t += 1
    step = 16
    while t < limit:
        w = min(step, limit - t)
        if s[a + t:a + t + w] == s[b + t:b + t + w]:
            t, step = t + w, step * 2
            continue
        lo, hi = 0, w  # s[..+lo] equal, s[..+hi] not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if s[a + t:a + t + mid] == s[b + t:b + t + mid]:
                lo = mid
            else:
                hi = mid
        return t + lo
    return t


def _sparse_z(s: str) -> tuple[list[int], list[int]]:
    """Z-function of ``s`` at the positions i >= 1 where ``s[i] == s[0]`` (elsewhere it is 0)."""
    if not s:
        return [], []
    c0, pos, zs = s[0], [], []
    zat = [0] * len(s)
    left = right = 0  # the Z-box s[left:right] == s[0:right-left]
    i = s.find(c0, 1)
    while i > 0:
        if i < right and zat[i - left] < right - i:
            z = zat[i - left]
        else:
            base = max(right - i, 0)
            z = base + _common(s, i + base, base)
            left, right = i, i + z
        pos.append(i)
        zs.append(z)
        zat[i] = z
        i = s.find(c0, i + 1)
    return pos, zs


class _Level:
    """Occurrences of every suffix of one token string: on the reversed string, an occurrence of
    the last p tokens ends at ``n - i`` iff ``z[i] >= p``. Positions with ``z < p`` are pruned as p
    grows (union-find "next alive"), so a chain walk costs O(its length * log)."""

    def __init__(self, s: str) -> None:
        self.n = len(s)
        self.pos, self.z = _sparse_z(s[::-1])
        m = len(self.pos)
        self._next = list(range(m + 1))
        self._order = sorted(range(m), key=self.z.__getitem__)
        self._cut = 0
        self._top = m - 1  # largest alive index

    def prune(self, p: int) -> None:
        order, z, nxt, k = self._order, self.z, self._next, self._cut
        while k < len(order) and z[order[k]] < p:
            nxt[order[k]] = order[k] + 1
            k += 1
        self._cut = k
        while self._top >= 0 and nxt[self._top] != self._top:
            self._top -= 1

    def reach(self) -> int:
        """The farthest alive occurrence (reversed coordinates); no chain spans more."""
        return self.pos[self._top] if self._top >= 0 else 0

    def _find(self, j: int) -> int:
        nxt, root = self._next, j
        while nxt[root] != root:
            root = nxt[root]
        while nxt[j] != root:
            nxt[j], j = root, nxt[j]
        return root

    def chain(self, p: int) -> tuple[list[int], int]:
        """Right-greedy occurrences of the last p tokens (reversed coordinates, 0 first), and the
        largest p' for which that same chain stays valid (its piece's right end)."""
        self.prune(p)
        pos, z, nxt, m = self.pos, self.z, self._next, len(self.pos)
        out, cur, right, k = [0], 0, self.n, 0
        while True:
            k = bisect_left(pos, cur + p, k)
            if nxt[k] != k:
                k = self._find(k)
            if k == m:
                return out, right
            i = pos[k]
            if z[k] < right:
                right = z[k]
            if i - cur < right:
                right = i - cur
            out.append(i)
            cur = i


@dataclass
class _Core:
    """What one search found, in reversed coordinates of a window of n ops."""

    n: int
    period: int = 0
    chain: tuple[int, ...] = ()
    level1: int = 0
    level2: int = 0
    score: int = 0
    candidates: tuple[tuple[int, list[int]], ...] = ()  # (period, coarse chain)


def _core(cstr: str, fstr: str, min_repeats: int, min_period: int) -> _Core:
    n = len(cstr)
    coarse = _Level(cstr)
    fine = coarse if fstr is cstr else _Level(fstr)
    core, cands, p, dead, coarse_best = _Core(n), [], min_period, False, 0
    while p <= n // min_repeats:
        chain_c, q = coarse.chain(p)
        core.level1 += 1
        if len(chain_c) < min_repeats:
            break
        score_c = (len(chain_c) - 1) * q
        if score_c > (coarse_best if dead else core.score):
            cands.append((q, chain_c))
        pf = p
        while not dead and score_c > core.score and pf <= q:  # level 2 inside the piece [p, q]
            chain_f, right_f = (chain_c, q) if fine is coarse and pf == p else fine.chain(pf)
            core.level2 += 1
            if len(chain_f) < min_repeats:  # nor at any larger p: level 1 goes on, to explain
                dead = True
                break
            qf = min(q, right_f)
            if (len(chain_f) - 1) * qf > core.score:
                core.score, core.period, core.chain = (len(chain_f) - 1) * qf, qf, tuple(chain_f)
            pf = qf + 1
        coarse_best = max(coarse_best, score_c)
        p = q + 1
        coarse.prune(p)
        if min(n - p, coarse.reach()) <= (coarse_best if dead else core.score):
            break
    core.candidates = tuple(cands)
    return core


@dataclass(frozen=True)
class Rejection:
    """A period that fits the op names (level 1) but not the fine tokens (level 2)."""

    period: int
    coarse_repeats: int
    fine_repeats: int
    reason: str


@dataclass(frozen=True, repr=False, eq=False)
class SequenceResult:
    """The explanation of one stream (see the module docstring). Indices are absolute: the first op
    of the searched window is ``offset``. When nothing is found: start -1, period 0, no noise."""

    found: bool
    start: int
    period: int
    repeats: int
    template: tuple[Hashable, ...]
    level1_candidates: int
    level2_checks: int
    n_ops: int
    offset: int = 0
    rejected: tuple[Rejection, ...] = ()
    notes: tuple[str, ...] = ()
    _starts: Sequence[int] = ()  # period starts, ascending; maybe a longer, shared append-only list
    _span: tuple[int, int] = (0, 0)  # the slice of _starts that belongs to this result

    @property
    def period_starts(self) -> tuple[int, ...]:
        return tuple(self._starts[self._span[0]:self._span[1]])

    @cached_property
    def noise(self) -> tuple[int, ...]:
        out: list[int] = []
        if self.found:
            prev = self.offset
            for s in self.period_starts:
                out.extend(range(prev, s))
                prev = s + self.period
        return tuple(out)

    @property
    def unexplained(self) -> int:
        """Ops left unexplained: template plus noise (everything when nothing is found)."""
        return self.period + self.n_ops - self.repeats * self.period if self.found else self.n_ops

    def explain(self) -> str:
        """What was found, what was rejected and why, in a few lines a person can read."""
        if self.found:
            init = self.start - self.offset
            starts = self.period_starts
            gaps = sum(b - a > self.period for a, b in zip(starts, starts[1:], strict=False))
            lines = [
                f"found: {self.repeats} periods of {self.period} ops, the first at op "
                f"{self.start}, the last ending at op {self.offset + self.n_ops - 1}",
                f"noise: {init} ops before the first period, {len(self.noise) - init} ops in "
                f"{gaps} gaps between periods",
                f"unexplained: {self.unexplained} of {self.n_ops} ops (template + noise), the "
                "fewest of any explanation",
            ]
        else:
            lines = [f"not found in {self.n_ops} ops"]
        lines.append(f"work: level 1 proposed {self.level1_candidates} candidate period(s) on op "
                     f"names; level 2 ran {self.level2_checks} check(s) on fine tokens")
        lines += [f"rejected: period {r.period} (op names repeat {r.coarse_repeats} times, fine "
                  f"tokens {r.fine_repeats}): {r.reason}" for r in self.rejected]
        return "\n".join(lines + list(self.notes))

    def __repr__(self) -> str:
        work = f"l1={self.level1_candidates}, l2={self.level2_checks}"
        if not self.found:
            return f"SequenceResult(found=False, n_ops={self.n_ops}, {work})"
        return (f"SequenceResult(found=True, start={self.start}, period={self.period}, "
                f"repeats={self.repeats}, noise={self.n_ops - self.repeats * self.period} ops, "
                f"n_ops={self.n_ops}, {work})")


def _rejection(fstr: str, fine: Sequence[Hashable], offset: int, q: int,
               chain: list[int]) -> Rejection | None:
    """Why a coarse candidate fails on fine tokens: which earlier periods differ, and where."""
    n = len(fstr)
    tpl = fstr[n - q:]
    bad = [n - i - q for i in chain[1:] if fstr[n - i - q:n - i] != tpl]
    if not bad:
        return None
    s = bad[0]
    k = next(j for j in range(q) if fstr[s + j] != tpl[j])
    where = (f"op {k} of the period is {fine[s + k]!r} at op {offset + s + k} but "
             f"{fine[n - q + k]!r} in the last period")
    if len(bad) == len(chain) - 1:
        reason = f"same ops, fine tokens change every period (dynamic shapes?): {where}"
    else:
        reason = (f"same ops, but {len(bad)} of {len(chain) - 1} earlier periods differ in shapes, "
                  f"dtypes, scalars or roles: {where}")
    return Rejection(q, len(chain), len(chain) - len(bad), reason)


def _insertions(cstr: str, coarse: Sequence[Hashable], offset: int, starts: list[int], p: int,
                limit: int = 3) -> list[str]:
    """Noise runs holding the period's op names with a few ops inserted inside (latest first)."""
    tpl, notes = cstr[starts[-1]:starts[-1] + p], []
    pairs = zip(starts, starts[1:], strict=False)
    runs = [(0, starts[0])] + [(a + p, b) for a, b in pairs if b - a > 2 * p]
    for a, b in reversed(runs):
        if len(notes) == limit:
            break
        end = cstr.rfind(tpl[-1], a, b) + 1  # ops after the last closing op are plain noise
        if end - a <= p or tpl in cstr[a:end]:
            continue  # too short, or a whole copy: the level-2 rejection tells about it
        j, k, lo, inserted = p - 1, end - 1, max(a, end - p - max(2, p // 4)), []
        while k >= lo and j >= 0:
            if cstr[k] == tpl[j]:
                j -= 1
            else:
                inserted.append(k)
            k -= 1
        if j < 0 and inserted:
            notes.append(f"inside a period: ops {offset + k + 1}..{offset + end - 1} are the "
                         f"period's ops with {len(inserted)} op(s) inserted (first: op "
                         f"{offset + inserted[-1]} {coarse[inserted[-1]]!r}); an op inside a "
                         "period makes it not a period, so they are noise")
    return notes


def _result(cstr: str, fstr: str, coarse: Sequence[Hashable], fine: Sequence[Hashable],
            core: _Core, offset: int, min_repeats: int) -> SequenceResult:
    n, p = core.n, core.period
    found = core.score > 0
    scored = sorted(((len(c) - 1) * q, q, c) for q, c in core.candidates)[::-1]
    top = [(q, c) for score, q, c in scored if score > core.score and 2 * score >= scored[0][0]]
    rejected = tuple(r for q, c in top[:3] if (r := _rejection(fstr, fine, offset, q, c)))
    if not found:
        if not n:
            why = "the stream is empty"
        elif (last := fstr.count(fstr[-1])) < min_repeats:
            why = f"the last op {fine[-1]!r} occurs {last} time(s) and every period ends with it"
        else:
            why = "no template of at least min_period ops repeats"
        note = f"not found: {why}; a sequence needs min_repeats={min_repeats} periods"
        return SequenceResult(False, -1, 0, 0, (), core.level1, core.level2, n, offset, rejected,
                              (note,))
    starts = [n - i - p for i in reversed(core.chain)]
    notes = tuple(_insertions(cstr, coarse, offset, starts, p))
    return SequenceResult(True, offset + starts[0], p, len(starts), tuple(fine[n - p:]),
                          core.level1, core.level2, n, offset, rejected, notes,
                          [offset + s for s in starts], (0, len(starts)))


def _check(min_repeats: int, min_period: int) -> None:
    if min_repeats < 2 or min_period < 1:
        raise ValueError(f"need min_repeats >= 2 and min_period >= 1, got {min_repeats} and "
                         f"{min_period}: one occurrence of a sequence is no repetition")


def _encode_pair(coarse: Sequence[Hashable], fine: Sequence[Hashable] | None) -> tuple[str, str]:
    cstr = _encode(coarse, {})
    if fine is None:
        return cstr, cstr
    ftab: dict[Hashable, str] = {}
    fstr = _encode(fine, ftab)
    # the coarse code of each fine token's last occurrence, in code order (first occurrences)
    to_coarse = "".join(dict(zip(fine, cstr, strict=True)).values())
    if fstr.translate(to_coarse) != cstr:  # fine tokens do not refine coarse: use both
        log.debug("fine tokens do not refine coarse ones; using (coarse, fine) pairs")
        fstr = _encode(list(zip(coarse, fine, strict=True)), {})
    return cstr, fstr


def find_sequence(coarse: Sequence[Hashable], fine: Sequence[Hashable] | None = None, *,
                  min_repeats: int = 2, min_period: int = 1) -> SequenceResult:
    """Find the steady operator sequence at the end of a stream (see the module docstring)."""
    _check(min_repeats, min_period)
    if fine is not None and len(fine) != len(coarse):
        raise ValueError(f"fine has {len(fine)} tokens but coarse has {len(coarse)}: "
                         "pass one fine token per op, or none")
    cstr, fstr = _encode_pair(coarse, fine)
    core = _core(cstr, fstr, min_repeats, min_period)
    result = _result(cstr, fstr, coarse, coarse if fine is None else fine, core, 0, min_repeats)
    log.debug("sequence search over %d ops: %r", len(cstr), result)
    return result


@dataclass
class _Known:
    """The sequence SequenceSearch last found, extended as it recurs."""

    period: int
    chars: str  # the template's fine code points
    template: tuple[Hashable, ...]
    starts: list[int]  # absolute, ascending, append-only; replaced (never cut) when compacted
    lo: int  # the first start inside the window
    end: int  # absolute end of the last period


class SequenceSearch:
    """The online form: ``push`` each op as it is intercepted, ``search`` at sync points.

    Once a sequence is known, a search whose new ops are whole periods of it and short one-off
    noise (runs shorter than a period, of ops the template lacks), ending with a period, extends it
    in O(new ops); otherwise it searches the kept history afresh (a failed search keeps the known
    template for the next sync point). The extension equals a fresh search when syncs fall at
    period ends or on noise; a sync inside a period can make a part of the inference (a layer, a
    rotation) the known template until a sync that does not end with it; ``search(fresh=True)``
    always searches afresh. ``max_history`` bounds the ops searched; the cut never splits a known
    period, and with none known it falls just after an op equal to the last one.
    """

    def __init__(self, min_repeats: int = 2, *, max_history: int | None = None,
                 min_period: int = 1) -> None:
        _check(min_repeats, min_period)
        if max_history is not None and max_history < 1:
            raise ValueError(f"max_history must be a positive number of ops, got {max_history}")
        self.min_repeats, self.min_period, self.max_history = min_repeats, min_period, max_history
        self._coarse: list[Hashable] = []
        self._fine: list[Hashable] = []
        self._cch: list[str] = []  # code points of the ops encoded so far (a prefix of the ops)
        self._fch: list[str] = []
        self._ctab: dict[Hashable, str] = {}
        self._ftab: dict[Hashable, str] = {}
        self._base = 0  # absolute index of self._coarse[0]
        self._window = 0  # absolute index of the first op searched
        self._known: _Known | None = None
        self._found: SequenceResult | None = None  # the last result about self._known
        self._last: tuple[int, SequenceResult] | None = None

    def push(self, coarse: Hashable, fine: Hashable | None = None) -> None:
        """Record one op (cheap: encoding waits for the next search)."""
        self._coarse.append(coarse)
        self._fine.append(coarse if fine is None else fine)
        if self.max_history is not None and len(self._coarse) > 3 * self.max_history + 1024:
            self._drop(len(self) - 2 * self.max_history)  # the next search cuts more, with care

    def __len__(self) -> int:
        """Ops pushed so far (including those no longer kept)."""
        return self._base + len(self._coarse)

    @property
    def known(self) -> SequenceResult | None:
        """The last result about the sequence the next search will try to extend, if any."""
        return self._found if self._known is not None else None

    def search(self, *, fresh: bool = False) -> SequenceResult:
        """Explain the kept history, which is assumed to end at a sync point."""
        total = len(self)
        if self._last and self._last[0] == total and not fresh:
            return self._last[1]
        self._encode_pending()
        new = self._extend(total) if self._known and not fresh else None
        self._trim(total)
        k = self._known
        if new is not None and k is not None and len(k.starts) - k.lo >= self.min_repeats:
            note = (f"confirmed online: the known sequence recurred {new[0]} more time(s), with "
                    f"{new[1]} new noise op(s)")
            result = SequenceResult(True, k.starts[k.lo], k.period, len(k.starts) - k.lo,
                                    k.template, 0, 1, total - self._window, self._window, (),
                                    (note,), k.starts, (k.lo, len(k.starts)))
        else:
            result = self._fresh(total)
        if result.found:
            self._found = result
        self._last = (total, result)
        return result

    def _encode_pending(self) -> None:
        if self.max_history is not None and len(self._ftab) > 4 * self.max_history + 4096:
            self._ctab, self._ftab, self._cch, self._fch = {}, {}, [], []  # forget old tokens
        a = len(self._cch)
        coarse, fine = self._coarse[a:], self._fine[a:]
        self._cch.extend(_encode(coarse, self._ctab))
        self._fch.extend(_encode(list(zip(coarse, fine, strict=True)), self._ftab))
        if (k := self._known) is not None and a == 0:  # re-encoded: so is the template
            k.chars = "".join(self._fch[k.end - k.period - self._base:k.end - self._base])

    def _extend(self, total: int) -> tuple[int, int] | None:
        k = self._known
        assert k is not None and k.end >= self._base
        chunk, p = "".join(self._fch[k.end - self._base:total - self._base]), k.period
        if not chunk.endswith(k.chars):
            return None
        occ = [len(chunk) - p]
        while (j := chunk.rfind(k.chars, 0, occ[-1])) >= 0:
            occ.append(j)
        occ.reverse()
        ends = [0] + [j + p for j in occ[:-1]]  # noise runs are chunk[ends[i]:occ[i]]
        alphabet = set(k.chars)
        if any(j - a >= p or not alphabet.isdisjoint(chunk[a:j])
               for a, j in zip(ends, occ, strict=True)):
            return None  # not just periods and short one-off noise: search afresh
        k.starts.extend(k.end + j for j in occ)
        k.end = total
        return len(occ), len(chunk) - len(occ) * p

    def _trim(self, total: int) -> None:
        if self.max_history is None or total - self.max_history <= self._window:
            return
        cut, k = total - self.max_history, self._known
        if k is not None:
            while k.lo < len(k.starts) and k.starts[k.lo] < cut:
                cut = max(cut, k.starts[k.lo] + k.period)
                k.lo += 1
            if k.lo == len(k.starts):
                self._known = None
            elif k.lo > 64 and 2 * k.lo > len(k.starts):
                k.starts, k.lo = k.starts[k.lo:], 0
        else:  # an arbitrary cut: move it just past an op equal to the last one (a period end)
            ops = "".join(self._fch[cut - self._base:total - self._base])
            j = ops.find(ops[-1])
            cut += j + 1 if j < len(ops) - 1 else 0
        self._window = cut
        if cut - self._base > max(1024, len(self._coarse) // 2):
            self._drop(cut)

    def _drop(self, cut: int) -> None:
        """Forget the ops before absolute index ``cut``."""
        d = cut - self._base
        for lst in (self._coarse, self._fine, self._cch, self._fch):
            del lst[:d]
        self._base, self._window = cut, max(self._window, cut)
        if self._known is not None and self._known.end - self._known.period < cut:
            self._known = None

    def _fresh(self, total: int) -> SequenceResult:
        a = self._window - self._base
        cstr, fstr = "".join(self._cch[a:]), "".join(self._fch[a:])
        core = _core(cstr, fstr, self.min_repeats, self.min_period)
        result = _result(cstr, fstr, self._coarse[a:], self._fine[a:], core, self._window,
                         self.min_repeats)
        if result.found:
            starts = result._starts
            assert isinstance(starts, list)
            self._known = _Known(result.period, fstr[len(fstr) - result.period:], result.template,
                                 starts, 0, total)
        return result


_OPS = ("aten.embedding", "aten.native_layer_norm", "aten.mm", "aten.addmm", "aten.add.Tensor",
        "aten.mul.Tensor", "aten.gelu", "aten._softmax", "aten.bmm", "aten.view", "aten.t")
_NOISE_OPS = ("aten._local_scalar_dense", "aten.mean", "aten.sum", "aten.eq.Tensor", "aten.abs")
_INIT_OPS = ("aten.empty.memory_format", "aten.zeros", "aten.fill_.Scalar", "aten.copy_")
_CLOSE = "aten._to_copy"  # the sync op that ends every period (output to host)


@dataclass(frozen=True)
class SyntheticStream:
    """A generated stream and its ground truth (indices into ``coarse``/``fine``); ``syncs`` are
    the ops after which a kernel would sync: each period's end (warm-ups and old shapes included)
    and each noise op outside a period."""

    coarse: tuple[str, ...]
    fine: tuple[str, ...]
    start: int
    period: int
    repeats: int
    noise: tuple[int, ...]
    template: tuple[str, ...]
    syncs: tuple[int, ...]


def synthetic_stream(period: int = 24, repeats: int = 4, *, init_noise: int = 0,
                     warmups: int = 0, gaps: float | Sequence[int] = 0.0, shape_change: int = 0,
                     dynamic_shapes: bool = False, nested: int = 0,
                     seed: int = 0) -> SyntheticStream:
    """A stream of ``repeats`` inferences of ``period`` ops, with its ground truth.

    ``init_noise`` ops come first (uploads, allocations, stray ops, maybe the start of a period),
    with ``warmups`` warm-up iterations (same ops at batch 1) among them, then ``shape_change``
    periods at another batch size. ``gaps`` puts noise between the steady periods: a probability
    (1-3 ops) or one length per gap. ``nested`` repeats a block that many times inside the period.
    With ``dynamic_shapes`` each period has its own batch size: only the last one is steady.

    The truth is the unique optimum of the module's rule: each period ends with a sync op whose
    fine token occurs nowhere else, so every template ends where a steady period ends, and each
    noise op between periods carries a step counter, so no template longer than a period repeats
    more than a period would explain.
    """
    if period < 1 or repeats < 1 or (nested > 1 and period - 2 < nested):
        raise ValueError(f"need period >= 1, repeats >= 1 and, with nested blocks, period >= "
                         f"nested + 2; got period={period}, repeats={repeats}, nested={nested}")
    rng = random.Random(seed)
    body = [(rng.choice(_OPS), rng.choice((8, 64, 256)), k) for k in range(period - 1)]
    if nested > 1:
        b = (period - 2) // nested
        body = body[:1] + body[1:1 + b] * nested + body[1 + b * nested:]

    def role(k: int) -> str:
        return "input" if k == 0 else rng.choice(("param", f"local:{k - 1}", f"carried:{k}"))

    roles = [role(k) for _, _, k in body]

    def render(batch: int) -> list[tuple[str, str]]:
        ops = [(name, f"{name}(f32[{batch},{dim}],{r})")
               for (name, dim, _), r in zip(body, roles, strict=True)]
        return ops + [(_CLOSE, f"{_CLOSE}(f32[{batch},8],local:{max(period - 2, 0)})->cpu")]

    serial = iter(range(1 << 62))

    def noise_op() -> tuple[str, str]:
        name = rng.choice(_NOISE_OPS)
        return name, f"{name}(f32[],local:0,step={next(serial)})"

    def init_op() -> tuple[str, str]:
        kind, d = rng.random(), rng.choice((8, 64, 256))
        if kind < 0.4:
            return _CLOSE, f"{_CLOSE}(f32[{d},{d}],param)->cuda"
        name = rng.choice(_INIT_OPS if kind < 0.7 else _OPS)
        return name, f"{name}(f32[{d}],local:0)"

    batch = rng.choice((4, 8, 16, 32))
    init = [([init_op()], True) for _ in range(init_noise)]
    if init_noise and period > 1 and rng.random() < 0.5:  # the start of a period, never its end
        k = min(rng.randrange(1, period), init_noise)
        init[-k:] = [(render(batch)[:k], False)]
    for _ in range(warmups):
        init.insert(rng.randrange(len(init) + 1), (render(1), True))
    for _ in range(shape_change):
        init += [(render(2 * batch), True)] + ([([noise_op()], True)] if rng.random() < 0.3 else [])
    if isinstance(gaps, (int, float)):
        lengths = [rng.randint(1, 3) if rng.random() < gaps else 0 for _ in range(repeats - 1)]
    elif len(gaps) == repeats - 1:
        lengths = list(gaps)
    else:
        raise ValueError(f"gaps has {len(gaps)} lengths for {repeats - 1} gaps between periods")
    steady = [(render(3 * batch + j if dynamic_shapes else batch), True) for j in range(repeats)]
    ops: list[tuple[str, str]] = []
    starts, syncs = [], []
    for chunk, sync in init:
        ops += chunk
        syncs += [len(ops) - 1] if sync else []
    for j, (chunk, _) in enumerate(steady):
        starts.append(len(ops))
        ops += chunk
        syncs.append(len(ops) - 1)
        for _ in range(lengths[j] if j < repeats - 1 else 0):
            ops.append(noise_op())
            syncs.append(len(ops) - 1)
    starts = starts[-1:] if dynamic_shapes else starts
    inside = {i for s in starts for i in range(s, s + period)}
    return SyntheticStream(tuple(c for c, _ in ops), tuple(f for _, f in ops), starts[0], period,
                           len(starts), tuple(i for i in range(len(ops)) if i not in inside),
                           tuple(f for _, f in steady[-1][0]), tuple(syncs))
