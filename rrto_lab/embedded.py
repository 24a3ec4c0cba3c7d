"""The embedded server: an ``rrto-server`` child process on a private loopback endpoint.

It is what makes ``rrto_lab.connect()`` work on a laptop with no configuration. It listens on
loopback TCP (so an emulated link can be put in front of it at any time) and requires a random
token only this process knows. The child runs with ``--exit-with-parent``, so it ends with the
kernel even if the kernel is killed; a session ends it when it closes.
"""

from __future__ import annotations

import logging
import secrets
import sys

from rrto_lab.child import Child, ChildError
from rrto_lab.errors import ServerUnavailable

log = logging.getLogger("rrto_lab.embedded")
READY = "rrto-server listening on "


class EmbeddedServer(Child):
    """Start an ``rrto-server`` child and learn its address from its ready line."""

    def __init__(self, device: str = "auto", timeout_s: float = 60.0) -> None:
        self.token = secrets.token_hex(16)
        cmd = [sys.executable, "-m", "rrto_server", "--listen", "tcp://127.0.0.1:0", "--device",
               device, "--exit-with-parent", "--session-timeout", "0"]
        try:
            super().__init__(cmd, READY, timeout_s, env={"RRTO_SERVER_TOKEN": self.token},
                             what="the embedded rrto-server")
        except ChildError as e:
            raise ServerUnavailable(str(e)) from None
        self.address, _, self.device_name = self.ready.partition(" device=")
        log.info("embedded rrto-server (pid %d) on %s", self.process.pid, self.address)
