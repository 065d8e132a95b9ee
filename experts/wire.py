"""Tensors on the wire: raw little-endian bytes with a dtype name and a shape, never pickle."""

import sys
import warnings

import numpy as np
import torch

from checkpoint.args import DTYPES
from protos import expert_pb2

WIRE_DTYPES = {**DTYPES, "int32": torch.int32}
WIRE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}

if sys.byteorder != "little":
    raise ImportError("raymoe's wire format is little-endian; big-endian hosts are not supported")

# Tensors read off the wire share the (immutable) protobuf bytes; nothing here writes to them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class WireError(ValueError):
    """A message that does not describe the tensor it claims to: answered with INVALID_ARGUMENT."""


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The same limit both ways, on router and replica alike: the transport refuses a bigger message with
    RESOURCE_EXHAUSTED before any of it reaches Python."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def to_wire(t: torch.Tensor) -> expert_pb2.Tensor:
    name = WIRE_NAMES.get(t.dtype)
    if name is None:
        raise WireError(f"dtype {t.dtype} cannot travel: expected one of {sorted(WIRE_DTYPES)}")
    t = t.detach().contiguous().cpu()
    # A uint8 view serialises every dtype alike, bfloat16 included (numpy has no bfloat16).
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return expert_pb2.Tensor(dtype=name, shape=list(t.shape), data=data)


def raw_rows(t: torch.Tensor) -> np.ndarray:
    """t (T, D) as numpy integers of t's item size: its rows' raw bytes, whatever the dtype (bfloat16 too)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().cpu().contiguous().view(ints).numpy()


def array_to_wire(a: np.ndarray) -> expert_pb2.Tensor:
    """numpy int32/float32 (the router's small index and weight arrays) without a torch round trip."""
    name = {np.dtype(np.int32): "int32", np.dtype(np.float32): "float32"}.get(a.dtype)
    if name is None:
        raise WireError(f"numpy dtype {a.dtype} cannot travel: expected int32 or float32")
    return expert_pb2.Tensor(dtype=name, shape=list(a.shape), data=np.ascontiguousarray(a).tobytes())


def from_wire(msg: expert_pb2.Tensor, what: str, dtype: torch.dtype | None = None, ndim: int | None = None
              ) -> torch.Tensor:
    """The tensor `msg` describes, after checking its dtype (if given), rank and byte count.

    The result shares memory with the message and is read-only in spirit: do not write to it.
    """
    dt = WIRE_DTYPES.get(msg.dtype)
    if dt is None:
        raise WireError(f"{what}: unknown dtype {msg.dtype!r}, expected one of {sorted(WIRE_DTYPES)}")
    if dtype is not None and dt != dtype:
        raise WireError(f"{what}: dtype {msg.dtype} where {WIRE_NAMES[dtype]} is expected")
    shape = tuple(msg.shape)
    if ndim is not None and len(shape) != ndim:
        raise WireError(f"{what}: shape {list(shape)} has {len(shape)} dimensions, expected {ndim}")
    if any(n < 0 for n in shape):
        raise WireError(f"{what}: shape {list(shape)} has a negative dimension")
    numel = 1
    for n in shape:
        numel *= n
    expected = numel * dt.itemsize
    if len(msg.data) != expected:
        raise WireError(f"{what}: {len(msg.data)} bytes of data, but {msg.dtype} {list(shape)} needs "
                        f"{expected}")
    if numel == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(msg.data, dtype=dt).view(shape)
