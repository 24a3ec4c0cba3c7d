"""The main job (`make demo`) runs end to end against a real server and reports agreement."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_every_mode_and_agrees(server_address):
    done = subprocess.run([sys.executable, "-m", "rrto_lab.demo", "--server", server_address,
                           "--inferences", "6", "--modes", "rpc,async,rrto"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rrto results equal the local results" in done.stdout
    rows = [ln.split() for ln in done.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(rows) == 18 and all(r[-1] == "yes" for r in rows)
    assert rows[-1][1] == "replay" and rows[-1][3] == "1"  # mode rrto ends replaying, 1 RPC
    assert rows[5][1] == "rpc" and rows[5][3] == rows[5][2]  # mode rpc: one RPC per op
