"""The record/replay benchmark: per-inference latency of every mode, over emulated links.

    python -m benchmarks.offload [--models mlp,resnet18,transformer,bert] [--links ...]

For each link (loopback; 5 ms / 100 Mbit/s; 20 ms / 20 Mbit/s, by ``rrto-link``) and each model
(``benchmarks/_models.py``) it runs the same inference loop in each mode — ``local`` (no
offloading), ``rpc`` (one round trip per op), ``async`` (ops queued, one round trip per sync
point), ``rrto`` (record, then replay) — and the **non-transparent** baseline (the server holds
the model; the client sends only the input through the same link). All against one real
``rrto-server`` process, in one run, so the ratios compare like with like. Outputs are checked
against local ones. Warm-up inferences (the weight upload, recording) are not timed: the figures
are steady state. Prints a table and writes JSON (``--out``). Nothing is asserted: machines are
noisy; read the ratios.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Any

import torch

import rrto_lab
from benchmarks import _nontransparent, write_json
from benchmarks._models import MODELS, build, sample
from rrto_lab.child import Child
from rrto_lab.link import LinkProcess, LinkSpec

LINKS = {"loopback": None, "5ms-100Mbit": LinkSpec(5, 100), "20ms-20Mbit": LinkSpec(20, 20)}
MODES = ("local", "rpc", "async", "rrto", "nontransparent")
RRTO_WARMUP = 6  # enough to record two periods and start replaying


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_local(model: str, n: int) -> tuple[dict, list[torch.Tensor]]:
    m = build(model)
    outs, lat, cpu = [], [], []
    with torch.no_grad():
        for i in range(3):
            m(sample(model, i))
        for i in range(n):
            x = sample(model, i)
            w, c = time.perf_counter(), time.process_time()
            outs.append(m(x))
            lat.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
    return {"latency_ms": _median(lat) * 1e3, "client_cpu_ms": _median(cpu) * 1e3,
            "rpcs": 0, "bytes_up": 0, "bytes_down": 0}, outs


def run_rrto(address: str, mode: str, model: str, n: int, expect: list[torch.Tensor],
             warmup: int) -> dict:
    s = rrto_lab.connect(address, mode=mode, timeout_s=600)
    rows: list[dict] = []
    lat, cpu, correct = [], [], True
    try:
        with s, torch.no_grad():
            m = build(model).cuda()
            for i in range(warmup + n):
                x = sample(model, i % n)
                before = len(s.inferences)
                w, c = time.perf_counter(), time.process_time()
                y = m(x.cuda()).cpu()
                took, used = time.perf_counter() - w, time.process_time() - c
                correct &= torch.allclose(y, expect[i % n], rtol=1e-4, atol=1e-5)
                if i >= warmup:
                    lat.append(took)
                    cpu.append(used)
                    rows.append(_merge(s.inferences[before:]))
            del m
    finally:
        s.close()
    return {"latency_ms": _median(lat) * 1e3, "client_cpu_ms": _median(cpu) * 1e3,
            "rpcs": _median([r["rpcs"] for r in rows]),
            "ops": _median([r["ops"] for r in rows]),
            "bytes_up": _median([r["bytes_sent"] for r in rows]),
            "bytes_down": _median([r["bytes_received"] for r in rows]),
            "server_ms": _median([r["server_s"] for r in rows]) * 1e3,
            "phases": sorted({r["phase"] for r in rows}), "correct": bool(correct)}


def _merge(rows: list[dict]) -> dict:
    out = {k: sum(r[k] for r in rows) for k in ("ops", "rpcs", "bytes_sent", "bytes_received",
                                                  "server_s")}
    out["phase"] = "+".join(sorted({r["phase"] for r in rows}))
    return out


def run_nontransparent(address: str, model: str, n: int, expect: list[torch.Tensor]) -> dict:
    client = _nontransparent.Client(address)
    lat, cpu, correct = [], [], True
    try:
        client.infer(model, sample(model, 0))
        sent, received = client.bytes_sent, client.bytes_received
        for i in range(n):
            x = sample(model, i)
            w, c = time.perf_counter(), time.process_time()
            y = client.infer(model, x)
            lat.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
            correct &= torch.allclose(y, expect[i], rtol=1e-4, atol=1e-5)
    finally:
        client.close()
    return {"latency_ms": _median(lat) * 1e3, "client_cpu_ms": _median(cpu) * 1e3, "rpcs": 1,
            "bytes_up": (client.bytes_sent - sent) / n,
            "bytes_down": (client.bytes_received - received) / n, "correct": bool(correct)}


def ratios(r: dict[str, dict]) -> dict[str, float]:
    rr = r["rrto"]
    return {
        "rrto/rpc": rr["latency_ms"] / r["rpc"]["latency_ms"],
        "rrto/async": rr["latency_ms"] / r["async"]["latency_ms"],
        "rrto/nontransparent": rr["latency_ms"] / r["nontransparent"]["latency_ms"],
        "cpu rrto/async": rr["client_cpu_ms"] / r["async"]["client_cpu_ms"],
        "server replay/eager": rr["server_ms"] / r["async"]["server_ms"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.offload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated (%(default)s)")
    p.add_argument("--links", default=",".join(LINKS), help="comma-separated (%(default)s)")
    p.add_argument("--inferences", type=int, default=7, help="timed inferences per cell")
    p.add_argument("--device", default="auto", help="the servers' device (default: auto)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for the local runs and for both servers: client, servers "
                        "and links share this machine's cores, and oversubscribed threads "
                        "stall (default: 1)")
    p.add_argument("--out", default="benchmarks/results/offload.json")
    args = p.parse_args(argv)
    models, links = args.models.split(","), args.links.split(",")
    n = args.inferences
    torch.set_num_threads(args.threads)  # local runs compute with what each server gets
    locals_ = {m: run_local(m, n) for m in models}  # before the servers start: a quiet CPU
    threads = ["--threads", str(args.threads)]
    server = Child([sys.executable, "-m", "rrto_server", "--listen", "tcp://127.0.0.1:0",
                    "--device", args.device, *threads], "rrto-server listening on ")
    nt = Child([sys.executable, "-m", "benchmarks._nontransparent", "--device", args.device,
                *threads], _nontransparent.READY)
    server_addr, nt_addr = server.ready.split()[0], nt.ready.split()[0]
    results: list[dict[str, Any]] = []
    began = time.perf_counter()
    try:
        for link_name in links:
            spec = LINKS[link_name]
            proxies = [LinkProcess(a, spec) for a in (server_addr, nt_addr)] if spec else []
            rrto_addr, nt_link = (proxies[0].address, proxies[1].address) if spec \
                else (server_addr, nt_addr)
            try:
                for model in models:
                    local, expect = locals_[model]
                    cell: dict[str, dict] = {"local": local}
                    for mode in ("rpc", "async", "rrto"):
                        cell[mode] = run_rrto(rrto_addr, mode, model, n, expect,
                                              RRTO_WARMUP if mode == "rrto" else 1)
                    cell["nontransparent"] = run_nontransparent(nt_link, model, n, expect)
                    results.append({"model": model, "link": link_name, "modes": cell,
                                    "ratios": ratios(cell)})
                    _print_cell(results[-1])
            finally:
                for proxy in proxies:
                    proxy.stop()
    finally:
        server.stop()
        nt.stop()
    report = {"benchmark": "offload", "inferences": n, "seconds": time.perf_counter() - began,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpu": platform.processor() or platform.machine(),
                          "device": args.device},
              "results": results}
    _print_targets(results)
    print("\nas markdown (README.md):\n" + markdown(results) + "\n")
    write_json(args.out, report)
    return 0


def _print_cell(res: dict) -> None:
    print(f"\n{res['model']} over {res['link']}")
    print(f"  {'mode':<15}{'latency ms':>11}{'RPCs':>6}{'KB up':>8}{'KB down':>8}"
          f"{'client CPU ms':>14}{'server ms':>10}  phase / correct")
    for mode in MODES:
        r = res["modes"][mode]
        server = f"{r['server_ms']:>10.2f}" if "server_ms" in r else f"{'':>10}"
        tail = "+".join(r.get("phases", [])) + (" ok" if r.get("correct", True) else " WRONG")
        print(f"  {mode:<15}{r['latency_ms']:>11.2f}{r['rpcs']:>6g}{r['bytes_up'] / 1e3:>8.1f}"
              f"{r['bytes_down'] / 1e3:>8.1f}{r['client_cpu_ms']:>14.2f}{server}  {tail}")
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in res["ratios"].items()))


def markdown(results: list[dict]) -> str:
    """The README's table: median ms per inference, and the ratios that matter."""
    lines = ["| model | link | local | rpc | async | rrto | non-transparent | rrto/rpc "
             "| rrto/non-transparent | client CPU rrto/async |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        q, r = res["modes"], res["ratios"]
        cells = " | ".join(f"{q[m]['latency_ms']:.2f}" for m in MODES)
        lines.append(f"| {res['model']} | {res['link']} | {cells} | {r['rrto/rpc']:.3f} | "
                     f"{r['rrto/nontransparent']:.2f} | {r['cpu rrto/async']:.2f} |")
    return "\n".join(lines)


def _print_targets(results: list[dict]) -> None:
    print("\ntargets (from the record/replay issue), measured in this run:")
    for res in results:
        r, q = res["ratios"], res["modes"]
        checks = [f"rrto/nontransparent {r['rrto/nontransparent']:.2f} (<= 1.15)",
                  f"server replay/eager {r['server replay/eager']:.2f} (<= 1.10)",
                  f"RPCs/inference {q['rrto']['rpcs']:g}"]
        if res["link"] == "5ms-100Mbit":
            checks.insert(0, f"rrto/rpc {r['rrto/rpc']:.3f} (<= 0.05)")
        if res["link"] == "20ms-20Mbit":
            checks.insert(0, f"rrto/async {r['rrto/async']:.2f} (<= 1.0), "
                             f"cpu rrto/async {r['cpu rrto/async']:.2f} (<= 0.5)")
        print(f"  {res['model']:<12} {res['link']:<12} " + "; ".join(checks))


if __name__ == "__main__":
    raise SystemExit(main())
