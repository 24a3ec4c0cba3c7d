"""``rrto-link``: an emulated network link, a user-space TCP proxy with delay and bandwidth.

The kernel's netem is not available everywhere (not on our CI machines), so benchmarks and
teaching notebooks put this proxy between a client and a server. Each direction is modelled as
a link of ``mbps`` megabits per second followed by a one-way propagation delay of ``rtt_ms/2``:
a chunk read at time ``t`` finishes serialising at ``max(t, previous) + len/bandwidth`` and is
delivered one delay later. Delays and pacing are per direction and per connection; bytes are
never reordered or dropped.

    rrto-link --listen tcp://127.0.0.1:6000 --upstream tcp://127.0.0.1:5555 --rtt-ms 10 --mbps 50

From Python, ``rrto_lab.connect(link={"rtt_ms": 10, "mbps": 50})`` starts the embedded server
behind one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

from rrto_lab.child import Child

log = logging.getLogger("rrto_lab.link")
READY = "rrto-link listening on "
CHUNK = 64 * 1024
_SPIN_S = 0.0002
# Forwarding a chunk (a read, a hand-over between threads, a write) takes about this long on
# the development VM; it is taken off each way's delay so that a round trip through the link
# measures the setting (python -m benchmarks.link_calibration shows the error per setting).
_FORWARDING_S = 40e-6


@dataclass(frozen=True)
class LinkSpec:
    """A link's round-trip time (ms) and bandwidth (Mbit/s; 0 means unlimited)."""

    rtt_ms: float = 0.0
    mbps: float = 0.0

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.mbps < 0:
            raise ValueError(f"a link needs rtt_ms >= 0 and mbps >= 0, got {self}")

    @property
    def one_way_s(self) -> float:
        """The delay to add each way: half the RTT, less what forwarding itself costs."""
        return max(self.rtt_ms / 2000.0 - _FORWARDING_S, 0.0)

    @property
    def bytes_per_s(self) -> float:
        return self.mbps * 1e6 / 8 if self.mbps > 0 else float("inf")


def _host_port(address: str) -> tuple[str, int]:
    if not address.startswith("tcp://"):
        raise ValueError(f"{address!r}: rrto-link forwards TCP only (tcp://HOST:PORT)")
    host, _, port = address[len("tcp://"):].rpartition(":")
    return host.strip("[]"), int(port)


def _pipe(src: socket.socket, dst: socket.socket, spec: LinkSpec) -> None:
    """Carry one direction: read, pace, delay, write — in order. Threads, not asyncio: an
    event loop's timers round to whole milliseconds, too coarse for a 5 ms link."""
    chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def deliver() -> None:
        while True:
            due, data = chunks.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > _SPIN_S:
                time.sleep(wait - _SPIN_S)  # the OS wakes us late by tens of microseconds,
            while time.monotonic() < due:  # so the last stretch is waited out on the CPU
                pass
            try:
                dst.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=deliver, daemon=True)
    sender.start()
    busy_until = 0.0
    try:
        while data := src.recv(CHUNK):
            busy_until = max(time.monotonic(), busy_until) + len(data) / spec.bytes_per_s
            chunks.put((busy_until + spec.one_way_s, data))
    except OSError:
        pass
    finally:
        chunks.put((0.0, b""))
        sender.join()


def _connection(client: socket.socket, upstream: tuple[str, int], spec: LinkSpec) -> None:
    try:
        server = socket.create_connection(upstream)
    except OSError as e:
        log.warning("rrto-link: cannot reach %s:%s: %s", *upstream, e)
        client.close()
        return
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pipe, args=(server, client, spec), daemon=True)
    back.start()
    _pipe(client, server, spec)
    back.join()
    client.close()
    server.close()


def serve(listen: str, upstream: str, spec: LinkSpec) -> tuple[socket.socket, str]:
    """Bind ``listen``; return the socket and its address (accept with :func:`accept_forever`)."""
    host, port = _host_port(listen)
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host
                                else socket.AF_INET)
    bound = sock.getsockname()
    return sock, f"tcp://{bound[0]}:{bound[1]}"


def accept_forever(sock: socket.socket, upstream: str, spec: LinkSpec) -> None:
    target = _host_port(upstream)
    while True:
        try:
            client, _ = sock.accept()
        except OSError:
            return
        threading.Thread(target=_connection, args=(client, target, spec), daemon=True).start()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rrto-link", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="tcp://127.0.0.1:0", metavar="ADDR",
                   help="tcp://HOST:PORT to accept clients on; port 0 picks a free one, shown "
                        "in the ready line (default: %(default)s)")
    p.add_argument("--upstream", required=True, metavar="ADDR",
                   help="tcp://HOST:PORT of the server to forward to")
    p.add_argument("--rtt-ms", type=float, default=0.0,
                   help="round-trip time to add, in milliseconds (half each way)")
    p.add_argument("--mbps", type=float, default=0.0,
                   help="bandwidth of each direction in Mbit/s; 0 = unlimited")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        spec = LinkSpec(args.rtt_ms, args.mbps)
        _host_port(args.listen), _host_port(args.upstream)
    except ValueError as e:
        print(f"rrto-link: {e}", file=sys.stderr)
        return 2
    try:
        sock, address = serve(args.listen, args.upstream, spec)
    except OSError as e:
        print(f"rrto-link: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sock.close())
    print(f"{READY}{address} upstream={args.upstream} rtt_ms={spec.rtt_ms:g} "
          f"mbps={spec.mbps:g}", flush=True)
    try:
        accept_forever(sock, args.upstream, spec)
    except KeyboardInterrupt:
        pass
    return 0


# `python -m rrto_lab.link` would warn: importing the package already imported this module.
_RUN = "import sys; from rrto_lab.link import main; sys.exit(main())"


class LinkProcess(Child):
    """An ``rrto-link`` child process in front of ``upstream``; its address once ready."""

    def __init__(self, upstream: str, spec: LinkSpec, timeout_s: float = 30.0) -> None:
        self.spec = spec
        super().__init__([sys.executable, "-c", _RUN, "--upstream", upstream,
                          "--rtt-ms", str(spec.rtt_ms), "--mbps", str(spec.mbps)],
                         READY, timeout_s, what="rrto-link")
        self.address = self.ready.split()[0]


if __name__ == "__main__":
    raise SystemExit(main())
