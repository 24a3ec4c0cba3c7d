"""Child processes that announce themselves: start, wait for the ready line, stop.

The embedded server and the emulated link (and the tests and benchmarks that start servers)
all run a child that prints one line starting with a known prefix once it is listening. Waiting
is bounded; a child that exits or stays silent is stopped and reported, never waited on forever.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time


class ChildError(RuntimeError):
    """A child process that did not become ready."""


class Child:
    """A child process started with ``cmd``; :attr:`ready` is its ready line after ``prefix``."""

    def __init__(self, cmd: list[str], prefix: str, timeout_s: float = 60.0,
                 env: dict[str, str] | None = None, what: str | None = None) -> None:
        self.what = what or cmd[0]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                        stdin=subprocess.DEVNULL,
                                        env={**os.environ, **env} if env else None)
        self.ready = self._wait(prefix, timeout_s)

    def _wait(self, prefix: str, timeout_s: float) -> str:
        assert self.process.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.stop()
                    raise ChildError(f"{self.what} did not start within {timeout_s:g} s")
                line = self.process.stdout.readline()
                if not line:
                    code = self.process.wait()
                    self.stop()
                    raise ChildError(f"{self.what} exited with status {code} before it was "
                                     "ready; its error is on stderr")
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
        finally:
            sel.close()

    def stop(self) -> None:
        """Terminate, then kill if it does not end within 5 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
