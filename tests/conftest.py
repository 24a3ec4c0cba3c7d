"""Fixtures: a real ``rrto-server`` process on loopback, and sessions connected to it."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import rrto_lab
from rrto_lab.child import Child

READY = "rrto-server listening on "


def start_server(*extra: str, listen: str = "tcp://127.0.0.1:0") -> tuple[Child, str]:
    """Start ``python -m rrto_server`` and wait for its ready line; return (child, address)."""
    child = Child([sys.executable, "-m", "rrto_server", "--listen", listen, "--device", "cpu",
                   "--exit-with-parent", "--threads", "1", *extra], READY, what="rrto-server")
    return child, child.ready.split(" device=")[0]


def stop_server(child: Child) -> None:
    child.stop()


@pytest.fixture(scope="session")
def server_address():
    """One server process for the whole run (tests that kill servers start their own)."""
    proc, address = start_server()
    yield address
    stop_server(proc)


@pytest.fixture(params=rrto_lab.MODES)
def session(server_address, request):
    """An active session on the shared server, in each mode; closed (torch restored) after."""
    s = rrto_lab.connect(server_address, mode=request.param, timeout_s=30)
    s.activate()
    yield s
    s.close()
    assert not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"torch {torch.__version__}, rrto server spawned per run, pid {os.getpid()}"
