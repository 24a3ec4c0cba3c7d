"""The embedded server: an ``rrto-server`` child process on a private loopback endpoint.

It is what makes ``rrto_lab.connect()`` work on a laptop with no configuration. It listens on
loopback TCP (so an emulated link can be put in front of it at any time) and requires a random
token only this process knows. The child runs with ``--exit-with-parent``, so it ends with the
kernel even if the kernel is killed; a session ends it when it closes.
"""

from __future__ import annotations

import logging
import os
import secrets
import selectors
import subprocess
import sys
import time

from rrto_lab.errors import ServerUnavailable

log = logging.getLogger("rrto_lab.embedded")
READY = "rrto-server listening on "


class EmbeddedServer:
    """Start an ``rrto-server`` child and learn its address from its ready line."""

    def __init__(self, device: str = "auto", timeout_s: float = 60.0) -> None:
        self.token = secrets.token_hex(16)
        cmd = [sys.executable, "-m", "rrto_server", "--listen", "tcp://127.0.0.1:0", "--device",
               device, "--exit-with-parent", "--session-timeout", "0"]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                        stdin=subprocess.DEVNULL,
                                        env={**os.environ, "RRTO_SERVER_TOKEN": self.token})
        self.address, self.device_name = self._wait_ready(timeout_s)
        log.info("embedded rrto-server (pid %d) on %s", self.process.pid, self.address)

    def _wait_ready(self, timeout_s: float) -> tuple[str, str]:
        assert self.process.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.stop()
                    raise ServerUnavailable(
                        f"the embedded rrto-server did not start within {timeout_s:g} s")
                line = self.process.stdout.readline()
                if not line:
                    code = self.process.wait()
                    raise ServerUnavailable(
                        f"the embedded rrto-server exited with status {code} before it was "
                        "ready; its error is on the kernel's stderr")
                if line.startswith(READY):
                    address, _, device = line[len(READY):].strip().partition(" device=")
                    return address, device
        finally:
            sel.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
