"""Window attention for the Qwen2.5-VL vision tower in one kernel call per layer, not one per window.

The tower attends within windows (and, in a few layers, within whole frames). transformers gives
the window boundaries (`cu_seqlens`) only to attention implementations named like flash attention;
every other one (sdpa, eager) is called once per window: about 160 windows per layer for one
16-frame 448x448 clip, 4,500 tiny kernel launches per forward, which made the frozen tower most of
a 3B DIFT step on an H200 (benchmarks/dift_step.py --profile). This module registers a function
under a flash-style name through transformers' public `AttentionInterface` and sets it on the
vision sub-config only (the language model keeps its own):

- on a GPU in bf16/fp16, torch's variable-length flash attention (`torch.nn.attention.varlen`):
  all windows in one call, no padding;
- elsewhere (CPU, fp32), windows grouped by length: one `scaled_dot_product_attention` per
  distinct window size (a handful), each a batch of equal windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "fourdthinker_flash_varlen"  # "flash" in the name is what routes cu_seqlens to it


def window_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask=None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                     max_length_q: int | None = None, max_length_k: int | None = None,
                     is_causal: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature: [1, heads, tokens, dim] in, [1, tokens, heads, dim] out."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or is_causal or attention_mask is not None:
        raise ValueError(f"{NAME} serves the vision tower's packed, non-causal window attention only; "
                         "set it on the vision sub-config (use_window_attention), not on the language model")
    # transformers hands the same tensor for both; comparing values on a GPU would synchronize
    # the host with the device in every layer, so there only another shape is caught
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and (
            cu_seq_lens_k.shape != cu_seq_lens_q.shape
            or (not cu_seq_lens_q.is_cuda and not torch.equal(cu_seq_lens_k, cu_seq_lens_q))):
        raise ValueError(f"{NAME}: queries and keys must share their windows")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0:
        from torch.nn.attention.varlen import varlen_attn

        max_len = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, scale=scaling)
    else:
        out = grouped_window_attention(q, k, v, cu, scaling, dropout)
    return out.unsqueeze(0), None


def grouped_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Attention within each window [cu[i], cu[i+1]) of [tokens, heads, dim] tensors: one batched
    SDPA call per distinct window length."""
    tokens, heads, dim = q.shape
    cu = cu_seqlens.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    out = torch.empty_like(q)
    for length in torch.unique(lengths).tolist():
        if length == 0:
            continue
        first = starts[lengths == length]
        index = (first[:, None] + torch.arange(length, device=q.device)).reshape(-1)
        n = first.numel()

        def windows(t):
            return t[index].view(n, length, heads, dim).transpose(1, 2)  # [windows, heads, length, dim]

        o = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), dropout_p=dropout, scale=scale)
        out[index] = o.transpose(1, 2).reshape(n * length, heads, dim)
    return out


def use_window_attention(model) -> None:
    """Route a Qwen2.5-VL's vision tower through `window_attention`; the language model keeps its
    attention implementation. Idempotent; a model without a vision sub-config is left alone."""
    from transformers import AttentionInterface

    if getattr(model.config, "vision_config", None) is None:
        return
    AttentionInterface.register(NAME, window_attention)
    model.set_attn_implementation({"vision_config": NAME})
