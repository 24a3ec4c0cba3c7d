"""The rrto wire protocol: one msgpack header frame plus one raw frame per tensor payload.

Both peers import this module and nothing else of each other. A message is a ZeroMQ multipart
message ``[header, payload_0, payload_1, ...]``. The header is a msgpack map with at least
``v`` (protocol version), ``id`` (request id, echoed in the reply) and ``type``. Values inside a
header are plain msgpack data plus the extension types below; tensor bytes never enter the
header, they travel as separate frames referenced by index. Nothing is unpickled or evaluated:
every extension type decodes through a fixed table. See docs/protocol.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

VERSION = 1

# Extension type codes.
EXT_DTYPE = 1  # utf-8 name from DTYPES
EXT_DEVICE = 2  # b"remote" (the server's device) or b"cpu"
EXT_LAYOUT = 3  # utf-8 name from LAYOUTS
EXT_MEMORY_FORMAT = 4  # utf-8 name from MEMORY_FORMATS
EXT_HANDLE = 5  # msgpack int: a tensor the server holds for this session
EXT_PAYLOAD = 6  # msgpack [frame, dtype, shape, stride, storage_offset]: tensor bytes in a frame
EXT_COMPLEX = 7  # msgpack [real, imag]
EXT_NEW_TENSOR = 8  # msgpack [handle, dtype, shape, stride, storage_offset]: an op's new output
EXT_META = 9  # msgpack [dtype, shape, stride, storage_offset]: a predicted output's metadata
EXT_SLOT = 10  # msgpack [kind, step, out]: a template argument filled in at replay time

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32", "float64", "float16", "bfloat16", "complex64", "complex128", "complex32",
        "uint8", "int8", "int16", "int32", "int64", "bool", "uint16", "uint32", "uint64",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
        "qint8", "quint8", "qint32",
    )
    if hasattr(torch, name)
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo, "sparse_csr": torch.sparse_csr}
LAYOUT_NAMES = {layout: name for name, layout in LAYOUTS.items()}
MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
    "preserve_format": torch.preserve_format,
}
MEMORY_FORMAT_NAMES = {fmt: name for name, fmt in MEMORY_FORMATS.items()}

REMOTE = "remote"  # the device name a client uses for "the server's device"
_OP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)?$")


class ProtocolError(ValueError):
    """A message that does not follow the protocol; answered with an error, never fatal."""


@dataclass(frozen=True)
class Handle:
    """A reference to a tensor held by the server for the sending session."""

    id: int


@dataclass(frozen=True)
class TensorMeta:
    """What a peer needs to rebuild a tensor's view: dtype, shape, stride, storage offset."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class Payload:
    """Tensor bytes carried in frame ``frame`` of the message."""

    frame: int
    meta: TensorMeta


@dataclass(frozen=True)
class NewTensor:
    """An op output the server now holds under ``handle``."""

    handle: int
    meta: TensorMeta


@dataclass(frozen=True)
class Slot:
    """A template argument: output ``out`` of step ``step`` of this instance (LOCAL), the next
    carried-over handle of the replay request (CARRIED), or its next input payload (INPUT)."""

    kind: int
    step: int = 0
    out: int = 0


LOCAL, CARRIED, INPUT = 0, 1, 2


@dataclass(frozen=True)
class RemoteDevice:
    """The server's device, as named by a client that cannot know it."""


def meta_of(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())


def _meta_fields(meta: TensorMeta) -> list:
    return [DTYPE_NAMES[meta.dtype], list(meta.shape), list(meta.stride), meta.offset]


def _meta_from(fields: list) -> TensorMeta:
    dtype, shape, stride, offset = fields
    return TensorMeta(_lookup(DTYPES, dtype, "dtype"), tuple(shape), tuple(stride), offset)


def _lookup(table: dict, name: Any, what: str) -> Any:
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ProtocolError(f"unknown {what} {name!r}") from None


def _pack_nested(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _default(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, torch.dtype):
        return msgpack.ExtType(EXT_DTYPE, DTYPE_NAMES[obj].encode())
    if isinstance(obj, RemoteDevice):
        return msgpack.ExtType(EXT_DEVICE, REMOTE.encode())
    if isinstance(obj, torch.device):
        if obj.type != "cpu":
            raise ProtocolError(f"device {obj} cannot cross the wire; use RemoteDevice()")
        return msgpack.ExtType(EXT_DEVICE, b"cpu")
    if isinstance(obj, torch.layout):
        return msgpack.ExtType(EXT_LAYOUT, LAYOUT_NAMES[obj].encode())
    if isinstance(obj, torch.memory_format):
        return msgpack.ExtType(EXT_MEMORY_FORMAT, MEMORY_FORMAT_NAMES[obj].encode())
    if isinstance(obj, Handle):
        return msgpack.ExtType(EXT_HANDLE, _pack_nested(obj.id))
    if isinstance(obj, Payload):
        return msgpack.ExtType(EXT_PAYLOAD, _pack_nested([obj.frame, *_meta_fields(obj.meta)]))
    if isinstance(obj, NewTensor):
        return msgpack.ExtType(EXT_NEW_TENSOR, _pack_nested([obj.handle, *_meta_fields(obj.meta)]))
    if isinstance(obj, Slot):
        return msgpack.ExtType(EXT_SLOT, _pack_nested([obj.kind, obj.step, obj.out]))
    if isinstance(obj, TensorMeta):
        return msgpack.ExtType(EXT_META, _pack_nested(_meta_fields(obj)))
    if isinstance(obj, complex):
        return msgpack.ExtType(EXT_COMPLEX, _pack_nested([obj.real, obj.imag]))
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, torch.Size):
        return list(obj)
    raise ProtocolError(f"cannot send a value of type {type(obj).__name__}: {obj!r}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_DTYPE:
        return _lookup(DTYPES, data.decode(), "dtype")
    if code == EXT_DEVICE:
        name = data.decode()
        if name == REMOTE:
            return RemoteDevice()
        if name == "cpu":
            return torch.device("cpu")
        raise ProtocolError(f"unknown device {name!r}")
    if code == EXT_LAYOUT:
        return _lookup(LAYOUTS, data.decode(), "layout")
    if code == EXT_MEMORY_FORMAT:
        return _lookup(MEMORY_FORMATS, data.decode(), "memory format")
    inner = msgpack.unpackb(data, raw=False)
    try:
        if code == EXT_HANDLE:
            if not isinstance(inner, int):
                raise ProtocolError("a handle must be an integer")
            return Handle(inner)
        if code == EXT_PAYLOAD:
            return Payload(int(inner[0]), _meta_from(inner[1:]))
        if code == EXT_NEW_TENSOR:
            return NewTensor(int(inner[0]), _meta_from(inner[1:]))
        if code == EXT_META:
            return _meta_from(inner)
        if code == EXT_SLOT:
            if inner[0] not in (LOCAL, CARRIED, INPUT):
                raise ProtocolError(f"unknown slot kind {inner[0]!r}")
            return Slot(int(inner[0]), int(inner[1]), int(inner[2]))
        if code == EXT_COMPLEX:
            return complex(inner[0], inner[1])
    except (TypeError, IndexError, ValueError) as e:
        raise ProtocolError(f"malformed extension {code}: {e}") from None
    raise ProtocolError(f"unknown extension type {code}")


def pack(header: dict) -> bytes:
    """Encode a header map (with ``v`` added) to msgpack bytes."""
    return msgpack.packb({"v": VERSION, **header}, default=_default, use_bin_type=True)


def unpack(data: bytes) -> dict:
    """Decode a header; raise ProtocolError for anything that is not a versioned map."""
    try:
        header = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable header: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("the header must be a map")
    if header.get("v") != VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r} is not {VERSION}")
    return header


def walk(tree: Any, leaf: Callable[[Any], Any]) -> Any:
    """Rebuild a tree of lists/tuples/dicts, replacing each non-container value by ``leaf(v)``."""
    kind = type(tree)
    if kind is list:
        return [walk(v, leaf) for v in tree]
    if kind is tuple:
        return tuple([walk(v, leaf) for v in tree])
    if kind is dict:
        return {k: walk(v, leaf) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):  # subclasses (torch.Size, named tuples) become plain
        return type(tree)(walk(v, leaf) for v in tree) if kind is not torch.Size \
            else [walk(v, leaf) for v in tree]
    return leaf(tree)


def tensor_to_frame(t: torch.Tensor) -> tuple[TensorMeta, memoryview]:
    """The bytes of a CPU tensor and the meta that reads them back as the same view.

    A dense tensor (its elements fill its storage span exactly, whatever the strides) travels as
    it lies, so a transposed or channels-last tensor keeps its strides; anything else (expanded,
    overlapping, gaps) travels contiguous.
    """
    t = t.detach()
    if t.numel() == 0:
        return TensorMeta(t.dtype, tuple(t.shape), tuple(t.stride()), 0), memoryview(b"")
    if _storage_span(meta_of(t)) - t.storage_offset() != t.numel():
        t = t.contiguous()
    flat = t.as_strided((t.numel(),), (1,), t.storage_offset())
    meta = TensorMeta(t.dtype, tuple(t.shape), tuple(t.stride()), 0)
    return meta, memoryview(flat.view(torch.uint8).numpy())


def tensor_from_frame(meta: TensorMeta, frame: bytes | memoryview) -> torch.Tensor:
    """A CPU tensor with ``meta``'s view over ``frame`` (copied once if it is read-only)."""
    view = memoryview(frame)
    if view.readonly:
        view = memoryview(bytearray(view))
    itemsize = torch.empty((), dtype=meta.dtype).element_size()
    span = _storage_span(meta)
    if view.nbytes < span * itemsize:
        raise ProtocolError(
            f"payload of {view.nbytes} bytes is too small for {meta.shape} {meta.dtype}"
        )
    if span == 0:
        flat = torch.empty(0, dtype=meta.dtype)
    else:
        raw = torch.frombuffer(view, dtype=torch.uint8, count=span * itemsize)
        if raw.data_ptr() % 64:  # frames start at any byte offset; kernels assume alignment
            raw = raw.clone()  # (misaligned complex128 crashed the process)
        flat = raw.view(meta.dtype)
    return flat.as_strided(meta.shape, meta.stride, meta.offset)


def _storage_span(meta: TensorMeta) -> int:
    if any(s == 0 for s in meta.shape):
        return 0
    extent = sum((s - 1) * st for s, st in zip(meta.shape, meta.stride, strict=True))
    return meta.offset + 1 + extent


def op_name_ok(name: Any) -> bool:
    """Whether ``name`` has the shape of an ATen overload name (``add.Tensor``, ``relu``)."""
    return isinstance(name, str) and bool(_OP_NAME.match(name))
