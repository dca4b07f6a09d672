"""Tensors to and from the wire: raw bytes + dtype + shape. bfloat16 travels without numpy."""

from __future__ import annotations

import math

import torch

from hivegen.proto import node_pb2

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 8


class TensorDecodeError(ValueError):
    """A wire tensor is malformed: unknown dtype, bad shape, or bytes that do not match its shape."""


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise TensorDecodeError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def serialize(tensor: torch.Tensor) -> node_pb2.Tensor:
    """Encode `tensor` as-is (its own dtype), on the CPU, contiguous."""
    if tensor.dtype not in DTYPE_NAMES:
        raise TypeError(f"cannot send a {tensor.dtype} tensor; supported: {sorted(DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return node_pb2.Tensor(data=data, dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape))


def deserialize(message: node_pb2.Tensor) -> torch.Tensor:
    """Decode a wire tensor, checking that its bytes exactly fill its shape."""
    dtype = dtype_from_name(message.dtype)
    shape = list(message.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise TensorDecodeError(f"invalid tensor shape {shape}")
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(message.data) != expected:
        raise TensorDecodeError(
            f"tensor bytes do not match its shape: got {len(message.data)} bytes, "
            f"shape {shape} of {message.dtype} needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray gives torch a writable buffer it may keep; the copy is one memcpy.
    return torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(shape)
