"""The learner group (2 DeepSpeed ranks over gloo in Ray actors) against a vLLM rollout actor:
policy consistency right after a weight sync, and a non-finite loss that skips the step."""

from __future__ import annotations

import pytest
import torch
from rl_rows import PROMPTS, max_gap, rollout_rows

from fourdthinker.grpo_config import GrpoConfig
from fourdthinker.tokens import LatentIds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    import ray
    from transformers import AutoConfig

    from fourdthinker.actors.learner import LearnerGroup
    from fourdthinker.actors.rollout import rollout_actor_class

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}})
    cfg = GrpoConfig(model_dir=str(tiny_model_dir), train_jsonl="-", prompts_per_step=2, num_generations=2,
                     num_learners=2, micro_batch_size=1, learner_gpus=0, learner_cpus=0.25, lr=1e-2,
                     zero_stage=2, gradient_checkpointing=False, bf16=False, weight_bucket_mb=1)
    cfg.validate()
    rollout = rollout_actor_class(num_gpus=0, num_cpus=0.25).remote(
        str(tiny_model_dir), {"max_model_len": 1024, "max_num_seqs": 8})
    group = LearnerGroup(cfg)
    config = AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True)
    yield ray, group, rollout, config
    group.shutdown()
    ray.shutdown()


def test_after_a_sync_learner_and_rollout_logprobs_agree_with_fed_latents_only(cluster, tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fourdthinker.data.collate import prompt_batch
    from fourdthinker.model import completion_logprobs

    ray, group, rollout, config = cluster
    ids = LatentIds.from_config(config)
    before = group.parameter_checksums()
    metrics = group.train_step(PROMPTS, rollout_rows(ray, rollout, config))
    after = group.parameter_checksums()
    assert metrics["optimizer_steps"] == 1 and after[0] == after[1] != before[0]  # ZeRO-2: same full model
    assert metrics["logprob_gap/max"] < 1e-3  # step 0: both sides still hold the initial weights
    sync = group.broadcast_weights([rollout], version=1)
    assert sync["sync_bytes"] > 0 and ray.get(rollout.health.remote())["version"] == 1

    rows = rollout_rows(ray, rollout, config)
    assert all(lat.shape[0] >= ids.latent_size for lat in rows.latents)
    assert max_gap(group.logprobs(PROMPTS, rows), rows, ids) < 1e-3

    # The rollout really runs the synced weights: the initial model scores the same tokens differently.
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    inputs = prompt_batch(_processor(tiny_model_dir), [PROMPTS[i] for i in rows.prompt_index])
    with torch.no_grad():
        old = completion_logprobs(initial, inputs, rows.completions, rows.latents, ids)
    assert max_gap(old, rows, ids) > 1e-2

    # The reference learner's mistake, pad embeddings at the latent slots, fails the same check.
    pad = initial.get_input_embeddings().weight[ids.pad].detach()
    rows.latents = [pad.expand(lat.shape[0], -1).clone() for lat in rows.latents]
    assert max_gap(group.logprobs(PROMPTS, rows), rows, ids) > 1e-2


def _processor(model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


def test_a_nonfinite_loss_skips_the_step_and_leaves_the_weights(cluster):
    ray, group, rollout, config = cluster
    rows = rollout_rows(ray, rollout, config, advantages=torch.tensor([float("nan"), 1.0, -1.0, 0.5]))
    before = group.parameter_checksums()
    metrics = group.train_step(PROMPTS, rows)
    assert metrics["skipped_steps"] == 1 and metrics["optimizer_steps"] == 0
    assert metrics["nonfinite_losses"] >= 1
    assert group.parameter_checksums() == before
    # and the next good step trains again
    assert group.train_step(PROMPTS, rollout_rows(ray, rollout, config))["optimizer_steps"] == 1


def test_one_step_raises_the_logprob_of_positive_advantage_rows_and_lowers_negative_ones(cluster):
    """Which way the policy moved: a sign slip in the advantages (or the loss) trains the wrong way,
    which no loss-falls or consistency check sees."""
    from fourdthinker.grpo import pad_rows, trainable_text_mask

    ray, group, rollout, config = cluster
    ids = LatentIds.from_config(config)
    rows = rollout_rows(ray, rollout, config)  # advantages +1, -1, +1, -1

    def mean_text_logprob():
        logp, valid = pad_rows(group.logprobs(PROMPTS, rows))
        mask = trainable_text_mask(rows, valid, ids).float()
        return (logp * mask).sum(1) / mask.sum(1)

    before = mean_text_logprob()
    assert group.train_step(PROMPTS, rows)["optimizer_steps"] == 1
    change = mean_text_logprob() - before
    positive, negative = rows.advantages > 0, rows.advantages < 0
    assert positive.any() and negative.any()
    assert (change[positive] > 0).all(), change
    assert (change[negative] < 0).all(), change
