"""What a generation request and its completion are: the types the rollout engine (vLLM plugin),
the GRPO math, the actors, evaluation and serving all exchange. Plain data, no engine imports, so the
math never depends on the plugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image


@dataclass
class GenerationRequest:
    """One prompt: the user text (question + options + suffix) and its clip, as frames or a path."""

    text: str
    frames: Sequence[Image.Image] | None = None
    frame_paths: Sequence[str] | None = None
    video_path: str | None = None
    force_latent_steps: Sequence[int] = ()  # test/probe hook: output steps forced to <|latent_start|>


@dataclass
class SamplingConfig:
    n: int = 1
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float]  # raw log-prob of each generated token (forced ones included)
    latents: torch.Tensor | None  # [num_latent_slots, hidden] the vectors fed, in the engine's dtype
    latent_positions: list[int]  # completion-relative index of each latent slot
    finish_reason: str
    error: str | None = None
