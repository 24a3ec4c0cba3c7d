"""rrto benchmarks: ``python -m benchmarks`` runs them all, ``python -m benchmarks.NAME`` one.

Timings are printed and written as JSON under ``benchmarks/results/``; they are never asserted.
"""

from pathlib import Path


def shown(path: Path | str) -> str:
    """``path`` relative to the working directory where it is inside it (for messages)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_json(path: Path | str, result: dict) -> None:
    """Write a benchmark's result as JSON (creating its folder) and say where."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {shown(path)}")
