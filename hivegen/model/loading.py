"""Fill part of a skeleton with its weights, through transformers' own key renaming and weight conversion.

transformers 5 does not keep checkpoints' names and layouts in memory: mixtures of experts are
fused (`experts.*.w1` + `experts.*.w3` on disk become one `experts.gate_up_proj`), some keys are
renamed. `from_pretrained` applies the model's conversion mapping while it loads; we apply the
same mapping to the on-disk keys, keep those that land in the modules asked for, and hand only
them to transformers' loader. Only the shards holding those tensors are opened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    rename_source_key,
)
from transformers.modeling_utils import LoadStateDictConfig

from hivegen.errors import ModelLoadError
from hivegen.model.skeleton import BUILD_LOCK, ModelSkeleton


def in_modules(prefixes: list[str]) -> Callable[[str], bool]:
    """A selector of the parameters inside any of the modules named by `prefixes`."""
    dotted = tuple(f"{p}." for p in prefixes)
    return lambda name: name.startswith(dotted)


def _transforms(model: Any) -> tuple[list[WeightRenaming], list[WeightConverter]]:
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def missing_weights(skeleton: ModelSkeleton) -> list[str]:
    """Parameters of the model that no tensor of the checkpoint becomes (tied weights aside), read from names only."""
    model = skeleton.causal_lm
    meta_state = model.state_dict()
    renamings, converters = _transforms(model)
    covered: set[str] = set()
    for key in skeleton.checkpoint.tensor_files:
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        covered.add(target)
        for converter in converters if pattern is not None else []:
            if pattern in converter.source_patterns:  # one tensor on disk may become several (qkv -> q, k, v)
                covered.update(target.replace(converter.target_patterns[0], t) for t in converter.target_patterns)
    tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return sorted(names - covered - tied)


def load_weights(skeleton: ModelSkeleton, select: Callable[[str], bool], device: torch.device) -> int:
    """Load every parameter (and persistent buffer) of `skeleton` whose in-memory name `select` accepts.

    Returns how many checkpoint tensors were read. Raises ModelLoadError when a selected
    parameter has no weights in the checkpoint, or weights of another shape.
    """
    model = skeleton.causal_lm
    checkpoint = skeleton.checkpoint
    meta_state = model.state_dict()
    renamings, converters = _transforms(model)  # to choose the keys to read
    wanted: dict[str, list[str]] = {}  # shard file -> on-disk keys it holds that we need
    for key, file_name in checkpoint.tensor_files.items():
        target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if target in meta_state and select(target):
            wanted.setdefault(file_name, []).append(key)
    with contextlib.ExitStack() as shards:
        state: dict[str, Any] = {}
        for file_name, keys in wanted.items():
            shard = shards.enter_context(safe_open(str(checkpoint.path / file_name), framework="pt", device="cpu"))
            state.update({key: shard.get_slice(key) for key in keys})  # read when converted, not before
        renamings, converters = _transforms(model)
        config = LoadStateDictConfig(
            dtype=skeleton.dtype,
            dtype_plan=model._get_dtype_plan(skeleton.dtype),
            device_map={"": device},
            weight_mapping=renamings + converters,  # a fresh copy: transforms collect the tensors they convert
        )
        with BUILD_LOCK:
            info, _ = convert_and_load_state_dict_in_model(model, state, config)
            # Tied weights (an LM head that is the input embedding) are stored once: share them as
            # from_pretrained does, whichever of the two the checkpoint holds, where this load has either.
            tied = model.get_expanded_tied_weights_keys(all_submodels=True)
            if any(select(target) or select(source) for target, source in tied.items()):
                model.tie_weights(missing_keys=info.missing_keys)
    if info.mismatched_keys:
        shown = ", ".join(
            f"{name} {list(got)} (model: {list(want)})" for name, got, want in sorted(info.mismatched_keys)
        )
        raise ModelLoadError(f"checkpoint {checkpoint.path} has weights of the wrong shape for {shown[:500]}")
    if info.conversion_errors:
        raise ModelLoadError(f"checkpoint {checkpoint.path}: cannot convert {dict(info.conversion_errors)}")
    missing = sorted(name for name, p in model.named_parameters() if select(name) and p.is_meta)
    if missing:
        raise ModelLoadError(
            f"checkpoint {checkpoint.path} lacks weights for {missing[:5]} (and {max(0, len(missing) - 5)} more)"
        )
    return sum(len(keys) for keys in wanted.values())
