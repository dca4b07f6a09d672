"""Can hivegen serve this checkpoint? Answered from its config and tensor names, without a swarm or its weights.

`hivegen models check DIR` prints this report, and a node checks the same before it loads a weight,
so a model hivegen cannot serve is refused in one line naming the model type and the reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hivegen.credits.units import format_credits
from hivegen.errors import UnsupportedModelError
from hivegen.model.blocks import block_calls, check_positions, resolve_layer_types
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.loading import missing_weights
from hivegen.model.skeleton import ModelSkeleton


@dataclass(frozen=True)
class ModelSupport:
    """What `hivegen models check` finds out about a checkpoint."""

    path: str
    model_type: str
    num_blocks: int
    servable: bool
    reason: str = ""  # why it cannot be served; empty when it can
    architecture: str = ""  # the causal-LM class transformers builds for it
    attn_implementation: str = ""  # what nodes run by default
    layer_types: dict[str, int] = field(default_factory=dict)  # attention kind -> blocks of it
    block_parameters: list[int] = field(default_factory=list)  # per block: what a node is paid per token, each
    client_parameters: int = 0  # embeddings, norms, LM head: what a client loads
    experts: int = 0  # experts in the largest mixture-of-experts block (0: dense)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The report, for a person."""
        head = [f"model       {self.path}", f"type        {self.model_type} ({self.architecture or '?'})"]
        if not self.servable:
            return [*head, f"blocks      {self.num_blocks}", f"servable    no: {self.reason}"]
        kinds = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in self.layer_types.items())
        low, high = min(self.block_parameters), max(self.block_parameters)
        per_block = f"{low:,}" if low == high else f"{low:,} to {high:,}"
        work = sum(self.block_parameters) * 1000  # work units are parameter-tokens
        return [
            *head,
            f"blocks      {self.num_blocks} ({kinds})",
            f"attention   {self.attn_implementation}",
            f"experts     {self.experts} per mixture-of-experts block" if self.experts else "experts     none (dense)",
            f"parameters  {per_block} per block; {self.client_parameters:,} outside the blocks (on clients)",
            f"earns       {format_credits(work)} credits per 1,000 tokens through all "
            "blocks (a node earns its blocks' share)",
            "servable    yes",
        ]


def check_model(path: str | Path, attn_implementation: str | None = None) -> ModelSupport:
    """Whether nodes and clients can run `path`, and what serving it involves. Raises ModelLoadError only when
    `path` is not a checkpoint at all."""
    checkpoint = ModelCheckpoint.open(path)
    model_type = str(getattr(checkpoint.text_config, "model_type", "?"))
    shown = str(checkpoint.path)
    architecture = ""
    try:
        skeleton = ModelSkeleton.build(checkpoint, attn_implementation)
        architecture = type(skeleton.causal_lm).__name__
        types = resolve_layer_types(skeleton.config)
        block_calls(list(skeleton.layers), skeleton.config)
        check_positions(skeleton.causal_lm, skeleton.config)
        missing = missing_weights(skeleton)
        if missing:
            outer = str(getattr(checkpoint.config, "model_type", "?"))
            raise UnsupportedModelError(
                f"model_type {model_type!r}: the checkpoint has no weights for {', '.join(missing[:3])}"
                + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                + (
                    f" (a {outer!r} checkpoint keeps its text decoder inside the multimodal model; hivegen serves "
                    "text-only checkpoints)"
                    if checkpoint.text_config is not checkpoint.config
                    else ""
                )
            )
    except UnsupportedModelError as exc:
        return ModelSupport(
            shown, model_type, checkpoint.num_blocks, servable=False, reason=str(exc), architecture=architecture
        )
    blocks = skeleton.block_parameters()
    tied = set(skeleton.causal_lm.get_expanded_tied_weights_keys(all_submodels=True))  # stored once, loaded once
    client = sum(
        p.numel()
        for name, p in skeleton.causal_lm.named_parameters()
        if not name.startswith(f"{skeleton.layers_name}.") and name not in tied
    )
    return ModelSupport(
        shown,
        model_type,
        checkpoint.num_blocks,
        servable=True,
        architecture=architecture,
        attn_implementation=skeleton.attn_implementation,
        layer_types=dict(Counter(types)),
        block_parameters=blocks,
        client_parameters=client,
        experts=max((_experts(layer) for layer in skeleton.layers), default=0),
    )


def require_servable(path: str | Path, attn_implementation: str | None = None) -> ModelSupport:
    """check_model, raising UnsupportedModelError with its reason when the model cannot be served."""
    support = check_model(path, attn_implementation)
    if not support.servable:
        raise UnsupportedModelError(f"{support.path}: {support.reason}")
    return support


def _experts(layer: Any) -> int:
    """Experts in a block: the leading size of its fused (3-D) expert weights, or the length of a list of experts."""
    count = max((int(p.shape[0]) for p in layer.parameters() if p.ndim == 3), default=0)
    for name, module in layer.named_modules():
        if name.endswith("experts") and hasattr(module, "__len__"):
            count = max(count, len(module))
    return count
