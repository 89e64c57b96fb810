"""vLLM's Qwen2.5-VL with two hooks for latent decoding; no-ops until a LatentState is attached.

- `embed_input_ids`: after the usual token + vision embedding, rows at latent-pad positions take
  the stored hidden states. vLLM calls it eagerly every step (prefill, decode, recompute) before
  the forward, outside CUDA graphs, and copies the result into the persistent `inputs_embeds`
  buffer the graphs read: CUDA graphs stay on.
- `compute_logits`: stash the final-norm hidden rows (one per request) for the logits processor.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration


class LatentQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    latent_state = None

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, **kwargs) -> torch.Tensor:
        embeds = super().embed_input_ids(input_ids, multimodal_embeddings, **kwargs)
        if self.latent_state is not None:
            embeds = self.latent_state.inject(input_ids, embeds)
        return embeds

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.latent_state is not None:
            self.latent_state.stash_hidden(hidden_states)
        return super().compute_logits(hidden_states)
