"""Training losses. DIFT: next-token CE on the text plus a cosine loss that pulls the hidden state
before each latent slot towards that slot's target vision features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DIFT_CE_WEIGHT = 0.1
DIFT_SIM_WEIGHT = 1.0


def cosine_similarity_fp32(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity over the last dim, computed in float32 as normalise-then-dot.

    Normalising first keeps bf16-sized hidden states from overflowing the dot product and matches
    the reference's numerics.
    """
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def dift_loss_terms(ce: Tensor, pred_hidden: Tensor, target: Tensor, ce_weight: float = DIFT_CE_WEIGHT,
                    sim_weight: float = DIFT_SIM_WEIGHT) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, sim, mean cosine) as tensors; see `dift_loss`."""
    if pred_hidden.shape != target.shape or pred_hidden.dim() != 3:
        raise ValueError(f"pred_hidden {tuple(pred_hidden.shape)} and target {tuple(target.shape)} must "
                         "both be [num_images, latent_size, hidden]")
    if pred_hidden.shape[0] == 0 or pred_hidden.shape[1] == 0:
        sim = ce.new_zeros((), dtype=torch.float32)
        return ce_weight * ce, sim, torch.full_like(sim, float("nan"))
    cos = cosine_similarity_fp32(pred_hidden, target.detach())
    sim = (1.0 - cos).mean(dim=1).mean()
    return ce_weight * ce + sim_weight * sim, sim, cos.mean()


def dift_loss(ce: Tensor, pred_hidden: Tensor, target: Tensor, ce_weight: float = DIFT_CE_WEIGHT,
              sim_weight: float = DIFT_SIM_WEIGHT) -> tuple[Tensor, dict[str, float]]:
    """ce_weight * ce + sim_weight * mean over images of mean over slots of (1 - cos(pred, target)).

    `pred_hidden` and `target` are [num_images, latent_size, hidden]: the hidden state before each
    latent slot and that slot's target (detached here: the targets are not trained). With no
    images the loss is ce_weight * ce. Returns the loss and float metrics loss, ce, sim, cos
    (cos is nan without latents).
    """
    loss, sim, cos = dift_loss_terms(ce, pred_hidden, target, ce_weight, sim_weight)
    metrics = {"loss": float(loss.detach()), "ce": float(ce.detach()), "sim": float(sim.detach()),
               "cos": float(cos.detach())}
    return loss, metrics
