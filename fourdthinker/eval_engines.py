"""What answers a DSR question in an evaluation: the project's engine, the HF reference, or a stand-in.

Every answerer takes sample rows (the question's fields plus its decoded frames) and returns one
`Answer` per row. The engines decode the reply from its token ids with the checkpoint's tokenizer, so
two engines that emit the same tokens record the same text; the recorded output marks each latent
block `<|latent_start|>…<|latent_end|>` as `⟨latent k⟩` (the vectors themselves are not text).
Stand-ins load no model: they exist to test scoring, resume and the Ray plan, and to measure the
stage's own overhead; `EvaluateConfig.engine` documents them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fourdthinker.generation import GenerationRequest, SamplingConfig
from fourdthinker.tokens import LatentIds

END_OF_TURN = "<|im_end|>"


@dataclass
class Answer:
    """One question's reply: `text` (special tokens kept, latent tokens included, cut at the end of
    the turn) is what the DSR rules read; `marked` is what the results record."""

    text: str
    marked: str
    num_tokens: int = 0
    num_latent_blocks: int = 0
    error: str | None = None


def frames_from_row(row: dict) -> list[Image.Image]:
    """The decoded clip a sample row carries (uint8 [T, H, W, 3] bytes + shape) as PIL frames."""
    shape = [int(n) for n in row["frames_shape"]]
    array = np.frombuffer(row["frames"], dtype=np.uint8).reshape(shape)
    return [Image.fromarray(frame) for frame in array]


def _turn(text: str) -> str:
    """The reply up to the end of the assistant turn, stripped (as the reference cut it)."""
    return text.split(END_OF_TURN, 1)[0].strip()


def render_reply(token_ids: Sequence[int], tokenizer, ids: LatentIds) -> tuple[str, str, int]:
    """(text, text with each latent block as `⟨latent k⟩`, number of blocks) of a completion.

    A block is `<|latent_start|>` up to and including its `<|latent_end|>`; one cut short by the
    token limit runs to the end.
    """
    tokens = np.asarray(list(token_ids), dtype=np.int64)

    def decode(part: np.ndarray) -> str:
        return tokenizer.decode(part.tolist(), skip_special_tokens=False)

    starts = np.flatnonzero(tokens == ids.start)
    ends = np.flatnonzero(tokens == ids.end)
    pieces, cursor, block = [], 0, 0
    for start in starts:
        if start < cursor:  # a start id inside a block (not emitted by latent decoding; kept as is)
            continue
        after = ends[ends > start]
        stop = int(after[0]) + 1 if after.size else len(tokens)
        block += 1
        pieces += [decode(tokens[cursor:start]), f"⟨latent {block}⟩"]
        cursor = stop
    pieces.append(decode(tokens[cursor:]))
    return _turn(decode(tokens)), _turn("".join(pieces)), block


class GeneratorAnswerer:
    """Answers with a latent generator: `LatentGenerator` (vLLM) or anything with its `generate`."""

    def __init__(self, generator, sampling: SamplingConfig, tokenizer, ids: LatentIds,
                 force_latent_steps: Sequence[int] = ()):
        self.generator, self.sampling, self.tokenizer, self.ids = generator, sampling, tokenizer, ids
        self.force_latent_steps = list(force_latent_steps)

    @classmethod
    def vllm(cls, model_dir: str | Path, sampling: SamplingConfig, max_frames: int, max_pixels: int,
             force_latent_steps: Sequence[int] = (), **engine_kwargs) -> "GeneratorAnswerer":
        from fourdthinker.vllm_plugin.generate import LatentGenerator

        generator = LatentGenerator.from_model_dir(model_dir, **engine_kwargs)
        generator.max_frames, generator.max_pixels = max_frames, max_pixels
        return cls(generator, sampling, generator.processor.tokenizer, generator.latent_ids, force_latent_steps)

    def answer(self, rows: Sequence[dict]) -> list[Answer]:
        requests = [GenerationRequest(text=row["prompt"], frames=frames_from_row(row),
                                      force_latent_steps=self.force_latent_steps) for row in rows]
        out = []
        for group in self.generator.generate(requests, self.sampling):
            completion = group[0]
            if completion.error is not None:
                out.append(Answer(completion.error, completion.error, error=completion.error))
                continue
            text, marked, blocks = render_reply(completion.token_ids, self.tokenizer, self.ids)
            out.append(Answer(text, marked, len(completion.token_ids), blocks))
        return out


class HFAnswerer:
    """The HF reference decoding (`model.generate_latent`), one question at a time, as the reference
    evaluation ran; the executable definition the vLLM engine is checked against."""

    def __init__(self, model_dir: str | Path, sampling: SamplingConfig, force_latent_steps: Sequence[int] = ()):
        import torch
        from transformers import AutoProcessor

        from fourdthinker.model import load_model

        self.processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        self.model = load_model(model_dir, torch.float32 if not torch.cuda.is_available() else torch.bfloat16).eval()
        if torch.cuda.is_available():
            self.model.cuda()
        self.ids = LatentIds.from_config(self.model.config)
        self.sampling = sampling
        self.force_latent_steps = list(force_latent_steps)
        self.rng = torch.Generator(device=self.model.device)
        if sampling.seed is not None:
            self.rng.manual_seed(sampling.seed)

    def answer_one(self, prompt: str, frames: Sequence[Image.Image]) -> Answer:
        from fourdthinker.data.collate import prompt_batch
        from fourdthinker.model import generate_latent

        inputs = {k: v.to(self.model.device) for k, v in prompt_batch(self.processor, [(prompt, frames)]).items()}
        s = self.sampling
        out = generate_latent(self.model, inputs, self.ids, s.max_tokens, do_sample=s.temperature > 0,
                              temperature=s.temperature or 1.0, top_p=s.top_p, generator=self.rng,
                              forced_latent_steps=[self.force_latent_steps])
        text, marked, blocks = render_reply(out.sequences[0], self.processor.tokenizer, self.ids)
        return Answer(text, marked, len(out.sequences[0]), blocks)

    def answer(self, rows: Sequence[dict]) -> list[Answer]:
        out = []
        for row in rows:
            try:
                out.append(self.answer_one(row["prompt"], frames_from_row(row)))
            except Exception as err:  # noqa: BLE001 - as the reference: an inference error scores as wrong
                out.append(Answer(str(err), str(err), error=f"{type(err).__name__}: {err}"))
        return out


class StandInAnswerer:
    """A reply per row without a model: `oracle` (the gold letter), `constant:X`, `reply:TEXT`."""

    def __init__(self, engine: str, delay_s: float = 0.0):
        self.engine, self.delay_s = engine, delay_s

    def reply(self, row: dict) -> str:
        if self.engine == "oracle":
            return f"<think>the gold option</think><answer>{row['answer']}</answer>"
        if self.engine.startswith("constant:"):
            return f"<think>always the same</think><answer>{self.engine.split(':', 1)[1]}</answer>"
        return self.engine.split(":", 1)[1]

    def answer(self, rows: Sequence[dict]) -> list[Answer]:
        out = []
        for row in rows:
            time.sleep(self.delay_s)
            text = self.reply(row)
            out.append(Answer(text, text))
        return out


def make_answerer(engine: str, model_dir: str | Path, sampling: SamplingConfig, *, max_frames: int,
                  max_pixels: int, delay_s: float = 0.0, force_latent_steps: Sequence[int] = (),
                  engine_kwargs: dict[str, Any] | None = None):
    """The answerer `engine` names (see `EvaluateConfig.engine`) for the checkpoint `model_dir`."""
    if engine == "vllm":
        return GeneratorAnswerer.vllm(model_dir, sampling, max_frames, max_pixels, force_latent_steps,
                                      **(engine_kwargs or {}))
    if engine == "hf":
        return HFAnswerer(model_dir, sampling, force_latent_steps)
    return StandInAnswerer(engine, delay_s)
