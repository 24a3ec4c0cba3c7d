"""The non-transparent baseline: a server that holds the model and runs it on each input.

This is offloading without transparency (the paper's lower bound): the client sends only the
input tensor, the server — which built the same model by name from ``_models`` — runs it and
sends the output back: one round trip per inference, no per-op traffic. Not part of rrto: a
benchmark fixture, so it reuses the wire protocol's tensor framing and nothing else.

    python -m benchmarks._nontransparent --listen tcp://127.0.0.1:0
"""

from __future__ import annotations

import argparse
import sys

import msgpack
import torch
import zmq

from benchmarks._models import MODELS, build
from rrto_server.device import pick_device
from rrto_server.protocol import TensorMeta, tensor_from_frame, tensor_to_frame

READY = "nontransparent listening on "


def _meta(meta: TensorMeta) -> list:
    return [str(meta.dtype).removeprefix("torch."), list(meta.shape), list(meta.stride)]


def _unmeta(fields: list) -> TensorMeta:
    return TensorMeta(getattr(torch, fields[0]), tuple(fields[1]), tuple(fields[2]), 0)


def serve(listen: str, device: str) -> None:
    dev = pick_device(device)
    models: dict[str, torch.nn.Module] = {}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(listen)
    print(READY + sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    while True:
        identity, header, frame = sock.recv_multipart()
        request = msgpack.unpackb(header)
        name = request["model"]
        if name not in MODELS:
            sock.send_multipart([identity, msgpack.packb({"error": f"no model {name!r}"}), b""])
            continue
        if name not in models:
            models[name] = build(name).to(dev)
        x = tensor_from_frame(_unmeta(request["input"]), frame).to(dev)
        with torch.no_grad():
            y = models[name](x).cpu()
        meta, out = tensor_to_frame(y)
        sock.send_multipart([identity, msgpack.packb({"output": _meta(meta)}), out])


class Client:
    """Send an input, get the output: one round trip."""

    def __init__(self, address: str, timeout_s: float = 120.0) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        self.sock.connect(address)
        self.bytes_sent = self.bytes_received = 0

    def infer(self, model: str, x: torch.Tensor) -> torch.Tensor:
        meta, frame = tensor_to_frame(x)
        header = msgpack.packb({"model": model, "input": _meta(meta)})
        self.sock.send_multipart([header, frame])
        self.bytes_sent += len(header) + frame.nbytes
        reply, out = self.sock.recv_multipart()
        self.bytes_received += len(reply) + len(out)
        answer = msgpack.unpackb(reply)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return tensor_from_frame(_unmeta(answer["output"]), out)

    def close(self) -> None:
        self.sock.close(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="tcp://127.0.0.1:0")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    serve(args.listen, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
