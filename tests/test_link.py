"""The emulated link: delay and bandwidth are added, bytes arrive intact and in order."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time

import pytest
import torch
import zmq

import rrto_lab
from rrto_lab.link import LinkProcess, LinkSpec


@pytest.fixture
def echo():
    """A ZeroMQ ROUTER that echoes every message, served from a thread."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    poller_stop = ctx.socket(zmq.PAIR)
    poller_stop.bind("inproc://stop")

    def serve():
        stop = ctx.socket(zmq.PAIR)
        stop.connect("inproc://stop")
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(stop, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if stop in ready:
                break
            router.send_multipart(router.recv_multipart())
        stop.close(0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}", ctx
    poller_stop.send(b"")
    thread.join(5)
    poller_stop.close(0)
    router.close(0)
    ctx.term()


def _round_trips(ctx, address: str, payload: bytes, n: int) -> list[float]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(address)
    times = []
    for i in range(n + 2):
        began = time.perf_counter()
        dealer.send(payload)
        assert dealer.poll(10_000), "no echo through the link"
        assert dealer.recv() == payload
        if i >= 2:  # the first ones include connecting
            times.append(time.perf_counter() - began)
    dealer.close(0)
    return times


def test_help_and_bad_addresses():
    out = subprocess.run([sys.executable, "-m", "rrto_lab.link", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for option in ("--listen", "--upstream", "--rtt-ms", "--mbps"):
        assert option in out
    bad = subprocess.run([sys.executable, "-m", "rrto_lab.link", "--upstream", "ipc:///x"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "TCP only" in bad.stderr
    with pytest.raises(ValueError, match="rtt_ms >= 0"):
        LinkSpec(rtt_ms=-1)


@pytest.mark.parametrize("rtt_ms", [5.0, 20.0])
def test_round_trip_adds_the_configured_delay(echo, rtt_ms):
    address, ctx = echo
    direct = statistics.median(_round_trips(ctx, address, b"x" * 100, 10))
    link = LinkProcess(address, LinkSpec(rtt_ms=rtt_ms))
    try:
        through = statistics.median(_round_trips(ctx, link.address, b"x" * 100, 10))
    finally:
        link.stop()
    added_ms = (through - direct) * 1000
    assert added_ms >= rtt_ms * 0.95  # never faster than the setting
    assert added_ms < rtt_ms * 3  # and not grossly slower (the benchmark reports precision)


def test_bandwidth_paces_large_messages_intact(echo):
    address, ctx = echo
    link = LinkProcess(address, LinkSpec(rtt_ms=1.0, mbps=100.0))
    try:
        payload = bytes(range(256)) * 2048  # 512 KiB, intact and in order through the link
        took = statistics.median(_round_trips(ctx, link.address, payload, 3))
    finally:
        link.stop()
    serialise_s = 2 * len(payload) * 8 / 100e6  # there and back at 100 Mbit/s
    assert took >= serialise_s * 0.95


def test_connect_with_a_link_puts_the_embedded_server_behind_it(monkeypatch):
    monkeypatch.delenv("RRTO_SERVER", raising=False)
    s = rrto_lab.connect(mode="rpc", link={"rtt_ms": 10, "mbps": 50})
    link_proc = s._link.process
    try:
        assert s.link == LinkSpec(10, 50) and s.address != s.embedded.address
        with s:
            x = torch.arange(4.0, device="cuda")
            began = time.perf_counter()
            assert (x + 1).sum().item() == 10.0
            took = time.perf_counter() - began
        assert took >= 2 * 0.010 * 0.95  # two ops in mode rpc: two round trips of >= 10 ms
    finally:
        s.close()
    assert link_proc.poll() is not None and s.embedded.process.poll() is not None
