"""Regenerate hivegen/proto/*_pb2*.py and *_pb2.pyi from the .proto files (tests check that they are current)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent.parent / "hivegen" / "proto"


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every .proto in PROTO_DIR into out_dir; return the files written."""
    written: list[Path] = []
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
        written += [
            _relative_imports(out_dir / f"{proto.stem}_pb2.py"),
            _relative_imports(out_dir / f"{proto.stem}_pb2_grpc.py"),
        ]
    return written


def _relative_imports(path: Path) -> Path:
    """protoc imports generated modules (`import ledger_pb2 as ...`) at top level; make those imports relative
    so the stubs live inside the package."""
    text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", path.read_text(), flags=re.M)
    path.write_text(text)
    return path


def generate_type_stubs(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Write the *_pb2.pyi type stubs that mypy reads for the generated messages; return the files written."""
    written: list[Path] = []
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        if protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--pyi_out={out_dir}", str(proto)]) != 0:
            raise SystemExit(f"protoc failed on {proto}")
        written.append(_relative_imports(out_dir / f"{proto.stem}_pb2.pyi"))
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR
    for path in generate(out) + generate_type_stubs(out):
        print(path)
