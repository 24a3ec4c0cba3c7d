"""How exactly ``rrto-link`` adds its delay and paces its bandwidth.

    python -m benchmarks.link_calibration [--rounds 40] [--out PATH]

Round trips of a small message to an echo server, directly and through links of 1, 5 and 20 ms;
the delay a link adds is the difference of the medians, shown against its setting (the aim:
within 10%). Then 256 KiB each way through a 100 Mbit/s link, against the time the bytes need.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import zmq

from benchmarks import write_json
from benchmarks.rpc_overhead import ECHO_READY, REPLY_SIZES
from rrto_lab.child import Child
from rrto_lab.link import LinkProcess, LinkSpec


def round_trips(address: str, up: int, down: int, rounds: int) -> list[float]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    frames = [REPLY_SIZES.pack(16, down).ljust(16, b"\0")] + ([bytes(up)] if up else [])
    times = []
    try:
        for i in range(rounds + 3):
            began = time.perf_counter()
            sock.send_multipart(frames)
            if not sock.poll(30_000):
                raise RuntimeError(f"no echo from {address}")
            sock.recv_multipart()
            if i >= 3:
                times.append(time.perf_counter() - began)
    finally:
        sock.close(0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.link_calibration",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", default="benchmarks/results/link_calibration.json")
    args = p.parse_args(argv)
    echo = Child([sys.executable, "-m", "benchmarks.rpc_overhead", "--echo",
                  "tcp://127.0.0.1:0"], ECHO_READY, what="the echo server")
    address = echo.ready.split()[0]
    rows = []
    try:
        direct = statistics.median(round_trips(address, 0, 0, args.rounds))
        big = 256 * 1024
        direct_big = statistics.median(round_trips(address, big, big, 5))
        cases = [(LinkSpec(rtt, 0), 0) for rtt in (1.0, 5.0, 20.0)]
        cases.append((LinkSpec(1.0, 100.0), big))
        for spec, size in cases:
            link = LinkProcess(address, spec)
            try:
                through = statistics.median(round_trips(link.address, size, size,
                                                        args.rounds if not size else 5))
            finally:
                link.stop()
            added_ms = (through - (direct_big if size else direct)) * 1e3
            want_ms = spec.rtt_ms + (2 * size * 8 / (spec.mbps * 1e6) * 1e3 if size else 0.0)
            rows.append({"rtt_ms": spec.rtt_ms, "mbps": spec.mbps, "bytes_each_way": size,
                         "expected_ms": want_ms, "added_ms": added_ms,
                         "error": added_ms / want_ms - 1})
    finally:
        echo.stop()
    print(f"direct round trip (median): {direct * 1e3:.3f} ms")
    print(f"{'rtt ms':>7} {'Mbit/s':>7} {'bytes':>8} {'expected ms':>12} {'added ms':>9} "
          f"{'error':>7}")
    for r in rows:
        print(f"{r['rtt_ms']:>7g} {r['mbps'] or '-':>7} {r['bytes_each_way']:>8} "
              f"{r['expected_ms']:>12.3f} {r['added_ms']:>9.3f} {r['error']:>+7.1%}")
    write_json(args.out, {"direct_ms": direct * 1e3, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
