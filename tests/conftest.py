"""Shared fixtures: everything is built offline, once per test session."""

from __future__ import annotations

import os

import pytest

# Tests never reach a hub; fail fast if something tries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# vLLM engines of the tests run in-process: a third of the start-up time of the multi-process
# engine on CPU. The multi-process path is exercised by the Ray rollout-actor test.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL with latent tokens (fp32, seed 0), shared by the whole session."""
    from fourdthinker.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def plain_llm(tiny_model_dir):
    """A plain vLLM engine (no latent plugin) on the tiny model, in-process on CPU."""
    from fourdthinker.vllm_plugin.engine import make_llm

    return make_llm(tiny_model_dir, latent=False, max_model_len=2048, max_num_seqs=16)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny model loaded with transformers, vision tower frozen (as DIFT trains it)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fourdthinker.model import freeze_vision_tower

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    freeze_vision_tower(model)
    return model


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def ids(model):
    from fourdthinker.tokens import LatentIds

    return LatentIds.from_config(model.config)
