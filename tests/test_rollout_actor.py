"""The rollout actor under Ray: a multi-process vLLM engine with the plugin inside a Ray actor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fourdthinker.generation import GenerationRequest, SamplingConfig
from fourdthinker.prompts import question_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # The actor's engine runs its own worker process (vLLM's default), unlike the in-process
    # engines of the other tests.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}})
    yield ray
    ray.shutdown()


def test_actor_generates_with_latents_takes_new_weights_and_reports_its_version(ray_local, tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fourdthinker.actors.rollout import rollout_actor_class
    from fourdthinker.weights import pack_buckets

    ray = ray_local
    actor = rollout_actor_class(num_gpus=0, num_cpus=1).remote(
        str(tiny_model_dir), {"max_model_len": 1024, "max_num_seqs": 8})
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(2)]
    requests = [GenerationRequest(question_prompt("Which way does it move?"), frames=frames, force_latent_steps=[1]),
                GenerationRequest(question_prompt("Pan or tilt?"))]
    sampling = SamplingConfig(n=2, max_tokens=10, temperature=0.0, ignore_eos=True)
    first = ray.get(actor.generate.remote(requests, sampling))
    assert [len(group) for group in first] == [2, 2]
    block = first[0][0]
    assert block.latents is not None and block.latents.shape[0] == 4
    assert block.token_ids == first[0][1].token_ids  # greedy: both samples agree

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True)
    g = torch.Generator().manual_seed(3)
    perturbed = [(n, p.detach() + 0.05 * torch.randn(p.shape, generator=g)) for n, p in model.named_parameters()]
    assert ray.get(actor.update_weights.remote(list(pack_buckets(perturbed)), 1))["version"] == 1
    after = ray.get(actor.generate.remote(requests, sampling))
    assert after[1][0].token_ids != first[1][0].token_ids
    health = ray.get(actor.health.remote())
    assert health["version"] == 1 and health["generated_tokens"] == 2 * 4 * 10
