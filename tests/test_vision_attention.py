"""One-call window attention for the vision tower equals transformers' per-window attention."""

from __future__ import annotations

import pytest
import torch

from fourdthinker import vision_attention
from fourdthinker.vision_attention import NAME, grouped_window_attention, use_window_attention, window_attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _per_window(q, k, v, cu, scale):
    """The reference: one softmax attention per window, written out."""
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1).double() for t in (q, k, v))  # [heads, len, dim]
        weights = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out[a:b] = (weights @ vs).transpose(0, 1).to(q.dtype)
    return out


def _windows(lengths, heads=3, dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), heads, dim, generator=g).to(device, dtype) for _ in range(3))
    return q, k, v, cu.to(device)


@pytest.mark.parametrize("lengths", [[64] * 6, [64, 32, 64, 7, 32, 1, 64], [5]])
def test_grouped_windows_equal_one_attention_per_window(lengths):
    q, k, v, cu = _windows(lengths)
    out = grouped_window_attention(q, k, v, cu, scale=0.25)
    torch.testing.assert_close(out, _per_window(q, k, v, cu, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_interface_shapes_and_values(device):
    """[1, heads, tokens, dim] in, [1, tokens, heads, dim] out; bf16 on a GPU takes the varlen kernel."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, cu = _windows([64, 64, 48, 64, 16], dtype=dtype, device=device)
    as_module = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out, weights = window_attention(None, *as_module, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                    max_length_q=64, max_length_k=64)
    assert weights is None and out.shape == (1, q.shape[0], q.shape[1], q.shape[2])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out[0].float(), _per_window(q, k, v, cu, 0.25).float(), atol=tol, rtol=tol)


def test_rejects_what_it_does_not_serve():
    q, k, v, cu = _windows([8, 8])
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    with pytest.raises(ValueError, match="vision sub-config"):
        window_attention(None, q4, k4, v4)  # no window boundaries: a language-model call
    with pytest.raises(ValueError, match="vision sub-config"):
        window_attention(None, q4, k4, v4, cu_seq_lens_q=cu, is_causal=True)
    with pytest.raises(ValueError, match="share their windows"):
        window_attention(None, q4, k4, v4, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 4, 16]))


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_model_vision_tower_matches_transformers_per_window(tiny_model_dir, device, monkeypatch):
    """The same tower outputs as transformers' own sdpa path, through windows of several sizes (the
    grid is not a multiple of the window), with the language model's attention left as it was."""
    from fourdthinker.model import load_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(tiny_model_dir, dtype, window_attention=False).to(device).eval()
    text_impl = model.config.text_config._attn_implementation
    vc = model.config.vision_config
    grid = torch.tensor([[4, 20, 24], [1, 12, 8]], device=device)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * vc.temporal_patch_size * vc.patch_size ** 2,
                         generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def tower():
        with torch.no_grad():
            out = model.model.visual(pixels, grid_thw=grid)
        return getattr(out, "pooler_output", out)

    reference = tower()
    sizes = []
    grouped = vision_attention.grouped_window_attention
    monkeypatch.setattr(vision_attention, "grouped_window_attention",
                        lambda q, k, v, cu, *a, **kw: sizes.append(len(set((cu[1:] - cu[:-1]).tolist())))
                        or grouped(q, k, v, cu, *a, **kw))
    use_window_attention(model)
    assert model.model.visual.config._attn_implementation == NAME
    assert model.config.text_config._attn_implementation == text_impl != NAME
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(tower().float(), reference.float(), atol=tol, rtol=tol)
    if device == "cpu":
        assert len(sizes) == vc.depth and max(sizes) > 1  # every block, windows of several lengths


def test_load_model_sets_it_by_default(tiny_model_dir):
    from fourdthinker.model import load_model

    assert load_model(tiny_model_dir, torch.float32).config.vision_config._attn_implementation == NAME
