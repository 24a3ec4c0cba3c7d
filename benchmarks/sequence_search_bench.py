"""Operator Sequence Search: time against stream length, and the online cost per sync point.

Streams come from ``synthetic_stream``: inferences of ``--period`` ops (a block repeated 12 times
inside, like a transformer's layers), 2000 init ops with two warm-ups among them, and 1-3 noise ops
in 5% of the gaps. ``find_sequence`` is timed from token lists to result (encoding included), best
of ``--repeat`` runs; growth should be linear (1M / 100k about 10x). The online form is timed as a
session uses it: push one inference, search, for ``--syncs`` sync points after a history of each
length; a confirmation costs O(new ops), whatever the history. A few other shapes of stream (one
op repeated, dynamic shapes, random ops) show the range at the largest size. Printed and written
as JSON, never asserted.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import write_json  # noqa: E402
from rrto_lab.sequence_search import (  # noqa: E402
    SequenceSearch,
    SyntheticStream,
    find_sequence,
    synthetic_stream,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sequence_search.json"
INIT_OPS = 2000


def stream_of(n: int, period: int, seed: int = 1) -> SyntheticStream:
    """A realistic stream of about n ops (it ends with a whole period)."""
    repeats = max(2, (n - INIT_OPS - 2 * period) // (period + 0.1))
    return synthetic_stream(period, int(repeats), init_noise=INIT_OPS, warmups=2, gaps=0.05,
                            nested=12, seed=seed)


def time_search(coarse, fine, repeat: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = find_sequence(coarse, fine)
        times.append(time.perf_counter() - t0)
    return times, result


def batch_rows(sizes: list[int], period: int, repeat: int) -> list[dict]:
    rows = []
    for n in sizes:
        s = stream_of(n, period)
        times, r = time_search(s.coarse, s.fine, repeat if n < 500_000 else max(1, repeat - 2))
        rows.append({
            "ops": len(s.coarse), "best_s": min(times), "median_s": statistics.median(times),
            "us_per_op": 1e6 * min(times) / len(s.coarse), "period": r.period,
            "repeats": r.repeats, "noise": len(r.noise), "level1_candidates": r.level1_candidates,
            "level2_checks": r.level2_checks,
            "correct": (r.start, r.period, r.noise) == (s.start, s.period, s.noise)})
    return rows


def online_rows(sizes: list[int], period: int, syncs: int) -> list[dict]:
    rows = []
    for n, max_history in [(n, None) for n in sizes] + [(sizes[-1], sizes[-1] // 10)]:
        s = stream_of(n + (syncs + 2) * (period + 1), period, seed=2)
        ends = [i + 1 for i in s.syncs if s.fine[i].endswith("->cpu")]
        first = next(k for k, e in enumerate(ends) if e >= n) if ends[-1] >= n else len(ends) - 1
        search = SequenceSearch(max_history=max_history)
        t0 = time.perf_counter()
        for c, f in zip(s.coarse[:ends[first]], s.fine[:ends[first]], strict=True):
            search.push(c, f)
        push_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fresh = search.search()
        fresh_s = time.perf_counter() - t0
        per_sync, new_ops, confirmed = [], [], 0
        for a, b in zip(ends[first:], ends[first + 1:first + 1 + syncs], strict=False):
            for c, f in zip(s.coarse[a:b], s.fine[a:b], strict=True):
                search.push(c, f)
            t0 = time.perf_counter()
            r = search.search()
            per_sync.append(time.perf_counter() - t0)
            new_ops.append(b - a)
            confirmed += r.level1_candidates == 0
        rows.append({
            "history": ends[first], "max_history": max_history,
            "push_us_per_op": 1e6 * push_s / ends[first], "first_search_s": fresh_s,
            "first_found": fresh.found, "syncs": len(per_sync), "confirmed": confirmed,
            "new_ops_per_sync": statistics.mean(new_ops),
            "sync_median_us": 1e6 * statistics.median(per_sync),
            "sync_p90_us": 1e6 * statistics.quantiles(per_sync, n=10)[-1],
            "final_repeats": r.repeats})
    return rows


def other_rows(n: int, repeat: int) -> list[dict]:
    dynamic = synthetic_stream(240, n // 241, init_noise=INIT_OPS, gaps=0.05, dynamic_shapes=True,
                               seed=3)
    small = synthetic_stream(10, n // 11, init_noise=INIT_OPS, gaps=0.3, seed=4)
    rng = random.Random(5)
    letters = [rng.choice("abcd") for _ in range(n)]
    cases = [("one op repeated", ["aten.add"] * n, None),
             ("period 10, noise in 30% of gaps", small.coarse, small.fine),
             ("dynamic shapes, period 240", dynamic.coarse, dynamic.fine),
             ("4 op names at random", letters, None)]
    rows = []
    for name, coarse, fine in cases:
        times, r = time_search(coarse, fine, max(1, repeat - 2))
        rows.append({"stream": name, "ops": len(coarse), "best_s": min(times),
                     "found": r.found, "period": r.period,
                     "level1_candidates": r.level1_candidates, "level2_checks": r.level2_checks})
    return rows


def table(result: dict) -> str:
    lines = [f"find_sequence, period {result['period']} ops (12 nested blocks), "
             f"{INIT_OPS} init ops, noise in 5% of gaps; best of {result['repeat']}",
             f"{'ops':>9} {'best':>9} {'median':>9} {'us/op':>6} {'period':>6} {'repeats':>7} "
             f"{'noise':>6} {'l1':>3} {'l2':>3} correct"]
    for r in result["batch"]:
        lines.append(f"{r['ops']:>9} {r['best_s']:>8.3f}s {r['median_s']:>8.3f}s "
                     f"{r['us_per_op']:>6.2f} {r['period']:>6} {r['repeats']:>7} {r['noise']:>6} "
                     f"{r['level1_candidates']:>3} {r['level2_checks']:>3} {r['correct']}")
    if g := result["growth"]:
        lines.append(f"growth {g['large']}/{g['small']} ops: time x{g['time_ratio']:.2f} for ops "
                     f"x{g['ops_ratio']:.2f} (linear: the same)")
    lines += ["", "online: push a history, search once, then push one inference and search, "
              "per sync point",
              f"{'history':>9} {'max_hist':>8} {'push/op':>8} {'first':>8} {'syncs':>5} "
              f"{'new ops':>7} {'confirmed':>9} {'median':>9} {'p90':>9}"]
    for r in result["online"]:
        lines.append(f"{r['history']:>9} {str(r['max_history']):>8} "
                     f"{r['push_us_per_op']:>6.2f}us {r['first_search_s']:>7.3f}s "
                     f"{r['syncs']:>5} {r['new_ops_per_sync']:>7.0f} {r['confirmed']:>9} "
                     f"{r['sync_median_us']:>7.0f}us {r['sync_p90_us']:>7.0f}us")
    lines += ["", "other streams",
              f"{'stream':<34} {'ops':>9} {'best':>8} {'found':>5} {'period':>6} {'l1':>3} "
              f"{'l2':>3}"]
    for r in result["other"]:
        lines.append(f"{r['stream']:<34} {r['ops']:>9} {r['best_s']:>7.3f}s "
                     f"{str(r['found']):>5} {r['period']:>6} {r['level1_candidates']:>3} "
                     f"{r['level2_checks']:>3}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sequence_search_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000",
                   help="stream lengths, comma-separated (default: 10000,100000,1000000)")
    p.add_argument("--period", type=int, default=240, help="ops per inference (default: 240)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per size (default: 5)")
    p.add_argument("--syncs", type=int, default=200,
                   help="sync points timed per online history (default: 200)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="where the JSON goes (default: benchmarks/results/sequence_search.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sizes = sorted(int(x) for x in args.sizes.split(","))
    if args.period < 14 or args.repeat < 1 or args.syncs < 2 or sizes[0] < 10 * args.period:
        parser().error("need --period >= 14 (12 nested blocks), --repeat >= 1, --syncs >= 2 and "
                       "sizes of at least 10 periods")
    batch = batch_rows(sizes, args.period, args.repeat)
    growth = {}
    if len(batch) > 1:
        small, large = batch[-2], batch[-1]
        growth = {"small": small["ops"], "large": large["ops"],
                  "time_ratio": large["best_s"] / small["best_s"],
                  "ops_ratio": large["ops"] / small["ops"]}
    result = {"python": platform.python_version(), "machine": platform.platform(),
              "processor": platform.processor(), "period": args.period, "repeat": args.repeat,
              "batch": batch, "growth": growth, "online": online_rows(sizes, args.period,
                                                                      args.syncs),
              "other": other_rows(sizes[-1], args.repeat)}
    print(table(result))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
