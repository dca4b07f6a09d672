"""The parts of a model a client runs: everything but its decoder blocks, by the model's own forward.

The client loads every weight outside the blocks (embeddings, learned positions, final norm,
LM head) and runs the causal LM's own `forward`, whose blocks are left on the meta device with
their forward replaced: the first hands the hidden states to the swarm and returns its answer,
the others pass them through. So whatever a model does around its blocks (embedding scaling,
learned absolute positions, a final norm under any name, logit scaling and soft-capping) runs
exactly as transformers wrote it, with no per-model code here.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

import torch

from hivegen.errors import UnsupportedModelError
from hivegen.model.blocks import block_calls, check_positions, resolve_layer_types
from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.loading import load_weights
from hivegen.model.skeleton import ModelSkeleton

Blocks = Callable[[torch.Tensor], torch.Tensor]  # hidden states in -> the last block's hidden states out


class _Embedded(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class ClientHead:
    """Runs a model's forward with its blocks delegated: embeds tokens and turns block outputs into logits."""

    def __init__(
        self,
        checkpoint: ModelCheckpoint,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str | None = None,
    ) -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self.skeleton = ModelSkeleton.build(checkpoint, attn_implementation, dtype)
        self.config = self.skeleton.config
        # The client refuses what no node could serve, with the nodes' reason, before it loads anything.
        resolve_layer_types(self.config)
        block_calls(list(self.skeleton.layers), self.config)
        check_positions(self.skeleton.causal_lm, self.config)
        inside_blocks = f"{self.skeleton.layers_name}."
        load_weights(self.skeleton, lambda name: not name.startswith(inside_blocks), self.device)
        self.model = self.skeleton.causal_lm
        _move_buffers(self.model, self.device, skip=inside_blocks)  # rotary tables, embedding scales
        self._running = threading.local()  # each thread's step has its own blocks: one head serves many generations
        self._tuple_out = False  # blocks return (hidden, ...) for models whose forward takes outputs[0]
        self._delegate_blocks()
        forward = inspect.signature(self.model.forward).parameters
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._tuple_out = self._probe_block_outputs()

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, blocks: Blocks) -> torch.Tensor:
        """Logits [batch, vocab] (float32) for the last position of `input_ids` [batch, new]: the model's forward,
        with `blocks` computing every decoder block. `position_ids` [batch, new] are the new tokens' positions."""
        self._running.blocks = blocks
        try:
            out = self.model(
                input_ids=input_ids.to(self.device),
                position_ids=position_ids.to(self.device),
                use_cache=False,
                **self._keep_last,
            )
        finally:
            self._running.blocks = _identity
        return out.logits[:, -1, :].float()  # type: ignore[no-any-return]

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states the first block receives for `input_ids` (default positions 0, 1, ...)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1)

        def stop(hidden: torch.Tensor) -> torch.Tensor:
            raise _Embedded(hidden)

        try:
            self.step(input_ids, position_ids, stop)
        except _Embedded as done:
            return done.hidden
        raise UnsupportedModelError(f"model_type {self.skeleton.model_type!r}: its forward never reached its blocks")

    def _delegate_blocks(self) -> None:
        """Give every meta block a forward: the first runs all blocks through the calling step's `blocks`, the rest
        pass through."""
        layers = list(self.skeleton.layers)
        hidden_name = next(iter(inspect.signature(layers[0].forward).parameters))

        def hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
            return args[0] if args else kwargs[hidden_name]  # type: ignore[no-any-return]

        def output(hidden: torch.Tensor) -> Any:
            return (hidden,) if self._tuple_out else hidden

        def first(*args: Any, **kwargs: Any) -> Any:
            return output(self._running.blocks(hidden_of(args, kwargs)))

        def others(*args: Any, **kwargs: Any) -> Any:
            return output(hidden_of(args, kwargs))

        for index, layer in enumerate(layers):
            layer.forward = first if index == 0 else others  # an instance attribute: nn.Module calls it

    def _probe_block_outputs(self) -> bool:
        """Whether the model's forward expects its blocks to return a tuple: run it once on a dummy batch each way."""
        input_ids = torch.full((2, 3), int(getattr(self.config, "bos_token_id", None) or 0))
        position_ids = torch.arange(3).expand(2, -1)
        failures: list[str] = []
        for tuple_out in (False, True):
            self._tuple_out = tuple_out
            try:
                logits = self.step(input_ids, position_ids, _identity)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if logits.shape[0] == 2 and logits.ndim == 2:
                return tuple_out
            failures.append(f"logits of shape {list(logits.shape)}")
        raise UnsupportedModelError(
            f"model_type {self.skeleton.model_type!r}: its forward does not run with its blocks delegated "
            f"({'; '.join(failures)[:400]})"
        )


def _move_buffers(model: torch.nn.Module, device: torch.device, skip: str) -> None:
    for name, module in model.named_modules():
        if not f"{name}.".startswith(skip):
            for key, buffer in module.named_buffers(recurse=False):
                module._buffers[key] = buffer.to(device)


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch: count real tokens; padding gets position 0, as transformers does."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)
