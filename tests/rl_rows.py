"""Rollout rows for learner tests: two prompts (one with a clip), completions forced to hold latent
blocks, turned into the learner's TrainRows."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fourdthinker.generation import GenerationRequest, SamplingConfig
from fourdthinker.grpo import build_train_rows, rows_logprob_gap, vision_placeholder_ids
from fourdthinker.prompts import question_prompt


def clip(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(2)]


PROMPTS = [(question_prompt("Which way does the camera pan?", {"A": "Left", "B": "Right"}), clip(0)),
           (question_prompt("Is the cube moving toward the camera?"), None)]
FORCES = [[1, 9], [3]]  # every completion holds latent blocks
SAMPLING = SamplingConfig(n=2, max_tokens=16, temperature=1.0, top_p=1.0, seed=5, ignore_eos=True)


def rollout_rows(ray, rollout, config, advantages=None):
    requests = [GenerationRequest(text, frames=frames, force_latent_steps=f)
                for (text, frames), f in zip(PROMPTS, FORCES)]
    groups = ray.get(rollout.generate.remote(requests, SAMPLING))
    n = sum(len(g) for g in groups)
    adv = torch.tensor([1.0, -1.0] * (n // 2)) if advantages is None else advantages
    return build_train_rows(groups, adv, config.text_config.hidden_size, config.text_config.pad_token_id,
                            vision_placeholder_ids(config))


def max_gap(learner_logprobs, rows, ids) -> float:
    """Largest |learner - rollout| log-prob over the text tokens of the trainable rows."""
    return rows_logprob_gap(learner_logprobs, rows, ids)[0]
