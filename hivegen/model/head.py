"""The parts a client keeps locally: token embeddings, the final norm and the LM head."""

from __future__ import annotations

import torch

from hivegen.model.checkpoint import ModelCheckpoint
from hivegen.model.skeleton import DEFAULT_ATTN_IMPLEMENTATION, ModelSkeleton


class ClientHead:
    """Embeds tokens and turns the last block's hidden states into logits."""

    def __init__(
        self,
        checkpoint: ModelCheckpoint,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION,
    ) -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self.skeleton = ModelSkeleton.build(checkpoint, attn_implementation)
        self.config = self.skeleton.config
        causal_lm = self.skeleton.causal_lm
        self.embeddings = causal_lm.get_input_embeddings()
        self.norm = self.skeleton.norm
        self.lm_head = causal_lm.get_output_embeddings()
        self.skeleton.materialize(self.embeddings, dtype, self.device)
        self.skeleton.materialize(self.norm, dtype, self.device)
        lm_head_keys = self.skeleton.param_names(self.lm_head)
        if all(checkpoint.has_tensor(k) for k in lm_head_keys.values()):
            self.skeleton.materialize(self.lm_head, dtype, self.device)
        else:  # tied embeddings: the checkpoint stores one matrix for both
            self.skeleton.tie(self.lm_head, self.embeddings)
        self.embeddings.to(self.device)  # buffers such as Gemma's embed_scale
        self.softcap = getattr(self.config, "final_logit_softcapping", None)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids.to(self.device))  # type: ignore[no-any-return]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for the last position of `hidden` [batch, seq, hidden_size], in float32."""
        normed = self.norm(hidden.to(device=self.device, dtype=self.dtype))
        logits = self.lm_head(normed[:, -1:, :])[:, -1, :]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch: count real tokens; padding gets position 0, as transformers does."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)
