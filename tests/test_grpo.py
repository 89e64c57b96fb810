"""GRPO math: advantages, the text-token mask, the loss against an independent recomputation, batch
building, metrics, and learning on an easy synthetic rule with the tiny model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fourdthinker.config import ConfigError, load_config
from fourdthinker.generation import Completion
from fourdthinker.grpo import (
    TrainRows,
    build_train_rows,
    group_advantages,
    grpo_loss,
    kl_penalty,
    logprob_gap,
    pad_rows,
    rollout_metrics,
    rows_logprob_gap,
    text_token_mask,
    vision_placeholder_ids,
)
from fourdthinker.grpo_config import GrpoConfig
from fourdthinker.rewards import score_completions
from fourdthinker.tokens import LatentIds

IDS = LatentIds(pad=90, start=91, end=92, latent_size=2)


def test_group_advantages_match_a_per_group_numpy_computation():
    rewards = torch.tensor([1.0, 0.0, 0.2, 1.2, 0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 1.0, 0.0])
    got = group_advantages(rewards, group_size=4)
    expected = []
    for group in rewards.numpy().astype(np.float64).reshape(3, 4):
        expected.extend((group - group.mean()) / (group.std(ddof=1) + 1e-4))
    np.testing.assert_allclose(got.numpy(), np.array(expected), rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32


def test_a_group_with_equal_rewards_has_zero_advantages():
    got = group_advantages(torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 0.0]), group_size=3)
    assert torch.equal(got[:3], torch.zeros(3))
    assert got[3] > 0 > got[4]


def test_group_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), group_size=3)


def test_text_mask_drops_latent_tokens_and_padding():
    tokens = torch.tensor([[5, IDS.start, IDS.pad, IDS.pad, IDS.end, 7], [IDS.pad, 6, 0, 0, 0, 0]])
    valid = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    got = text_token_mask(tokens, valid, IDS)
    assert got.tolist() == [[True, False, False, False, False, True], [False, True, False, False, False, False]]


def _reference_loss(logp, old, ref, adv, mask, eps, beta, estimator):
    """Token by token in float64 with Python loops."""
    per_row = []
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            lp, lo, lr = float(logp[i, t]), float(old[i, t]), float(ref[i, t])
            ratio = math.exp(lp - lo)
            surrogate = min(ratio * adv[i], max(1 - eps, min(1 + eps, ratio)) * adv[i])
            kl = lp - lr if estimator == "k1" else math.exp(lr - lp) - (lr - lp) - 1
            terms.append(-surrogate + beta * kl)
        per_row.append(sum(terms) / len(terms) if terms else 0.0)
    return sum(per_row) / len(per_row)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_loss_equals_an_independent_recomputation(estimator):
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 7, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(4, 7, generator=gen, dtype=torch.float64)  # ratios far outside 1 +- eps
    ref = logp + 0.3 * torch.randn(4, 7, generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.5, -0.7, 0.0, -2.0], dtype=torch.float64)
    mask = torch.rand(4, 7, generator=gen) > 0.3
    mask[2] = False  # a row with no text tokens contributes 0
    out = grpo_loss(logp, old, adv, mask, ref_logp=ref, clip_eps=0.2, beta=0.05, kl_estimator=estimator)
    expected = _reference_loss(logp, old, ref, adv.tolist(), mask, 0.2, 0.05, estimator)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    ratio = torch.exp(logp - old)
    active = ((ratio > 1.2) & (adv[:, None] > 0)) | ((ratio < 0.8) & (adv[:, None] < 0))
    assert out.clip_fraction.item() == pytest.approx((active & mask).sum().item() / mask.sum().item())
    assert 0 < out.clip_fraction.item() < 1
    assert out.num_text_tokens == int(mask.sum())


def test_k3_is_nonnegative_and_zero_only_at_equal_logprobs():
    logp = torch.linspace(-5, 0, 11)
    assert torch.all(kl_penalty(logp, logp - 0.3, "k3") > 0)
    assert torch.equal(kl_penalty(logp, logp, "k3"), torch.zeros(11))
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, logp, "k2")


def test_latent_and_padding_tokens_get_zero_gradient():
    tokens = torch.tensor([[5, IDS.start, IDS.pad, IDS.pad, IDS.end, 7, 8], [9, 10, 0, 0, 0, 0, 0]])
    valid = torch.tensor([[True] * 7, [True, True] + [False] * 5])
    mask = text_token_mask(tokens, valid, IDS)
    logp = (-torch.rand(2, 7, generator=torch.Generator().manual_seed(1))).requires_grad_()
    ref = logp.detach() - 0.1
    out = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask, ref_logp=ref, beta=0.5)
    out.loss.backward()
    assert torch.all(logp.grad[~mask] == 0)
    assert torch.all(logp.grad[mask] != 0)
    # ratio == 1 at the first iteration: the policy gradient is -A / n_text per token
    no_kl = logp.detach().clone().requires_grad_()
    grpo_loss(no_kl, no_kl.detach(), torch.tensor([1.0, -1.0]), mask, beta=0.0).loss.backward()
    expected = -torch.tensor([[1.0 / 3], [-1.0 / 2]]) / 2 * mask
    torch.testing.assert_close(no_kl.grad, expected)


def test_loss_requires_reference_logprobs_when_beta_is_positive():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(x, x, torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), beta=0.01)


def _completion(tokens, text="", latents=None, error=None, finish="stop"):
    return Completion(list(tokens), text, [-0.5] * len(tokens), latents, [], finish, error)


def test_build_rows_keeps_latents_and_marks_failed_rollouts_untrainable():
    hidden = 3
    groups = [[_completion([1, IDS.start, IDS.pad, IDS.pad, IDS.end, 2], latents=torch.ones(2, hidden)),
               _completion([3])],
              [_completion([], error="frames unreadable", finish="error"), _completion([4, 5])]]
    rows = build_train_rows(groups, torch.tensor([0.5, -0.5, 0.0, 0.0]), hidden, placeholder_token=0)
    assert rows.prompt_index == [0, 0, 1, 1]
    assert rows.completions[2] == [0] and rows.trainable.tolist() == [True, True, False, True]
    assert rows.latents[0].shape == (2, hidden) and rows.latents[1].shape == (0, hidden)
    shard = rows.shard(1, 2)
    assert shard.prompt_index == [1, 1] and shard.advantages.tolist() == [0.0, 0.0]
    assert [len(mb) for mb in rows.micro_batches(3)] == [3, 1]
    with pytest.raises(ValueError, match="evenly"):
        rows.shard(0, 3)


def test_logprob_gap_and_padding():
    a, valid = pad_rows([torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.0])])
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    b = a.clone()
    b[0, 1] += 0.25
    b[1, 2] += 9.0  # padding: not counted
    assert logprob_gap(a, b, valid) == pytest.approx((0.25, 0.0625))


def test_rows_gap_counts_text_tokens_of_trainable_rows_only():
    completions = [[5, IDS.start, IDS.pad, IDS.pad, IDS.end, 7], [6, 8], [0]]
    rollout = [torch.zeros(len(c)) for c in completions]
    learner = [torch.tensor([0.1, 5.0, 5.0, 5.0, 5.0, -0.3]),  # latent tokens: not counted
               torch.tensor([0.2, 0.0]),
               torch.tensor([9.0])]  # the untrainable placeholder row: not counted
    rows = TrainRows([0, 0, 1], completions, [torch.zeros(0, 4)] * 3, rollout, torch.zeros(3),
                     torch.tensor([True, True, False]))
    counted = [0.1, 0.3, 0.2, 0.0]  # |learner - rollout| at the text tokens of rows 0 and 1
    assert rows_logprob_gap(learner, rows, IDS) == pytest.approx((max(counted), sum(counted) / len(counted)))


def test_rollout_metrics_report_each_reward_and_latent_blocks():
    block = [IDS.start, IDS.pad, IDS.pad, IDS.end]
    texts = ["<think>x</think><answer>A</answer>", "B", "<think>y</think><answer>B</answer>", "A"]
    groups = [[_completion([1] + block + [2], texts[0]), _completion([1, 2, 3], texts[1], finish="length")],
              [_completion(block + block, texts[2]), _completion([7], texts[3])]]
    scores = score_completions(texts, ["A", "A", "A", "A"])
    got = rollout_metrics(groups, scores, IDS)
    assert got["accuracy"] == 0.5 and got["format_rate"] == 0.5
    assert got["reward/total/mean"] == pytest.approx(np.mean([1.2, 0.0, 0.2, 1.0]))
    assert got["reward/accuracy/std"] == pytest.approx(0.5)
    assert got["latent_blocks/mean"] == pytest.approx(0.75)
    assert got["completion_length/mean"] == pytest.approx((6 + 3 + 8 + 1) / 4)
    assert got["truncated_rate"] == 0.25 and got["rollout_errors"] == 0


def test_config_defaults_follow_the_reference_and_bad_values_name_the_key(tmp_path):
    cfg = load_config(GrpoConfig, None, ["model_dir=m", "train_jsonl=d.jsonl"])
    assert (cfg.num_generations, cfg.lr, cfg.beta, cfg.clip_eps) == (8, 1e-6, 0.01, 0.2)
    assert [(s.name, s.weight) for s in cfg.reward_specs()] == [("accuracy", 1.0), ("format", 0.2)]
    with pytest.raises(ConfigError, match="num_learners"):
        load_config(GrpoConfig, None, ["model_dir=m", "train_jsonl=d", "prompts_per_step=3",
                                       "num_generations=2", "num_learners=4"])
    with pytest.raises(ConfigError, match="kl_estimator"):
        load_config(GrpoConfig, None, ["model_dir=m", "train_jsonl=d", "kl_estimator=k2"])
    with pytest.raises(ConfigError, match="num_generations"):
        load_config(GrpoConfig, None, ["model_dir=m", "train_jsonl=d", "num_generations=1"])
    with pytest.raises(Exception, match="unknown reward"):
        load_config(GrpoConfig, None, ["model_dir=m", "train_jsonl=d", "rewards={speed: 1.0}"])


def test_grpo_learns_an_easy_rule_on_the_tiny_model(tiny_model_dir):
    """Reward = share of sampled tokens with an even id: a rule a random 2M-parameter policy can
    pick up in a few dozen steps. Rollouts and log-probs are the library's (HF path)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from fourdthinker.data.collate import prompt_batch
    from fourdthinker.model import completion_logprobs, generate_latent

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    ids = LatentIds.from_config(policy.config)
    hidden = policy.config.text_config.hidden_size
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    group, questions = 8, ["Pan or tilt?", "Which way does it move?"]
    inputs = prompt_batch(processor, [(q, None) for q in questions for _ in range(group)])
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(14):
        policy.eval()
        out = generate_latent(policy, inputs, ids, 6, do_sample=True, generator=gen, eos_token_ids=[])
        rewards = torch.tensor([float(np.mean([t % 2 == 0 for t in seq])) for seq in out.sequences])
        history.append(rewards.mean().item())
        completions = [Completion(seq, "", lp.tolist(), lat, [], "length")
                       for seq, lp, lat in zip(out.sequences, out.logprobs, out.latents)]
        rows = build_train_rows([completions], group_advantages(rewards, group), hidden,
                                placeholder_token=processor.tokenizer.pad_token_id,
                                untrainable_tokens=vision_placeholder_ids(policy.config))
        policy.train()
        logp, valid = pad_rows(completion_logprobs(policy, inputs, rows.completions, rows.latents, ids))
        with torch.no_grad():
            ref, _ = pad_rows(completion_logprobs(reference, inputs, rows.completions, rows.latents, ids))
        tokens, _ = pad_rows([torch.tensor(s) for s in rows.completions])
        mask = text_token_mask(tokens, valid, ids) & rows.trainable.unsqueeze(1)
        # the rollout's own log-probs are the learner's (same weights): the consistency gap is ~0
        rollout, _ = pad_rows(rows.rollout_logprobs)
        assert logprob_gap(logp, rollout, mask)[0] < 1e-4
        loss = grpo_loss(logp, logp.detach(), rows.advantages, mask, ref_logp=ref, beta=0.01).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    early, late = np.mean(history[:3]), np.mean(history[-3:])
    assert late > early + 0.2, history
