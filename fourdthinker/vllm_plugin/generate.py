"""Latent-aware generation with a vLLM engine: prompts with video in, tokens + latents out.

`LatentGenerator` is the library half of the rollout actor and the serving replica: it builds the
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
class _Prepared:
    prompt: dict[str, Any] | None
    num_prompt_tokens: int = 0
    error: str | None = None
    keys: list[str] = field(default_factory=list)


class LatentGenerator:
    def __init__(self, llm, processor, latent_ids: LatentIds, max_frames: int = MAX_FRAMES,
                 max_pixels: int = MAX_PIXELS):
        self.llm = llm
        self.processor = processor
        self.latent_ids = latent_ids
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        self.max_model_len = llm.llm_engine.model_config.max_model_len
        # Part of every prompt's prefix-cache key (vLLM hashes it into a request's first KV block,
        # and so into every block after it). A new salt per weight version makes blocks computed
        # with older weights unmatchable, where `reset_prefix_cache` walks every block of the pool
        # (O(pool), ~2 ms per 50k blocks on the host) on each sync; stale blocks age out as usual.
        self.cache_salt: str | None = None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, **engine_kwargs) -> "LatentGenerator":
        from transformers import AutoConfig, AutoProcessor

        from fourdthinker.vllm_plugin.engine import make_llm

        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        ids = LatentIds.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
        return cls(make_llm(model_dir, latent=True, **engine_kwargs), processor, ids)

    # -- prompts --------------------------------------------------------------------------------
    def _frames(self, req: GenerationRequest) -> list[Image.Image] | None:
        if req.frames is not None:
            return fit_frames(list(req.frames), self.max_frames, self.max_pixels)
        if req.frame_paths is not None:
            return load_frames(req.frame_paths, self.max_frames, self.max_pixels)
        if req.video_path is not None:
            return decode_video(req.video_path, VIDEO_FPS, self.max_frames, self.max_pixels)
        return None

    def prepare(self, req: GenerationRequest) -> _Prepared:
        """The vLLM prompt of one request, or the reason it cannot run."""
        from fourdthinker.data.collate import chat_messages

        try:
            frames = self._frames(req)
        except Exception as err:  # noqa: BLE001 - any unreadable input fails this request only
            return _Prepared(None, error=str(err))
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
            return _Prepared(None, num_tokens, error=(
                f"prompt has {num_tokens} tokens with its video, the engine's context is "
                f"{self.max_model_len}: use fewer frames/pixels or a larger max_model_len"))
        return _Prepared(prompt, num_tokens)

    # -- generation -----------------------------------------------------------------------------
    def pop_latents(self, keys: list[str]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        """Fetch (and forget) the latent vectors of finished requests, by their latent_key."""
        from fourdthinker.vllm_plugin.extension import decode_latents

        return decode_latents(self.llm.collective_rpc("latent_pop", args=(list(keys),))[0]) if keys else {}

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams

        prepared = [self.prepare(r) for r in requests]
        prompts, params, where = [], [], []
        for i, (req, prep) in enumerate(zip(requests, prepared)):
            if prep.prompt is None:
                continue
            for j in range(sampling.n):
                key = uuid.uuid4().hex
                prep.keys.append(key)
                extra = {"latent_key": key}
                if req.force_latent_steps:
                    extra["latent_force_steps"] = [int(s) for s in req.force_latent_steps]
                prompts.append(prep.prompt)
                params.append(SamplingParams(
                    n=1, max_tokens=min(sampling.max_tokens, self.max_model_len - prep.num_prompt_tokens),
                    temperature=sampling.temperature, top_p=sampling.top_p,
                    seed=None if sampling.seed is None else sampling.seed + len(prompts),
                    ignore_eos=sampling.ignore_eos, logprobs=0, skip_special_tokens=False,
                    extra_args=extra))
                where.append((i, j))
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        keys = [k for p in prepared for k in p.keys]
        latents = self.pop_latents(keys)

        results: list[list[Completion]] = [[] for _ in requests]
        for (i, _), out, key in zip(where, outputs, keys):
            o = out.outputs[0]
            positions, vectors = latents.get(key, ([], None))
            start = len(out.prompt_token_ids)
            token_ids = list(o.token_ids)
            logprobs = [float(step[tok].logprob) for step, tok in zip(o.logprobs, token_ids)]
            rel = [p - start for p in positions]
            if rel and rel[-1] >= len(token_ids):  # a block cut by max_tokens: last vector never fed
                keep = [k for k, r in enumerate(rel) if r < len(token_ids)]
                rel, vectors = [rel[k] for k in keep], (vectors[keep] if keep else None)
            results[i].append(Completion(token_ids, o.text, logprobs, vectors, rel, o.finish_reason or "stop"))
        for i, prep in enumerate(prepared):
            if prep.prompt is None:
                results[i] = [Completion([], "", [], None, [], "error", prep.error)] * sampling.n
        return results
