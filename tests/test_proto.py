"""The wire format: generated stubs are current, and tensors survive the trip as bytes exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from hivegen.proto import node_pb2
from hivegen.proto.tensors import TensorDecodeError, deserialize, serialize

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "hivegen" / "proto"


def load_gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_round_trip(tensor: torch.Tensor) -> None:
    decoded = deserialize(serialize(tensor))
    assert decoded.dtype == tensor.dtype
    assert decoded.shape == tensor.shape
    assert torch.equal(decoded, tensor)


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    written = load_gen_proto().generate(out_dir=tmp_path)
    stems = sorted(p.stem for p in PROTO_DIR.glob("*.proto"))
    assert sorted(p.name for p in written) == sorted(
        [f"{s}_pb2.py" for s in stems] + [f"{s}_pb2_grpc.py" for s in stems]
    )
    for path in written:
        assert path.read_bytes() == (PROTO_DIR / path.name).read_bytes(), (
            f"{path.name} is stale: run `python scripts/gen_proto.py`"
        )


def test_committed_type_stubs_match_the_proto(tmp_path: Path) -> None:
    written = load_gen_proto().generate_type_stubs(out_dir=tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{p.stem}_pb2.pyi" for p in PROTO_DIR.glob("*.proto"))
    for path in written:
        assert path.read_bytes() == (PROTO_DIR / path.name).read_bytes(), (
            f"{path.name} is stale: run `python scripts/gen_proto.py`"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float_tensors_round_trip_exactly(dtype: torch.dtype) -> None:
    assert_round_trip(torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)).to(dtype))


def test_bfloat16_tensors_round_trip_exactly() -> None:
    tensor = torch.randn(4, 7, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    message = serialize(tensor)
    assert message.dtype == "bfloat16"
    assert len(message.data) == tensor.numel() * 2
    assert_round_trip(tensor)


def test_int64_tensors_round_trip_exactly() -> None:
    assert_round_trip(torch.tensor([[0, -1, 2**62], [7, -(2**63), 2**63 - 1]], dtype=torch.int64))


def test_bool_tensors_round_trip_exactly() -> None:
    assert_round_trip(torch.tensor([[True, False, True], [False, False, True]]))


def test_empty_tensors_round_trip_with_their_shape() -> None:
    tensor = torch.empty(2, 0, 64, dtype=torch.float32)
    message = serialize(tensor)
    assert message.data == b""
    assert list(message.shape) == [2, 0, 64]
    assert_round_trip(tensor)


def test_non_contiguous_tensors_round_trip_as_their_values() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert not tensor.is_contiguous()
    assert_round_trip(tensor)


def valid_message() -> node_pb2.Tensor:
    return serialize(torch.ones(2, 3, dtype=torch.float32))


def test_deserialize_rejects_an_unknown_dtype() -> None:
    message = valid_message()
    message.dtype = "complex64"
    with pytest.raises(TensorDecodeError, match="unknown dtype 'complex64'"):
        deserialize(message)


def test_deserialize_rejects_bytes_one_short_of_the_shape() -> None:
    message = valid_message()
    message.data = message.data[:-1]
    with pytest.raises(TensorDecodeError, match="tensor bytes do not match its shape: got 23 bytes"):
        deserialize(message)


def test_deserialize_rejects_bytes_beyond_the_shape() -> None:
    message = valid_message()
    message.data += b"\0"
    with pytest.raises(TensorDecodeError, match="tensor bytes do not match its shape: got 25 bytes"):
        deserialize(message)


def test_deserialize_rejects_negative_dims() -> None:
    message = node_pb2.Tensor(data=b"", dtype="float32", shape=[2, -3])
    with pytest.raises(TensorDecodeError, match=r"invalid tensor shape \[2, -3\]"):
        deserialize(message)


def test_deserialize_rejects_too_many_dims() -> None:
    message = node_pb2.Tensor(data=b"\0" * 4, dtype="float32", shape=[1] * 9)
    with pytest.raises(TensorDecodeError, match=r"invalid tensor shape \[1, 1, 1, 1, 1, 1, 1, 1, 1\]"):
        deserialize(message)
