"""Run every benchmark module with its default settings and say where its JSON went.

A benchmark is any module of this package (but this one) with a ``main(argv)`` function, or else
one runnable as ``python -m benchmarks.NAME``. Each runs in this process, one after the other;
one that fails is reported and the rest still run.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import runpy
import sys
import time
import traceback
from pathlib import Path

from benchmarks import shown

PACKAGE = Path(__file__).resolve().parent
RESULTS = PACKAGE / "results"


def benchmark_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE)])
                  if m.name != "__main__" and not m.name.startswith("_"))


def run_one(name: str) -> int:
    """Run ``benchmarks.NAME`` with its default settings; return its exit status."""
    module = importlib.import_module(f"benchmarks.{name}")
    main = getattr(module, "main", None)
    try:
        if callable(main):
            status = main([])
            return status if isinstance(status, int) else 0
        runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def json_files() -> dict[Path, int]:
    """Every JSON file under results/ with its modification time (ns)."""
    if not RESULTS.is_dir():
        return {}
    return {p: p.stat().st_mtime_ns for p in RESULTS.rglob("*.json")}



def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
        epilog="Run one benchmark with options: python -m benchmarks.NAME --help",
    ).parse_args(argv)
    began = time.perf_counter()
    summary: list[tuple[str, str, list[Path]]] = []
    for name in benchmark_names():
        print(f"== benchmarks.{name}", flush=True)
        before = json_files()
        try:
            status = "ok" if run_one(name) == 0 else "failed"
        except Exception:
            traceback.print_exc()
            status = "failed"
        written = [p for p, t in json_files().items() if before.get(p) != t]
        summary.append((name, status, sorted(written)))
        print(flush=True)
    print(f"benchmarks finished in {time.perf_counter() - began:.0f} s")
    width = max(len(name) for name, _, _ in summary)
    for name, status, paths in summary:
        where = ", ".join(shown(p) for p in paths) or "(no JSON written)"
        print(f"  {name:<{width}}  {status:<6}  {where}")
    return 0 if all(status == "ok" for _, status, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
