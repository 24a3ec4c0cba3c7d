"""``rrto-server``: the command a lab runs on its GPU machine (and the embedded server runs)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings

import torch

from rrto_server import __version__
from rrto_server.server import Server, ServerConfig

DESCRIPTION = """\
Run forwarded PyTorch (ATen) operators on this machine's device for rrto clients.
Clients connect with rrto_lab.connect("tcp://HOST:PORT", token=...), %config Rrto.server,
or the RRTO_SERVER environment variable."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rrto-server", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="tcp://127.0.0.1:5555", metavar="ADDR",
                   help="ZeroMQ endpoint to bind: tcp://HOST:PORT (port 0 picks a free one and "
                        "the ready line shows it) or ipc:///path/to/socket "
                        "(default: %(default)s; use tcp://0.0.0.0:PORT to serve a lab network)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="where ops run: auto (CUDA if present, else CPU), cpu, cuda or cuda:N "
                        "(default: %(default)s)")
    p.add_argument("--token", default=None,
                   help="shared secret clients must present before any op runs; prefer "
                        "--token-file or RRTO_SERVER_TOKEN, which do not show in `ps`")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="read the token from the first line of this file")
    p.add_argument("--session-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="free a session's tensors after this long without any request or "
                        "heartbeat; 0 keeps sessions forever (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads for ops on the CPU (torch.set_num_threads); 0 keeps "
                        "torch's default. Use 1 when clients share this machine's cores "
                        "(default: %(default)s)")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="stop when the process that started this one exits (used by the "
                        "embedded server a notebook starts)")
    p.add_argument("--log-level", default="WARNING",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging detail on stderr (default: %(default)s)")
    p.add_argument("--version", action="version", version=f"rrto-server {__version__}")
    return p


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        with open(args.token_file) as f:
            return f.readline().strip()
    return args.token or os.environ.get("RRTO_SERVER_TOKEN") or None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    # Payload frames are read-only ZeroMQ buffers; tensors over them are only ever read.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        token = _token(args)
    except OSError as e:
        print(f"rrto-server: cannot read --token-file: {e}", file=sys.stderr)
        return 2
    config = ServerConfig(listen=args.listen, device=args.device, token=token,
                          session_timeout_s=args.session_timeout,
                          parent_pid=os.getppid() if args.exit_with_parent else None)
    try:
        server = Server(config)
    except ValueError as e:
        print(f"rrto-server: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # zmq.ZMQError for an address in use or malformed
        print(f"rrto-server: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return 2
    if token is None and server.address.startswith("tcp://") and \
            not server.address.startswith(("tcp://127.", "tcp://[::1]", "tcp://localhost")):
        logging.getLogger("rrto_server").warning(
            "listening on %s without a token: anyone who can reach it can run ops",
            server.address)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    print(f"rrto-server listening on {server.address} device={server.info['name']}", flush=True)
    server.serve_forever()
    return 0
