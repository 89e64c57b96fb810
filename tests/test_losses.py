"""DIFT loss: the formula, its fp32 cosine, detached targets, and the no-latent case."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fourdthinker.losses import cosine_similarity_fp32, dift_loss


def test_cosine_is_float32_and_matches_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(5, 3, 64, generator=gen) * 30).to(torch.bfloat16)
    b = torch.randn(5, 3, 64, generator=gen).to(torch.bfloat16)
    cos = cosine_similarity_fp32(a, b)
    assert cos.dtype == torch.float32 and cos.shape == (5, 3)
    reference = F.cosine_similarity(a.double(), b.double(), dim=-1)
    torch.testing.assert_close(cos.double(), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(cosine_similarity_fp32(a, a), torch.ones(5, 3), atol=1e-6, rtol=0)


def _reference_sim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over images of mean over slots of 1 - cos, with explicit loops in float64."""
    per_image = []
    for p_img, t_img in zip(pred.double(), target.double()):
        per_slot = [1 - torch.dot(p, t) / (p.norm() * t.norm()) for p, t in zip(p_img, t_img)]
        per_image.append(sum(per_slot) / len(per_slot))
    return float(sum(per_image) / len(per_image))


def test_dift_loss_is_weighted_ce_plus_mean_cosine_distance():
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 4, 16, generator=gen, requires_grad=True)
    target = torch.randn(3, 4, 16, generator=gen, requires_grad=True)
    ce = torch.tensor(2.5, requires_grad=True)
    loss, metrics = dift_loss(ce, pred, target, ce_weight=0.1, sim_weight=1.0)

    sim = _reference_sim(pred.detach(), target.detach())
    assert loss.item() == pytest.approx(0.1 * 2.5 + sim, abs=1e-6)
    assert metrics["sim"] == pytest.approx(sim, abs=1e-6)
    assert metrics["ce"] == pytest.approx(2.5) and metrics["loss"] == pytest.approx(loss.item())
    assert metrics["cos"] == pytest.approx(1 - sim, abs=1e-6)
    assert all(isinstance(v, float) for v in metrics.values())

    weighted, _ = dift_loss(ce, pred, target, ce_weight=0.5, sim_weight=2.0)
    assert weighted.item() == pytest.approx(0.5 * 2.5 + 2.0 * sim, abs=1e-5)

    loss.backward()
    assert target.grad is None  # targets are not trained
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert ce.grad.item() == pytest.approx(0.1)


def test_dift_loss_without_latents_is_weighted_ce():
    ce = torch.tensor(3.0)
    empty = torch.zeros(0, 4, 16)
    loss, metrics = dift_loss(ce, empty, empty, ce_weight=0.1)
    assert loss.item() == pytest.approx(0.3)
    assert metrics["sim"] == 0.0 and math.isnan(metrics["cos"])


def test_dift_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="num_images, latent_size, hidden"):
        dift_loss(torch.tensor(1.0), torch.zeros(2, 4, 8), torch.zeros(2, 3, 8))
