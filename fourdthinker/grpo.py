"""GRPO math for 4DRL: group advantages, the clipped-ratio loss with a KL penalty, the training
batch built from rollout completions, and the step metrics. Pure functions, no Ray.

What is specific to latent reasoning: a completion's latent block (`<|latent_start|>`, the pad
slots, `<|latent_end|>`) is not sampled text: pads and end are forced by the decoder and the pad
slots carry hidden states, so the policy-gradient and KL terms average over *text* tokens only;
and each row keeps the latent vectors its rollout fed, so the learner can score the same sequence
the rollout sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fourdthinker.rewards import RewardScores
from fourdthinker.tokens import LatentIds
from fourdthinker.vllm_plugin.generate import Completion

KL_ESTIMATORS = ("k1", "k3")


# -- advantages -------------------------------------------------------------------------------------
def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(r - mean_group) / (std_group + eps) for rewards laid out group after group.

    The unbiased std, as the reference computes it; a group whose rewards are all equal gets
    advantage 0 (it carries no signal about which completion is better).
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group needs at least 2 completions")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    groups = rewards.double().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, keepdim=True) + eps)).flatten().float()


# -- token masks and padding ------------------------------------------------------------------------
def text_token_mask(tokens: Tensor, valid: Tensor, latent_ids: LatentIds) -> Tensor:
    """True at valid completion tokens that are text: latent pad/start/end are masked out."""
    latent = torch.tensor([latent_ids.pad, latent_ids.start, latent_ids.end], device=tokens.device)
    return valid & ~torch.isin(tokens, latent)


def pad_rows(rows: Sequence[Tensor], value: float = 0.0) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D tensors to [N, max_len]; returns (padded, valid mask)."""
    lengths = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
    padded = torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=value)
    valid = torch.arange(padded.shape[1], device=padded.device) < lengths.unsqueeze(1)
    return padded, valid


# -- the loss ---------------------------------------------------------------------------------------
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


def logprob_gap(learner_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> tuple[float, float]:
    """(max, mean) |learner - rollout| log-prob over masked tokens: the policy-consistency gap."""
    diff = (learner_logp.detach().float() - rollout_logp.float()).abs()[mask]
    if diff.numel() == 0:
        return 0.0, 0.0
    return float(diff.max()), float(diff.mean())


def vision_placeholder_ids(model_config) -> list[int]:
    """The image/video placeholder token ids of a Qwen2.5-VL config (see `build_train_rows`)."""
    return [int(model_config.image_token_id), int(model_config.video_token_id)]


# -- the training batch -----------------------------------------------------------------------------
@dataclass
class TrainRows:
    """Completions ready for the learner: one row per completion, grouped by prompt.

    `prompt_index[i]` says which prompt of the step row i answers; `latents[i]` are the vectors its
    rollout fed at its latent slots ([0, H] when none). A row whose rollout failed carries one
    placeholder token and `trainable` False: it keeps the batch shape and contributes no loss.
    """

    prompt_index: list[int]
    completions: list[list[int]]
    latents: list[Tensor]
    rollout_logprobs: list[Tensor]
    advantages: Tensor  # [N] float32
    trainable: Tensor  # [N] bool

    def __len__(self) -> int:
        return len(self.completions)

    def select(self, rows: Sequence[int] | range) -> "TrainRows":
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long)
        return TrainRows([self.prompt_index[i] for i in rows], [self.completions[i] for i in rows],
                         [self.latents[i] for i in rows], [self.rollout_logprobs[i] for i in rows],
                         self.advantages[index], self.trainable[index])

    def shard(self, rank: int, world_size: int) -> "TrainRows":
        """The contiguous rank-th of `world_size` equal parts (the caller makes them divide)."""
        if len(self) % world_size:
            raise ValueError(f"{len(self)} rows do not split evenly over {world_size} learners")
        size = len(self) // world_size
        return self.select(range(rank * size, (rank + 1) * size))

    def micro_batches(self, size: int) -> list["TrainRows"]:
        return [self.select(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]


def build_train_rows(groups: Sequence[Sequence[Completion]], advantages: Tensor, hidden_size: int,
                     placeholder_token: int, untrainable_tokens: Sequence[int] = ()) -> TrainRows:
    """Flatten per-prompt completion groups (prompt-major, as `advantages` is laid out).

    A completion that failed, is empty, or sampled one of `untrainable_tokens` becomes an
    untrainable placeholder row. Pass the vision placeholder ids there: the engine decodes a sampled
    `<|video_pad|>` as plain text, but a teacher-forced forward would try to put video features
    at it, so such a row cannot be scored the way it was sampled.
    """
    banned = set(untrainable_tokens)
    prompt_index, completions, latents, logprobs, trainable = [], [], [], [], []
    for p, group in enumerate(groups):
        for c in group:
            ok = c.error is None and len(c.token_ids) > 0 and banned.isdisjoint(c.token_ids)
            prompt_index.append(p)
            completions.append(list(c.token_ids) if ok else [placeholder_token])
            vectors = c.latents if ok and c.latents is not None else torch.zeros(0, hidden_size)
            latents.append(vectors.float())
            logprobs.append(torch.tensor(c.logprobs if ok else [0.0], dtype=torch.float32))
            trainable.append(ok)
    if len(completions) != advantages.numel():
        raise ValueError(f"{len(completions)} completions but {advantages.numel()} advantages")
    return TrainRows(prompt_index, completions, latents, logprobs, advantages.float(),
                     torch.tensor(trainable, dtype=torch.bool))


# -- step metrics -----------------------------------------------------------------------------------
def rollout_metrics(groups: Sequence[Sequence[Completion]], scores: RewardScores,
                    latent_ids: LatentIds) -> dict[str, float]:
    """Reward mean/std per function and in total, accuracy, format rate, completion length and
    latent blocks per completion, reward/rollout error counts."""
    flat = [c for group in groups for c in group]
    out: dict[str, float] = {}
    for name, values in scores.per_reward.items():
        out[f"reward/{name}/mean"] = float(np.mean(values))
        out[f"reward/{name}/std"] = float(np.std(values))
        out[f"reward/{name}/errors"] = float(scores.errors.get(name, 0))
    out["reward/total/mean"] = float(np.mean(scores.total))
    out["reward/total/std"] = float(np.std(scores.total))
    if "accuracy" in scores.per_reward:
        out["accuracy"] = out["reward/accuracy/mean"]
    if "format" in scores.per_reward:
        out["format_rate"] = out["reward/format/mean"]
    lengths = np.array([len(c.token_ids) for c in flat], dtype=np.float64)
    blocks = np.array([c.token_ids.count(latent_ids.start) for c in flat], dtype=np.float64)
    out["completion_length/mean"] = float(lengths.mean())
    out["completion_length/max"] = float(lengths.max())
    out["latent_blocks/mean"] = float(blocks.mean())
    out["truncated_rate"] = float(np.mean([c.finish_reason == "length" for c in flat]))
    out["rollout_errors"] = float(sum(c.error is not None for c in flat))
    return out
