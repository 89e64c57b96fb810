"""Latent-aware generation with a vLLM engine: prompts with video in, tokens + latents out.

`LatentGenerator` (vLLM's synchronous `LLM`) is the library half of the rollout actor, evaluation and
`fourdthinker infer`; `async_generate.AsyncLatentGenerator` (vLLM's `AsyncLLM`) is the serving
replica's. Both are a `LatentPrompter`, the one implementation of what they share: it builds the
chat prompt with the one video policy, submits one vLLM request per sample (so each sample's latent
vectors can be fetched by key, and the shared prompt stays in the prefix cache), and returns per
sample the token ids, text, log-probs of the sampled tokens, the latent vectors fed at each
`<|latent_pad|>` slot, and the finish reason. A request that cannot be built (frames that do not
load, a prompt longer than the context) fails alone, with its error; the others complete.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from fourdthinker.data.video import MAX_FRAMES, MAX_PIXELS, VIDEO_FPS, decode_video, fit_frames, load_frames
from fourdthinker.generation import Completion, GenerationRequest, SamplingConfig
from fourdthinker.tokens import LatentIds


@dataclass
class Prepared:
    """One request ready for the engine: its vLLM prompt (None when it cannot run, with `error`),
    its prompt length with the video, the frames the model sees (for the latent viewer) and the
    latent keys of its samples."""

    prompt: dict[str, Any] | None
    num_prompt_tokens: int = 0
    error: str | None = None
    keys: list[str] = field(default_factory=list)
    frames: list[Image.Image] | None = None


class LatentPrompter:
    """The engine-independent half of a latent generator, shared by the sync `LatentGenerator`
    (rollouts, evaluation, `fourdthinker infer`) and `async_generate.AsyncLatentGenerator`
    (serving): prompts under the one video policy, each sample's sampling parameters, and its
    `Completion` from vLLM's output and popped latents."""

    def __init__(self, processor, latent_ids: LatentIds, max_model_len: int, max_frames: int = MAX_FRAMES,
                 max_pixels: int = MAX_PIXELS):
        self.processor = processor
        self.latent_ids = latent_ids
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        self.max_model_len = max_model_len
        # Part of every prompt's prefix-cache key (vLLM hashes it into a request's first KV block,
        # and so into every block after it). A new salt per weight version makes blocks computed
        # with older weights unmatchable, where `reset_prefix_cache` walks every block of the pool
        # (O(pool), ~2 ms per 50k blocks on the host) on each sync; stale blocks age out as usual.
        self.cache_salt: str | None = None

    @staticmethod
    def load_processor(model_dir: str | Path):
        """The checkpoint's processor and latent token ids (read from its config, never hard-coded)."""
        from transformers import AutoConfig, AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        return processor, LatentIds.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))

    # -- prompts --------------------------------------------------------------------------------
    def _frames(self, req: GenerationRequest) -> list[Image.Image] | None:
        if req.frames is not None:
            return fit_frames(list(req.frames), self.max_frames, self.max_pixels)
        if req.frame_paths is not None:
            return load_frames(req.frame_paths, self.max_frames, self.max_pixels)
        if req.video_path is not None:
            return decode_video(req.video_path, VIDEO_FPS, self.max_frames, self.max_pixels)
        return None

    def prepare(self, req: GenerationRequest) -> Prepared:
        """The vLLM prompt of one request, or the reason it cannot run."""
        from fourdthinker.data.collate import chat_messages

        try:
            frames = self._frames(req)
        except Exception as err:  # noqa: BLE001 - any unreadable input fails this request only
            return Prepared(None, error=str(err))
        text = self.processor.apply_chat_template(chat_messages(req.text, frames), add_generation_prompt=True)
        prompt: dict[str, Any] = {"prompt": text}
        if self.cache_salt is not None:
            prompt["cache_salt"] = self.cache_salt
        num_tokens = len(self.processor.tokenizer(text).input_ids)
        if frames:
            arr = np.stack([np.asarray(f) for f in frames])
            prompt["multi_modal_data"] = {"video": [arr]}
            # vLLM hands these to the HF processor; transformers 5 reads the frame rate (and so
            # M-RoPE's temporal step) from video_metadata, not from the (arr, meta) tuple.
            prompt["mm_processor_kwargs"] = {"do_sample_frames": False,
                                             "video_metadata": [{"fps": VIDEO_FPS, "total_num_frames": len(frames)}]}
            grid_t = -(-len(frames) // 2)
            h, w = arr.shape[1:3]
            num_tokens += grid_t * (h // 28) * (w // 28) - 1  # video pads replace one placeholder
        if num_tokens >= self.max_model_len:
            return Prepared(None, num_tokens, error=(
                f"prompt has {num_tokens} tokens with its video, the engine's context is "
                f"{self.max_model_len}: use fewer frames/pixels or a larger max_model_len"), frames=frames)
        return Prepared(prompt, num_tokens, frames=frames)

    def video_inputs(self, frames: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """The vision tower's inputs for a policy-fit clip (`pixel_values_videos`, `video_grid_thw`),
        exactly as the engine's processor makes them."""
        from fourdthinker.data.video import video_processor_kwargs

        kwargs = video_processor_kwargs([frames])
        kwargs.pop("cap_pixels_per_frame", None)
        out = self.processor.video_processor(videos=[list(frames)], return_tensors="pt", **kwargs)
        return {"pixel_values_videos": out["pixel_values_videos"], "video_grid_thw": out["video_grid_thw"]}

    def video_grid(self, inputs: dict[str, torch.Tensor]):
        from fourdthinker.latent_viewer import VideoGrid

        return VideoGrid.from_grid_thw(inputs["video_grid_thw"][0].tolist(), self.processor.video_processor)

    # -- samples --------------------------------------------------------------------------------
    def sampling_params(self, prep: Prepared, req: GenerationRequest, sampling: SamplingConfig, key: str,
                        seed_offset: int):
        """vLLM parameters of one sample (n=1, keyed so its latents can be popped); a seeded request
        gives sample j the seed `sampling.seed + seed_offset`."""
        from vllm import SamplingParams

        extra: dict[str, Any] = {"latent_key": key}
        if req.force_latent_steps:
            extra["latent_force_steps"] = [int(s) for s in req.force_latent_steps]
        return SamplingParams(
            n=1, max_tokens=min(sampling.max_tokens, self.max_model_len - prep.num_prompt_tokens),
            temperature=sampling.temperature, top_p=sampling.top_p,
            seed=None if sampling.seed is None else sampling.seed + seed_offset,
            ignore_eos=sampling.ignore_eos, logprobs=0, skip_special_tokens=False, extra_args=extra)

    @staticmethod
    def completion(out, latents: tuple[list[int], torch.Tensor | None]) -> Completion:
        """One finished vLLM `RequestOutput` (n=1) and its popped (positions, vectors) as a `Completion`."""
        o = out.outputs[0]
        positions, vectors = latents
        start = len(out.prompt_token_ids)
        token_ids = list(o.token_ids)
        logprobs = [float(step[tok].logprob) for step, tok in zip(o.logprobs or [], token_ids)]
        rel = [p - start for p in positions]
        if rel and rel[-1] >= len(token_ids):  # a block cut by max_tokens: last vector never fed
            keep = [k for k, r in enumerate(rel) if r < len(token_ids)]
            rel, vectors = [rel[k] for k in keep], (vectors[keep] if keep else None)
        return Completion(token_ids, o.text, logprobs, vectors, rel, o.finish_reason or "stop")

    @staticmethod
    def failed(prep: Prepared) -> Completion:
        return Completion([], "", [], None, [], "error", prep.error)


class LatentGenerator(LatentPrompter):
    """Batch generation on vLLM's synchronous `LLM` (the rollout actor's and evaluation's engine)."""

    def __init__(self, llm, processor, latent_ids: LatentIds, max_frames: int = MAX_FRAMES,
                 max_pixels: int = MAX_PIXELS):
        super().__init__(processor, latent_ids, llm.llm_engine.model_config.max_model_len, max_frames, max_pixels)
        self.llm = llm

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, **engine_kwargs) -> "LatentGenerator":
        from fourdthinker.vllm_plugin.engine import make_llm

        processor, ids = cls.load_processor(model_dir)
        return cls(make_llm(model_dir, latent=True, **engine_kwargs), processor, ids)

    # -- generation -----------------------------------------------------------------------------
    def pop_latents(self, keys: list[str]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        """Fetch (and forget) the latent vectors of finished requests, by their latent_key."""
        from fourdthinker.vllm_plugin.extension import decode_latents

        return decode_latents(self.llm.collective_rpc("latent_pop", args=(list(keys),))[0]) if keys else {}

    def video_features(self, frames: Sequence[Image.Image]):
        """The engine's own merged vision features of a clip ([tokens, hidden], float32) and
        their layout (`latent_viewer.VideoGrid`)."""
        from fourdthinker.vllm_plugin.extension import decode_tensor, encode_video_inputs

        inputs = self.video_inputs(frames)
        wire = self.llm.collective_rpc("latent_video_features", args=(encode_video_inputs(inputs),))[0]
        return decode_tensor(wire), self.video_grid(inputs)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[list[Completion]]:
        prepared = [self.prepare(r) for r in requests]
        prompts, params, where = [], [], []
        for i, (req, prep) in enumerate(zip(requests, prepared)):
            if prep.prompt is None:
                continue
            for j in range(sampling.n):
                key = uuid.uuid4().hex
                prep.keys.append(key)
                prompts.append(prep.prompt)
                params.append(self.sampling_params(prep, req, sampling, key, seed_offset=len(prompts)))
                where.append((i, j))
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        keys = [k for p in prepared for k in p.keys]
        latents = self.pop_latents(keys)

        results: list[list[Completion]] = [[] for _ in requests]
        for (i, _), out, key in zip(where, outputs, keys):
            results[i].append(self.completion(out, latents.get(key, ([], None))))
        for i, prep in enumerate(prepared):
            if prep.prompt is None:
                results[i] = [self.failed(prep)] * sampling.n
        return results
