"""Shared fixtures: everything is built offline, once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never reach a hub; fail fast if something tries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# vLLM engines of the tests run in-process: a third of the start-up time of the multi-process
# engine on CPU. The multi-process path is exercised by the Ray rollout-actor test.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# Without a GPU, Triton kernels (the V2 runner's latent kernels) run in Triton's interpreter on CPU
# tensors. It is chosen when a kernel is defined, triton.language's own included: set it before
# anything imports triton. (vLLM decides on its Triton use from the GPU drivers, not from this.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL with latent tokens (fp32, seed 0), shared by the whole session."""
    from fourdthinker.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def engine_test_kwargs() -> dict:
    """Engine settings of the vLLM tests: the defaults on CPU; on a GPU (the lent machine: these
    tests then exercise vLLM's V2 runner) fp32, to compare with the fp32 HF reference, and a share
    of the GPU small enough for the module's two engines."""
    return {"dtype": "float32", "gpu_memory_utilization": 0.2} if torch.cuda.is_available() else {}


@pytest.fixture(scope="session")
def plain_llm(tiny_model_dir):
    """A plain vLLM engine (no latent plugin) on the tiny model, in-process."""
    from fourdthinker.vllm_plugin.engine import make_llm

    return make_llm(tiny_model_dir, latent=False, max_model_len=2048, max_num_seqs=16, **engine_test_kwargs())


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
