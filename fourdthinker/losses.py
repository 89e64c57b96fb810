"""Training losses. DIFT: next-token CE on the text plus a cosine loss that pulls the hidden state
before each latent slot towards that slot's target vision features. GRPO: the clipped policy-gradient
objective with a KL penalty, over text tokens only."""

from __future__ import annotations

from dataclasses import dataclass

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


# -- GRPO (4DRL) ----------------------------------------------------------------------------------
KL_ESTIMATORS = ("k1", "k3")

def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1 = logp - ref (unbiased, can be negative; the reference's choice);
    k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0, lower variance).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        delta = ref_logp - logp
        return torch.exp(delta) - delta - 1
    raise ValueError(f"kl_estimator={estimator!r}: choose one of {KL_ESTIMATORS}")


@dataclass
class GrpoLoss:
    loss: Tensor  # differentiable scalar
    policy_loss: Tensor  # detached scalars below: means over text tokens (per row, then rows)
    kl: Tensor
    clip_fraction: Tensor
    ratio_mean: Tensor
    num_text_tokens: int

    def metrics(self) -> dict[str, float]:
        values = torch.stack([self.loss.detach(), self.policy_loss, self.kl, self.clip_fraction,
                              self.ratio_mean]).tolist()
        return dict(zip(("loss", "policy_loss", "kl", "clip_fraction", "ratio_mean"), values))


def _row_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over each row's masked tokens, then over rows; a row with no tokens counts as 0."""
    per_row = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_row.mean()


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
              ref_logp: Tensor | None = None, clip_eps: float = 0.2, beta: float = 0.01,
              kl_estimator: str = "k3") -> GrpoLoss:
    """The GRPO objective of a batch of completions, as a loss to minimise.

    Per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL, with
    ratio = exp(logp - old_logp) and A the row's advantage; averaged over each row's `mask` tokens
    (its text tokens), then over rows. `logp`, `old_logp`, `ref_logp`, `mask` are [N, T];
    `advantages` is [N]. Only `logp` carries gradient.
    """
    if not logp.shape == old_logp.shape == mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"shapes disagree: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, "
                         f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs the reference model's log-probs (ref_logp)")
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    policy_loss = _row_mean(per_token, mask)
    loss = policy_loss
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None:
        kl = _row_mean(kl_penalty(logp, ref_logp.detach(), kl_estimator), mask)
        if beta > 0:
            loss = loss + beta * kl
    with torch.no_grad():
        # The clip is active where the clipped surrogate is the smaller one (no gradient flows).
        active = (clipped < unclipped).to(logp.dtype)
        clip_fraction = (active * mask).sum() / mask.sum().clamp(min=1)
        ratio_mean = (ratio * mask).sum() / mask.sum().clamp(min=1)
    return GrpoLoss(loss=loss, policy_loss=policy_loss.detach(), kl=kl.detach(),
                    clip_fraction=clip_fraction, ratio_mean=ratio_mean,
                    num_text_tokens=int(mask.sum()))
