"""What rrto adds to one round trip in mode ``rpc``, next to bare pyzmq carrying the same frames.

Each case is measured against its own bare twin, in one run, on loopback:
- ``op``: an intercepted op on a remote tensor, ``torch.add(x, 1)``, through the whole client path
  and a real ``rrto-server`` process; ``upload`` (``x.copy_(host)``) and ``fetch`` (``x.cpu()``)
  move ``--size`` bytes the same way;
- ``ping``: a bare protocol request sent with :class:`rrto_lab.client.Connection` directly;
- the twin: a pyzmq DEALER round trip to a tiny ROUTER echo in another process (so both sides pay
  the same process boundary) that answers with frames of the byte sizes rrto's reply had, after
  sending frames of the byte sizes rrto's request had. This is the floor rrto is compared with.
rrto and bare loops alternate in rounds, so drift on the machine hits both alike. Timings are
printed and written as JSON, never asserted. ``--profile`` adds where an op's time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq

import rrto_lab
from benchmarks import write_json
from rrto_lab.child import Child
from rrto_lab.client import Connection
from rrto_server.executor import Executor
from rrto_server.protocol import pack, unpack

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "rpc_overhead.json"
SERVER_READY = "rrto-server listening on "
ECHO_READY = "echo listening on "
AIM = 1.5  # rrto op / bare round trip that the project aims to stay under
# The first bytes of a bare request: how large the echo's reply header and payload must be.
REPLY_SIZES = struct.Struct("<II")


# -- the bare twin -----------------------------------------------------------------------------
def serve_echo(listen: str) -> None:
    """A ROUTER answering each request with the frame sizes its first 8 bytes ask for."""
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(listen)
    print(ECHO_READY + socket.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    replies: dict[bytes, list[bytes]] = {}
    while True:
        identity, header, *_ = socket.recv_multipart()
        sizes = header[:REPLY_SIZES.size]
        reply = replies.get(sizes)
        if reply is None:
            head, payload = REPLY_SIZES.unpack(sizes)
            reply = replies[sizes] = [bytes(head), *([bytes(payload)] if payload else [])]
        socket.send_multipart([identity, *reply])


def bare_call(socket: zmq.Socket, wire: dict[str, int]) -> Callable[[], None]:
    """One DEALER round trip with the frame sizes of ``wire`` (measured on rrto's traffic)."""
    header = REPLY_SIZES.pack(wire["header_down"], wire["payload_down"])
    frames = [header.ljust(wire["header_up"], b"\0")]
    if wire["payload_up"]:
        frames.append(bytes(wire["payload_up"]))

    def call() -> None:
        socket.send_multipart(frames)
        socket.recv_multipart()

    return call


# -- measuring ---------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    what: str
    call: Callable[[], Any]
    connection: Connection  # whose counters tell the frame sizes
    payload_up: int = 0
    payload_down: int = 0


def warm_up(case: Case, n: int) -> dict[str, int]:
    """Run ``case`` ``n`` times; return the bytes of one request and one reply, by frame kind."""
    c = case.connection
    messages, sent, received = c.messages, c.bytes_sent, c.bytes_received
    for _ in range(n):
        case.call()
    if c.messages - messages != n:
        raise RuntimeError(f"{case.what} sent {(c.messages - messages) / n:g} messages per call; "
                           "this benchmark assumes one round trip per call")
    return {"header_up": round((c.bytes_sent - sent) / n) - case.payload_up,
            "payload_up": case.payload_up,
            "header_down": round((c.bytes_received - received) / n) - case.payload_down,
            "payload_down": case.payload_down}


def timed(call: Callable[[], Any], n: int, pause_s: float = 0.0) -> list[int]:
    """Each call's nanoseconds; with ``pause_s``, the thread sleeps that long before each call."""
    clock = time.perf_counter_ns
    times = []
    for _ in range(n):
        if pause_s:
            time.sleep(pause_s)
        start = clock()
        call()
        times.append(clock() - start)
    return times


def summary(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)
    return {"median_us": statistics.median(s) / 1000,
            "p90_us": s[int(0.9 * (len(s) - 1))] / 1000,
            "p99_us": s[int(0.99 * (len(s) - 1))] / 1000,
            "n": len(s)}


def compare(case: Case, socket: zmq.Socket, ops: int, warmup: int, rounds: int) -> dict:
    """``case`` and its bare twin in alternating rounds; the ratio is the median of per-round
    ratios, so a change of the machine's speed between rounds does not skew it."""
    wire = warm_up(case, warmup)
    bare = bare_call(socket, wire)
    timed(bare, warmup)
    rrto_ns: list[int] = []
    bare_ns: list[int] = []
    per_round = []
    for _ in range(rounds):
        a, b = timed(case.call, ops // rounds), timed(bare, ops // rounds)
        rrto_ns += a
        bare_ns += b
        per_round.append({"rrto_median_us": statistics.median(a) / 1000,
                          "bare_zmq_median_us": statistics.median(b) / 1000})
    rrto, zmq_ = summary(rrto_ns), summary(bare_ns)
    ratio = statistics.median(r["rrto_median_us"] / r["bare_zmq_median_us"] for r in per_round)
    return {"case": case.name, "call": case.what, "wire_bytes": wire, "rrto": rrto,
            "bare_zmq": zmq_, "ratio": ratio, "rounds": per_round}


# -- processes ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    procs = [Child([sys.executable, "-m", "benchmarks.rpc_overhead", "--echo",
                    "tcp://127.0.0.1:0"], ECHO_READY, what="the echo server")]
    try:
        address = args.address
        if address is None:
            procs.append(Child([sys.executable, "-m", "rrto_server", "--listen",
                                "tcp://127.0.0.1:0", "--device", args.device], SERVER_READY,
                               what="rrto-server"))
            address = procs[-1].ready.split()[0]
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(procs[0].ready.split()[0])
        try:
            return measure(args, address, socket)
        finally:
            socket.close(0)
    finally:
        for proc in procs:
            proc.stop()


def measure(args: argparse.Namespace, address: str, socket: zmq.Socket) -> dict:
    session = rrto_lab.connect(address, mode="rpc", timeout_s=30)
    ping = Connection(address, 30.0)
    try:
        with session:
            rows, profile = measure_cases(args, session, ping, socket)
        return {
            "benchmark": "rpc_overhead",
            "settings": {"ops": args.ops, "warmup": args.warmup, "rounds": args.rounds,
                         "size_bytes": args.size, "server": address,
                         "server_device": session.device_info.get("name")},
            "environment": environment(),
            "rows": rows,
            "ratio": rows[0]["ratio"],
            "aim": AIM,
            "profile": profile,
        }
    finally:
        ping.close()
        session.close()


def measure_cases(args: argparse.Namespace, session: rrto_lab.Session, ping: Connection,
                  socket: zmq.Socket) -> tuple[list[dict], dict | None]:
    """Every case against its twin (the remote tensors are gone when this returns)."""
    host = torch.randn(args.size // 4)
    x = host.cuda()
    cases = [
        Case("op", "torch.add(x, 1)", lambda: torch.add(x, 1), session.connection),
        Case("upload", "x.copy_(host)", lambda: x.copy_(host), session.connection,
             payload_up=args.size),
        Case("fetch", "x.cpu()", x.cpu, session.connection, payload_down=args.size),
        Case("ping", "Connection.request(ping)",
             lambda: ping.request({"type": "ping", "sid": session.sid}), ping),
    ]
    rows = [compare(c, socket, args.ops, args.warmup, args.rounds) for c in cases]
    if not args.profile:
        return rows, None
    bare = bare_call(socket, rows[0]["wire_bytes"])
    remote = {x._rrto_handle: host.clone()}
    return rows, profile_op(cases[0], session, bare, remote, args.ops)


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "msgpack": ".".join(map(str, msgpack.version)), "machine": platform.platform(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# -- where the time goes (--profile) -----------------------------------------------------------
class InProcessServer:
    """Stands in for a session's Connection: the same encode, run and decode work, no sockets.

    Only for ``--profile``: the session's op path runs against it to show the CPU time rrto spends
    on both sides of one op apart from any transport; ``server_ns`` adds up the server's share.
    """

    def __init__(self, tensors: dict[int, torch.Tensor]) -> None:
        self.executor = Executor(torch.device("cpu"))
        self.executor.tensors.update(tensors)
        self.server_ns = 0
        self.messages = self.bytes_sent = self.bytes_received = 0  # what telemetry reads

    def request(self, header: dict, frames: list | tuple = ()) -> tuple[dict, list]:
        if header.get("type") != "op" or header.get("ops"):
            raise RuntimeError("the in-process stand-in answers single ops only (mode rpc)")
        data = pack({"id": 1, **header})
        self.messages += 1
        self.bytes_sent += len(data)
        start = time.perf_counter_ns()
        request = unpack(data)
        self.executor.free(request.get("free") or [])
        result, out_frames = self.executor.run(
            request["op"], request["args"], request["kwargs"], request["out"],
            request["fetch"], [memoryview(f) for f in frames])
        reply = pack({"id": 1, "ok": True, "result": result})
        self.server_ns += time.perf_counter_ns() - start
        self.bytes_received += len(reply)
        return unpack(reply), out_frames


def profile_op(case: Case, session: rrto_lab.Session, bare: Callable[[], None],
               remote: dict[int, torch.Tensor], ops: int) -> dict:
    """Split one op's time: transport, rrto's CPU work on each side, and a cProfile of it."""
    result: dict[str, Any] = {"ops": ops, "call": case.what}
    for name, call in (("rrto", case.call), ("bare_zmq", bare)):
        cpu, wall = time.process_time(), time.perf_counter()
        timed(call, ops)
        result[f"{name}_wall_us"] = (time.perf_counter() - wall) / ops * 1e6
        result[f"{name}_process_cpu_us"] = (time.process_time() - cpu) / ops * 1e6
    connection, session.connection = session.connection, InProcessServer(remote)
    try:
        in_process = session.connection
        timed(case.call, 200)
        in_process.server_ns = 0
        result["in_process_work_us"] = statistics.median(timed(case.call, ops)) / 1000
        result["in_process_server_us"] = in_process.server_ns / ops / 1000
        # The same work after the thread slept, as it does while waiting for each reply.
        result["in_process_work_after_100us_sleep_us"] = statistics.median(
            timed(case.call, min(ops, 2000), pause_s=100e-6)) / 1000
        result["cprofile_in_process"] = cprofile(case.call, ops, ("tottime", 20),
                                                 ("cumulative", 30))
    finally:
        session.connection = connection
    result["cprofile_over_loopback"] = cprofile(case.call, ops, ("tottime", 8))
    return result


def cprofile(call: Callable[[], Any], ops: int, *orders: tuple[str, int]) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(timed, call, ops)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    for key, lines in orders:
        stats.sort_stats(key).print_stats(lines)
    return text.getvalue()


# -- output ------------------------------------------------------------------------------------
def table(result: dict) -> str:
    s = result["settings"]
    lines = [f"rrto rpc overhead: {s['ops']} calls per case after {s['warmup']} warm-up, "
             f"{s['size_bytes']}-byte tensor, server {s['server']} ({s['server_device']})",
             f"{'case':<7} {'call':<25} {'bytes up':>10} {'bytes down':>10} "
             f"{'rrto med':>10} {'p90':>7} {'zmq med':>9} {'p90':>7} {'ratio':>6}"]
    for r in result["rows"]:
        w, a, b = r["wire_bytes"], r["rrto"], r["bare_zmq"]
        up = f"{w['header_up']}+{w['payload_up']}"
        down = f"{w['header_down']}+{w['payload_down']}"
        lines.append(
            f"{r['case']:<7} {r['call']:<25} {up:>10} {down:>10} {a['median_us']:>8.1f}us "
            f"{a['p90_us']:>7.1f} {b['median_us']:>7.1f}us {b['p90_us']:>7.1f} "
            f"{r['ratio']:>5.2f}x")
    lines.append("bytes: header+payload of one message; ratio: rrto / bare zmq, the median of "
                 "the per-round ratios")
    lines.append(f"overhead rrto op / bare zmq: {result['ratio']:.2f}x (aim: under {AIM}x)")
    floors = [r["bare_zmq_median_us"] for row in result["rows"] for r in row["rounds"]]
    if max(floors) > 2 * min(floors):
        lines.append(f"note: the bare round trip itself ranged from {min(floors):.0f} to "
                     f"{max(floors):.0f} us over the run (the machine's speed changed);\n"
                     "      each ratio compares rounds run side by side, but moves with that floor")
    return "\n".join(lines)


def profile_report(p: dict) -> str:
    work, server = p["in_process_work_us"], p["in_process_server_us"]
    return "\n".join([
        f"\nwhere the time of {p['call']} goes ({p['ops']} calls, per call):",
        f"  over loopback: rrto {p['rrto_wall_us']:.1f} us wall, "
        f"{p['rrto_process_cpu_us']:.1f} us CPU in this process; bare zmq "
        f"{p['bare_zmq_wall_us']:.1f} us wall, {p['bare_zmq_process_cpu_us']:.1f} us CPU",
        f"  rrto's work with no sockets, both sides in this process: {work:.1f} us "
        f"(client {work - server:.1f} us, server decode/run/encode {server:.1f} us); the same "
        f"work right after a 100 us sleep: {p['in_process_work_after_100us_sleep_us']:.1f} us",
        "cProfile, no sockets:", p["cprofile_in_process"],
        "cProfile, over loopback:", p["cprofile_over_loopback"]])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rpc_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=3000, help="timed calls per case (default: 3000)")
    p.add_argument("--warmup", type=int, default=300, help="untimed calls first (default: 300)")
    p.add_argument("--rounds", type=int, default=10,
                   help="alternations of rrto and bare loops (default: 10)")
    p.add_argument("--size", type=int, default=4096,
                   help="bytes of the float32 tensor operated on and moved (default: 4096)")
    p.add_argument("--address", default=None,
                   help="use this running rrto-server instead of starting one on loopback "
                        "(its token, if any, from RRTO_TOKEN)")
    p.add_argument("--device", default="cpu",
                   help="--device of the rrto-server started here (default: cpu)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="where the JSON goes (default: benchmarks/results/rpc_overhead.json)")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile the client's op loop and time the server's work per op")
    p.add_argument("--echo", metavar="LISTEN", help=argparse.SUPPRESS)  # the bare twin's echo
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.echo:
        serve_echo(args.echo)
        return 0
    if args.size < 4 or args.size % 4 or args.ops < args.rounds:
        parser().error("--size must be a positive multiple of 4 (float32) and --ops >= --rounds")
    result = run(args)
    print(table(result))
    if result["profile"]:
        print(profile_report(result["profile"]))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
