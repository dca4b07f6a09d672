"""Read a Hugging Face safetensors checkpoint: its config, where each tensor lives, its digest.

Only the shards that hold the requested tensors are opened, so a node hosting a few
blocks of a large model never reads the rest of it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from hivegen.errors import ModelLoadError

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class ModelCheckpoint:
    """A checkpoint directory: config plus a map from tensor name to the shard holding it."""

    path: Path
    config: PretrainedConfig
    tensor_files: dict[str, str]  # tensor name -> shard file name inside `path`

    @classmethod
    def open(cls, path: str | Path) -> ModelCheckpoint:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ModelLoadError(f"model directory {root} does not exist; pass a Hugging Face checkpoint directory")
        if not (root / "config.json").is_file():
            raise ModelLoadError(f"{root} has no config.json; is it a Hugging Face checkpoint directory?")
        try:
            config = AutoConfig.from_pretrained(root)
        except (ValueError, OSError, KeyError) as exc:
            raise ModelLoadError(f"cannot read the config in {root}: {exc}") from exc
        return cls(path=root, config=config, tensor_files=_tensor_files(root))

    @property
    def num_blocks(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def text_config(self) -> PretrainedConfig:
        return self.config.get_text_config(decoder=True)

    @property
    def name(self) -> str:
        """A human-readable name: the directory name, lower-cased, DHT-safe."""
        return re.sub(r"[^a-z0-9_-]+", "-", self.path.resolve().name.lower()).strip("-") or "model"

    @property
    def model_key(self) -> str:
        """The model's identity in the swarm: its name plus a prefix of its weights digest."""
        return f"{self.name}-{self.digest[:12]}"

    def default_dtype(self, device: str = "cpu") -> torch.dtype:
        """The checkpoint's own dtype, except half precision on CPU, which runs as float32."""
        native = getattr(self.text_config, "dtype", None) or torch.float32
        if isinstance(native, str):
            native = getattr(torch, native, torch.float32)
        if not isinstance(native, torch.dtype) or not native.is_floating_point:
            return torch.float32
        if str(device).startswith("cpu") and native in (torch.float16, torch.bfloat16):
            return torch.float32
        return native

    def has_tensor(self, name: str) -> bool:
        return name in self.tensor_files

    @cached_property
    def digest(self) -> str:
        """SHA-256 over config.json and every weight file: two checkpoints share a digest only if identical."""
        hasher = hashlib.sha256()
        hasher.update((self.path / "config.json").read_bytes())
        for file_name in sorted(set(self.tensor_files.values())):
            hasher.update(file_name.encode())
            with open(self.path / file_name, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    hasher.update(chunk)
        return hasher.hexdigest()


def _tensor_files(root: Path) -> dict[str, str]:
    index = root / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {str(k): str(v) for k, v in weight_map.items()}
    single = root / _SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as shard:
            # safe_open is not a dict and not iterable: .keys() is its only way to list the tensors.
            return {name: _SINGLE_FILE for name in shard.keys()}  # noqa: SIM118
    raise ModelLoadError(
        f"{root} has no {_SINGLE_FILE} or {_INDEX_FILE}; hivegen reads safetensors checkpoints only "
        "(convert .bin/.gguf with `hivegen models prepare` or transformers' save_pretrained)"
    )
