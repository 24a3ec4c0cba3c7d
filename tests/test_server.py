"""The server as a lab runs it, and every fault a client can meet: real processes, real sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import msgpack
import pytest
import torch
import zmq

import rrto_lab
from rrto_server.protocol import Handle, pack, unpack
from tests.conftest import start_server, stop_server


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RawClient:
    """Speaks the wire protocol directly, to send what a well-behaved client never would."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send_raw(self, *frames: bytes) -> dict:
        self.sock.send_multipart(list(frames))
        assert self.sock.poll(10_000), "the server did not answer"
        return unpack(self.sock.recv_multipart()[0])

    def request(self, header: dict) -> dict:
        return self.send_raw(pack(header))

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def raw(server_address):
    client = RawClient(server_address)
    yield client
    client.close()


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "rrto_server", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for option in ("--listen", "--device", "--token", "--token-file", "--session-timeout",
                   "--threads", "--exit-with-parent", "--log-level", "--version"):
        assert option in out
    assert "auto" in out and "cuda:N" in out


def test_ready_line_names_the_port_picked(server_address):
    assert server_address.startswith("tcp://127.0.0.1:")
    assert int(server_address.rsplit(":", 1)[1]) > 0


def test_console_script_and_bad_device():
    done = subprocess.run(["rrto-server", "--device", "cuda:3"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "--device cuda:3" in done.stderr


def test_server_not_there_is_a_clear_error_within_the_timeout():
    address = f"tcp://127.0.0.1:{_free_tcp_port()}"
    began = time.monotonic()
    with pytest.raises(rrto_lab.ServerUnavailable, match=address.replace(".", r"\.")):
        rrto_lab.connect(address, timeout_s=1.0)
    assert time.monotonic() - began < 10  # bounded: no hang


def test_an_op_the_server_cannot_run_raises_at_that_op(server_address, session):
    a = torch.randn(2, 3, device="cuda")
    with pytest.raises(rrto_lab.RemoteError) as info:
        torch.mm(a, a)
    assert info.value.op == "mm" and "mat1 and mat2 shapes cannot be multiplied" in str(info.value)
    assert isinstance(info.value, RuntimeError)  # code that catches RuntimeError still does
    # the session and the server carry on, and so does another session
    assert torch.equal((a * 0).cpu(), torch.zeros(2, 3))
    other = rrto_lab.connect(server_address)
    with pytest.raises(rrto_lab.RrtoError):
        other.activate()  # one active session per process
    session.deactivate()
    with other:
        assert torch.ones(2, device="cuda").sum().item() == 2.0
    other.close()


@pytest.mark.parametrize("frames, expect", [
    ((b"\xc1garbage",), "undecodable header"),
    ((msgpack.packb([1, 2, 3]),), "must be a map"),
    ((msgpack.packb({"v": 99, "id": 1, "type": "hello"}),), "protocol version"),
    ((), "empty message"),
])
def test_malformed_messages_get_an_error_answer(raw, frames, expect):
    if not frames:
        raw.sock.send(b"", zmq.SNDMORE)
        reply = raw.send_raw(b"")
        expect = "undecodable header"
    else:
        reply = raw.send_raw(*frames)
    assert reply["ok"] is False and expect in reply["error"]["message"]
    assert raw.request({"id": 2, "type": "hello"})["ok"]  # still up


def test_only_aten_ops_run_and_handles_are_per_session(raw):
    sid = raw.request({"id": 1, "type": "hello"})["sid"]
    for name in ("os.system", "__import__", "__class__", "_ops.aten", "nonexistent_op"):
        reply = raw.request({"id": 2, "type": "op", "sid": sid, "op": name, "args": [],
                             "kwargs": {}, "out": 1})
        assert not reply["ok"] and reply["error"]["type"] == "ProtocolError", name
    made = raw.request({"id": 3, "type": "op", "sid": sid, "op": "ones", "args": [[2]],
                        "kwargs": {}, "out": 1})
    assert made["ok"]
    other = raw.request({"id": 4, "type": "hello"})["sid"]
    stolen = raw.request({"id": 5, "type": "op", "sid": other, "op": "neg", "args": [Handle(1)],
                          "kwargs": {}, "out": 7})
    assert not stolen["ok"] and "unknown to this session" in stolen["error"]["message"]
    unknown = raw.request({"id": 6, "type": "op", "sid": "0" * 32, "op": "neg", "args": [],
                           "kwargs": {}, "out": 1})
    assert not unknown["ok"] and "no such session" in unknown["error"]["message"]
    reused = raw.request({"id": 7, "type": "op", "sid": sid, "op": "ones", "args": [[2]],
                          "kwargs": {}, "out": 1})
    assert not reused["ok"] and "already in use" in reused["error"]["message"]
    bye = raw.request({"id": 8, "type": "bye", "sid": sid})
    assert bye["ok"] and bye["result"]["freed"] == 1


def test_tensors_are_freed_when_the_client_drops_them(session):
    base = torch.cuda.memory_allocated()
    x = torch.empty(1 << 18, device="cuda")
    assert torch.cuda.memory_allocated() == base + (1 << 20)
    view = x[10:]
    del x
    assert torch.cuda.memory_allocated() == base + (1 << 20)  # the view keeps the storage
    del view
    assert torch.cuda.memory_allocated() == base
    assert session.stats()["live_tensors"] == 0


def test_token_is_required_before_any_op():
    proc, address = start_server("--token", "s3cret")
    try:
        with pytest.raises(rrto_lab.RemoteError, match="authentication failed"):
            rrto_lab.connect(address, token="wrong")
        with pytest.raises(rrto_lab.RemoteError, match="authentication failed"):
            rrto_lab.connect(address)
        s = rrto_lab.connect(address, token="s3cret")
        with s:
            assert torch.ones(1, device="cuda").item() == 1.0
        s.close()
    finally:
        stop_server(proc)


def test_server_gone_mid_session_raises_not_hangs():
    proc, address = start_server()
    s = rrto_lab.connect(address, timeout_s=1.0)
    try:
        with s:
            x = torch.ones(3, device="cuda")
            stop_server(proc)
            with pytest.raises(rrto_lab.ServerUnavailable, match="no answer"):
                (x + 1).cpu()
    finally:
        s.connection.timeout_s = 0.2
        s.close()
    assert not torch.cuda.is_available()


def test_silent_session_is_freed_after_the_timeout():
    proc = subprocess.Popen(
        [sys.executable, "-m", "rrto_server", "--listen", "tcp://127.0.0.1:0", "--device", "cpu",
         "--session-timeout", "1", "--log-level", "INFO"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().split(" on ")[1].split(" ")[0]
        client = RawClient(address)
        sid = client.request({"id": 1, "type": "hello"})["sid"]
        deadline = time.monotonic() + 30
        line = ""
        while "no heartbeat" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()  # blocks until the server logs something
        assert "no heartbeat" in line and sid[:8] in line
        reply = client.request({"id": 2, "type": "ping", "sid": sid})
        assert not reply["ok"] and "no such session" in reply["error"]["message"]
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_embedded_server_starts_on_demand_and_ends_with_the_session(monkeypatch):
    monkeypatch.delenv("RRTO_SERVER", raising=False)
    s = rrto_lab.connect()
    child = s.embedded.process
    assert s.address.startswith("tcp://127.0.0.1:") and child.poll() is None
    assert s.embedded.token  # loopback, but only this process knows the token
    with s:
        assert torch.arange(4, device="cuda").sum().item() == 6
    s.close()
    assert child.poll() is not None


def test_rrto_server_environment_variable(server_address, monkeypatch):
    monkeypatch.setenv("RRTO_SERVER", server_address)
    s = rrto_lab.connect()
    assert s.address == server_address and s.embedded is None
    s.close()
