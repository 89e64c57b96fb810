"""Shared fixtures: everything is built offline, once per test session."""

from __future__ import annotations

import os

import pytest

# Tests never reach a hub; fail fast if something tries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL with latent tokens (fp32, seed 0), shared by the whole session."""
    from fourdthinker.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)
