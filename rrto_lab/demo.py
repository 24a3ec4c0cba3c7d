"""``python -m rrto_lab.demo``: a small CNN's inference loop, run locally and through rrto.

It starts the embedded server (or uses ``RRTO_SERVER`` / ``--server``), runs unmodified model
code (``model.cuda()``, ``model(x.cuda()).cpu()``) and prints, per inference, the ops
intercepted, the round trips paid and the latency, next to the local result and whether the two
agree.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import rrto_lab


class SmallCNN(nn.Module):
    """A ResNet-flavoured CNN for 3x32x32 images: conv, batch norm, residual, pooling, head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x)


def run_mode(mode: str, server: str | None, model: nn.Module, inputs: list[torch.Tensor],
             local: list[torch.Tensor]) -> bool:
    """Run the loop in one mode; print one row per inference; return whether all agreed."""
    session = rrto_lab.connect(server, mode=mode)
    print(f"\nmode {mode}: server {session.address}, remote device "
          f"{session.device_info['name']}")
    print(f"{'inference':>9} {'phase':>7} {'ops':>5} {'RPCs':>5} {'latency ms':>11} "
          f"{'top-1 local':>12} {'top-1 rrto':>11} {'max |diff|':>11}  agree")
    all_agree = True
    with session, torch.no_grad():
        remote_model = copy.deepcopy(model).cuda()  # unmodified user code from here on
        for i, x in enumerate(inputs):
            before = session.stats()
            rows = len(session.inferences)
            began = time.perf_counter()
            y = remote_model(x.cuda()).cpu()
            latency_ms = (time.perf_counter() - began) * 1000
            after = session.stats()
            phase = "+".join(sorted({r["phase"] for r in session.inferences[rows:]}))
            diff = (y - local[i]).abs().max().item()
            agree = torch.allclose(y, local[i], atol=1e-5)
            all_agree &= agree
            print(f"{i:>9} {phase:>7} {after['ops'] - before['ops']:>5} "
                  f"{after['rpcs'] - before['rpcs']:>5} {latency_ms:>11.2f} "
                  f"{str(local[i].argmax(1).tolist()):>12} {str(y.argmax(1).tolist()):>11} "
                  f"{diff:>11.2e}  {'yes' if agree else 'NO'}")
        del remote_model
    session.close()
    return all_agree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rrto_lab.demo", description=__doc__)
    p.add_argument("--server", default=None,
                   help="rrto-server address (default: RRTO_SERVER, else an embedded server)")
    p.add_argument("--modes", default="rpc,rrto",
                   help="modes to run, comma-separated (default: %(default)s)")
    p.add_argument("--inferences", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = SmallCNN().eval()
    inputs = [torch.randn(args.batch, 3, 32, 32) for _ in range(args.inferences)]
    with torch.no_grad():
        local = [model(x) for x in inputs]
    print("starting rrto sessions (the embedded server unless --server / RRTO_SERVER) ...")
    agree = all([run_mode(mode, args.server, model, inputs, local)
                 for mode in args.modes.split(",")])
    print(f"\nrrto results {'equal' if agree else 'DIFFER FROM'} the local results "
          "(torch.allclose, atol=1e-5). Mode rpc pays one round trip per op; in mode rrto, "
          "once the operator sequence is found (phase replay), one per inference.")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
