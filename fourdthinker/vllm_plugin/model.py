"""vLLM's Qwen2.5-VL with the hooks of latent decoding, for both of vLLM's model runners.

V1 runner (custom logits processors select it; the CPU build runs it), no-ops until a
`LatentState` is attached:
- `embed_input_ids`: after the usual token + vision embedding, rows at latent-pad positions take
  the stored hidden states. vLLM calls it eagerly every step (prefill, decode, recompute) before
  the forward, outside CUDA graphs, and copies the result into the persistent `inputs_embeds`
  buffer the graphs read: CUDA graphs stay on.
- `compute_logits`: stash the final-norm hidden rows (one per request) for the logits processor.

V2 runner (vLLM's default on CUDA): `get_model_state_cls` brings `runner_v2.LatentModelState`,
which does the injection, forcing and recording on the device; `compute_logits` hands it the rows.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration


class LatentQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    latent_state = None  # V1: a LatentState
    latent_sampling = None  # V2: the LatentModelState

    @classmethod
    def get_model_state_cls(cls):
        from fourdthinker.vllm_plugin.runner_v2 import latent_model_state_cls

        return latent_model_state_cls()

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, **kwargs) -> torch.Tensor:
        embeds = super().embed_input_ids(input_ids, multimodal_embeddings, **kwargs)
        if self.latent_state is not None:
            embeds = self.latent_state.inject(input_ids, embeds)
        return embeds

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        state = self.latent_state if self.latent_state is not None else self.latent_sampling
        if state is not None:
            state.stash_hidden(hidden_states)
        return super().compute_logits(hidden_states)
