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

from fourdthinker.generation import Completion
from fourdthinker.losses import KL_ESTIMATORS, GrpoLoss, grpo_loss, kl_penalty  # noqa: F401  (re-exported)
from fourdthinker.rewards import RewardScores
from fourdthinker.tokens import LatentIds


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


def trainable_text_mask(rows: TrainRows, valid: Tensor, latent_ids: LatentIds) -> Tensor:
    """[N, T] True at the completion tokens that carry loss and the consistency gap: text tokens
    (`valid` marks each row's length after `pad_rows`) of trainable rows."""
    tokens, _ = pad_rows([torch.tensor(c, device=valid.device) for c in rows.completions])
    return text_token_mask(tokens, valid, latent_ids) & rows.trainable.to(valid.device).unsqueeze(1)


def rows_logprob_gap(learner_logprobs: Sequence[Tensor], rows: TrainRows, latent_ids: LatentIds) -> tuple[float, float]:
    """(max, mean) |learner - rollout| log-prob over `trainable_text_mask`: the policy-consistency gap
    of whole rows (an untrainable row is a placeholder whose rollout log-prob means nothing)."""
    learner, valid = pad_rows(list(learner_logprobs))
    rollout, _ = pad_rows([r.to(learner.device) for r in rows.rollout_logprobs])
    return logprob_gap(learner, rollout, trainable_text_mask(rows, valid, latent_ids))


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
