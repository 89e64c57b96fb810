"""Chat rendering and batching shared by DIFT, 4DRL, evaluation and serving.

One prompt path for every stage: the user turn is the clip as one video plus the question text,
rendered with the processor's chat template and encoded by the processor with the one video
policy. A DIFT row is that prompt (exactly what generation sees) followed by the tokenized
assistant turn, in which each `<output_image>` is a latent block; the output images themselves
never enter the text, they are encoded separately as the latent targets' pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from PIL import Image

from fourdthinker.data.dift_dataset import DiftSample
from fourdthinker.data.video import (
    MAX_FRAMES,
    MAX_PIXELS,
    FrameLoadError,
    fit_frames,
    load_frames,
    load_image,
    video_chat_item,
    video_processor_kwargs,
)
from fourdthinker.model import IGNORE_INDEX
from fourdthinker.prompts import question_prompt
from fourdthinker.tokens import LATENT_END, LATENT_PAD, LATENT_START, OUTPUT_IMAGE, LatentIds

log = logging.getLogger(__name__)

_PROMPT_KEYS = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw",
                "second_per_grid_ts")


def chat_messages(question_text: str, frames: Sequence[Image.Image] | None,
                  assistant_text: str | None = None) -> list[dict]:
    """The conversation: user = the clip as one video + `question_text` (already the full user
    text, e.g. from `prompts.question_prompt`); optional assistant turn."""
    content = [video_chat_item(frames)] if frames else []
    content.append({"type": "text", "text": question_text})
    messages = [{"role": "user", "content": content}]
    if assistant_text is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant_text}]})
    return messages


def render_latent_text(text_output: str, latent_ids: LatentIds) -> str:
    """Each `<output_image>` becomes `<|latent_start|>` + latent_size x `<|latent_pad|>` +
    `<|latent_end|>`."""
    block = LATENT_START + LATENT_PAD * latent_ids.latent_size + LATENT_END
    return text_output.replace(OUTPUT_IMAGE, block)


def _render(processor, messages: list[dict], generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _encode_prompts(processor, texts: list[str], videos: list[list[Image.Image]], **kwargs):
    video_kwargs = video_processor_kwargs(videos) if videos else {}
    return processor(text=texts, videos=videos or None, **video_kwargs, **kwargs)


def prompt_batch(processor, prompts: list[tuple[str, Sequence[Image.Image] | None]]) -> dict:
    """Left-padded generation inputs for (user text, frames) pairs: the chat template with the
    generation prompt, frames under the one video policy. Keys: input_ids, attention_mask and,
    when there are videos, pixel_values_videos, video_grid_thw, second_per_grid_ts."""
    if not prompts:
        raise ValueError("prompt_batch: no prompts given")
    videos = [fit_frames(frames) for _, frames in prompts if frames]
    texts = [_render(processor, chat_messages(text, frames), generation_prompt=True)
             for text, frames in prompts]
    encoded = _encode_prompts(processor, texts, videos, padding=True, padding_side="left",
                              return_tensors="pt")
    return {k: encoded[k] for k in _PROMPT_KEYS if k in encoded}


def row_prompt_batch(processor, prompts: Sequence[tuple[str, Sequence[Image.Image] | None]],
                     prompt_index: Sequence[int]) -> dict:
    """`prompt_batch` for rows that share prompts (a GRPO group: G completions of one prompt), with
    every distinct prompt encoded, and its video processed, once. input_ids and attention_mask are
    per row; the video tensors are per distinct video, and `video_index` (one entry per row that has
    a video, in row order) says which video each such row shows, so the tower runs once per video
    (`model.embed_with_latents`)."""
    index = torch.as_tensor(list(prompt_index), dtype=torch.long)
    if index.numel() == 0:
        raise ValueError("row_prompt_batch: no rows given")
    distinct, row_prompt = torch.unique(index, return_inverse=True)
    encoded = prompt_batch(processor, [prompts[i] for i in distinct.tolist()])
    out = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
    out["input_ids"] = encoded["input_ids"][row_prompt]
    out["attention_mask"] = encoded["attention_mask"][row_prompt]
    if "video_grid_thw" in encoded:
        has_video = torch.tensor([bool(prompts[i][1]) for i in distinct.tolist()])
        video_of_prompt = torch.cumsum(has_video.long(), 0) - 1  # videos are in distinct-prompt order
        out["video_index"] = video_of_prompt[row_prompt][has_video[row_prompt]]
    return out


class DiftCollator:
    """Turns `DiftSample`s into a right-padded DIFT batch.

    Keys: input_ids, attention_mask, labels (IGNORE_INDEX outside the assistant turn, at latent
    pads and padding), latent_mask (True at latent pads), pixel_values_videos, video_grid_thw,
    second_per_grid_ts, pixel_values_latent, image_grid_thw_latent (output images in row order,
    then image_output order) and num_tokens (int).
    """

    def __init__(self, processor, latent_ids: LatentIds, max_frames: int = MAX_FRAMES,
                 max_pixels: int = MAX_PIXELS):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.latent_ids = latent_ids
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        image_processor = processor.image_processor
        self._patch_dim = (3 * image_processor.temporal_patch_size * image_processor.patch_size ** 2)
        self.load_failures = 0  # samples skipped because their media failed to load
        self._last_loaded: list = []

    def _assistant_turn(self, prompt_text: str, full_text: str, sample_id: str) -> str:
        # The template renders prompt + assistant; the assistant turn is tokenized on its own so
        # that a row's prompt tokens are exactly the ones generation starts from.
        if not full_text.startswith(prompt_text):
            raise ValueError(f"sample {sample_id}: the chat template's rendering of the assistant turn "
                             "does not start with its generation prompt; use a Qwen-style template")
        return full_text[len(prompt_text):]

    def _load(self, samples: list[DiftSample]) -> list[tuple[DiftSample, list, list]]:
        """Each sample with its frames and output images. A sample whose media fail to load is skipped
        (logged, counted in `load_failures`) and its place taken by a loaded one of this batch or the
        last good batch: every rank keeps its batch size, so ranks stay in lockstep."""
        loaded = []
        for sample in samples:
            try:
                frames = load_frames(sample.image_input, self.max_frames, self.max_pixels)
                images = [load_image(p, self.max_pixels) for p in sample.image_output]
            except FrameLoadError as err:
                self.load_failures += 1
                log.warning("sample %s skipped: %s", sample.id, err)
                continue
            loaded.append((sample, frames, images))
        spares = loaded or self._last_loaded
        if not spares:
            raise FrameLoadError(samples[0].image_input[0], "no sample of the first batch could be loaded "
                                 f"({', '.join(s.id for s in samples)})")
        self._last_loaded = spares
        return loaded + [spares[i % len(spares)] for i in range(len(samples) - len(loaded))]

    def __call__(self, samples: list[DiftSample]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("DiftCollator: empty batch")
        videos, prompt_texts, assistant_texts, output_images = [], [], [], []
        loaded = self._load(samples)
        samples = [sample for sample, _, _ in loaded]
        for sample, frames, images in loaded:
            user_text = question_prompt(sample.text_input)
            answer = render_latent_text(sample.text_output, self.latent_ids)
            prompt_text = _render(self.processor, chat_messages(user_text, frames), True)
            full_text = _render(self.processor, chat_messages(user_text, frames, answer), False)
            videos.append(frames)
            prompt_texts.append(prompt_text)
            assistant_texts.append(self._assistant_turn(prompt_text, full_text, sample.id))
            output_images.extend(images)

        prompts = _encode_prompts(self.processor, prompt_texts, videos)
        answers = self.tokenizer(assistant_texts, add_special_tokens=False)["input_ids"]
        rows = [torch.tensor(p + a) for p, a in zip(prompts["input_ids"], answers)]
        prompt_len = torch.tensor([len(p) for p in prompts["input_ids"]])
        row_len = torch.tensor([len(r) for r in rows])
        input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True,
                                                    padding_value=self.tokenizer.pad_token_id)
        position = torch.arange(input_ids.shape[1]).unsqueeze(0)
        attention_mask = position < row_len.unsqueeze(1)
        assistant = (position >= prompt_len.unsqueeze(1)) & attention_mask
        latent_mask = assistant & (input_ids == self.latent_ids.pad)
        labels = torch.where(assistant & ~latent_mask, input_ids, IGNORE_INDEX)

        expected = torch.tensor([len(s.image_output) for s in samples]) * self.latent_ids.latent_size
        wrong = (latent_mask.sum(1) != expected).nonzero().flatten().tolist()
        if wrong:
            raise ValueError(f"samples {[samples[i].id for i in wrong]}: latent slots do not match "
                             f"latent_size x image_output; the text must not contain latent tokens")

        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask.long(),
            "labels": labels,
            "latent_mask": latent_mask,
            "pixel_values_videos": prompts["pixel_values_videos"],
            "video_grid_thw": prompts["video_grid_thw"],
            "second_per_grid_ts": torch.tensor(prompts["second_per_grid_ts"], dtype=torch.float32),
            "num_tokens": int(row_len.sum()),
        }
        batch.update(self._latent_pixels(output_images))
        return batch

    def _latent_pixels(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        if not images:
            return {"pixel_values_latent": torch.zeros(0, self._patch_dim),
                    "image_grid_thw_latent": torch.zeros(0, 3, dtype=torch.long)}
        encoded = self.processor.image_processor(images=images, return_tensors="pt")
        return {"pixel_values_latent": encoded["pixel_values"],
                "image_grid_thw_latent": encoded["image_grid_thw"]}
