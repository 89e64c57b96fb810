"""Latent reasoning on upstream transformers Qwen2.5-VL (no fork): latent targets, the DIFT forward,
latent-aware generation and teacher-forced completion log-probs.

This module is the executable definition the vLLM plugin must match token for token and that the
GRPO learner uses for log-probs. The model's own submodules do the work; what is added here is
where the latent vectors go:

* a mental image is `<|latent_start|>` + latent_size x `<|latent_pad|>` + `<|latent_end|>`; the
  vectors at its pad slots replace the pad embeddings;
* in DIFT those vectors are the image's frozen vision features, averaged in latent_size groups;
* in generation the vector at pad slot i is the final (post-norm) hidden state the model produced
  at the position before it, per sequence, so a block reads its own "thought" back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fourdthinker.losses import DIFT_CE_WEIGHT, DIFT_SIM_WEIGHT, dift_loss_terms
from fourdthinker.mrope import model_mrope_positions
from fourdthinker.tokens import LatentIds

IGNORE_INDEX = -100
_LEFT_PADDED = "prompts must be left-padded (build them with fourdthinker.data.collate.prompt_batch)"
_VISION_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "pixel_values",
                "image_grid_thw", "video_index")


def load_model(model_dir, dtype: torch.dtype, attn_implementation: str | None = None,
               window_attention: bool = True):
    """A local Qwen2.5-VL checkpoint, its vision tower on one-call window attention
    (`fourdthinker.vision_attention`; `window_attention=False` keeps transformers' per-window
    calls, for comparison). `attn_implementation` picks the language model's (default: transformers')."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fourdthinker.vision_attention import use_window_attention

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, local_files_only=True, dtype=dtype,
                                                               **extra)
    if window_attention:
        use_window_attention(model)
    return model


def compile_blocks(model) -> int:
    """torch.compile every transformer block (language layers and vision blocks), each on its own.

    A block's elementwise work (RMSNorm's fp32 round trip, rotary embeddings, SwiGLU) is many
    memory-bound kernels in eager mode; compiled, it fuses into a few. Compiling per block, not the
    whole model, keeps the model's Python (latent scatter, masks, gradient checkpointing, DeepSpeed
    hooks) eager, and all blocks of a stack share one compiled graph. Lengths vary between
    batches, so shapes are dynamic. Returns the number of blocks compiled."""
    blocks = [*model.model.language_model.layers, *model.model.visual.blocks]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def freeze_vision_tower(model) -> None:
    """Freeze the ViT + merger (DIFT trains the language model only)."""
    model.model.visual.requires_grad_(False)
    model.model.visual.eval()


def _vision_is_frozen(model) -> bool:
    return not any(p.requires_grad for p in model.model.visual.parameters())


def _zero3_partitioned(module) -> bool:
    """True when DeepSpeed ZeRO-3 holds the module's parameters in shards (gathered on use)."""
    return hasattr(next(module.parameters()), "ds_id")


def _vision_features(model, pixels: Tensor | None, grid_thw: Tensor | None, videos: bool) -> Tensor | None:
    """The tower's merged features of every image (or video) of the batch, concatenated; None without any.

    Under ZeRO-3 each tower call gathers the tower's shards with collectives that every rank must
    issue in the same order; a rank whose micro-batch has no such input (a text-only prompt next to
    video prompts on another rank) would skip them and deadlock the world. So there it runs the tower
    once on a minimal input (one merged token) and drops the result.
    """
    if pixels is None:
        if _zero3_partitioned(model.model.visual):
            model.model.get_image_features(*_minimal_vision_input(model))
        return None
    get = model.model.get_video_features if videos else model.model.get_image_features
    return torch.cat(get(pixels, grid_thw).pooler_output)


def _minimal_vision_input(model) -> tuple[Tensor, Tensor]:
    """One image of one merge window: the cheapest input the tower accepts."""
    vision = model.config.vision_config
    merge = vision.spatial_merge_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    weight = next(model.model.visual.parameters())
    pixels = torch.zeros(merge * merge, patch_dim, dtype=weight.dtype, device=weight.device)
    return pixels, torch.tensor([[1, merge, merge]], device=weight.device)


def latent_targets(model, pixel_values: Tensor, image_grid_thw: Tensor, latent_size: int) -> Tensor:
    """The latent target vectors of each image: [num_images, latent_size, hidden] in float32.

    The frozen vision tower's merged patch features of an image, in raster order, are cut into
    latent_size equal contiguous groups (the last n mod latent_size features dropped) and each
    group is averaged ("average" compression of the reference).
    """
    hidden = model.config.text_config.hidden_size
    num_images = image_grid_thw.shape[0]
    if num_images == 0:
        with torch.no_grad():
            _vision_features(model, None, None, videos=False)  # ZeRO-3: same collectives on every rank
        return torch.zeros(0, latent_size, hidden, device=model.device)
    merge = model.config.vision_config.spatial_merge_size
    counts = image_grid_thw.prod(-1) // (merge * merge)
    group_len = counts // latent_size
    if bool((group_len == 0).any()):
        raise ValueError(f"an output image has fewer merged vision tokens ({int(counts.min())}) than "
                         f"latent_size={latent_size}; use larger output images")
    with torch.no_grad():
        features = _vision_features(model, pixel_values, image_grid_thw, videos=False).float()
    counts, group_len = counts.to(features.device), group_len.to(features.device)

    image = torch.repeat_interleave(torch.arange(num_images, device=features.device), counts)
    first = torch.cumsum(counts, 0) - counts
    offset = torch.arange(features.shape[0], device=features.device) - first[image]
    group = offset // group_len[image]
    keep = group < latent_size  # the remainder of each image
    slot = image * latent_size + group
    sums = features.new_zeros(num_images * latent_size, hidden).index_add_(0, slot[keep], features[keep])
    means = sums / group_len.repeat_interleave(latent_size).unsqueeze(-1).to(sums.dtype)
    return means.view(num_images, latent_size, hidden)


def _scatter(embeds: Tensor, mask: Tensor, rows: Tensor, what: str) -> Tensor:
    expected = int(mask.sum())
    if expected != rows.shape[0]:
        raise ValueError(f"input_ids have {expected} {what} slots but {rows.shape[0]} {what} vectors "
                         "were given; they must match one to one")
    return embeds.masked_scatter(mask.unsqueeze(-1), rows.to(embeds.dtype))


def embed_with_latents(model, input_ids: Tensor, latent_mask: Tensor, latent_vectors: Tensor,
                       pixel_values_videos: Tensor | None = None, video_grid_thw: Tensor | None = None,
                       second_per_grid_ts: Tensor | None = None, attention_mask: Tensor | None = None,
                       pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None,
                       video_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Input embeddings with vision features and latent vectors in place, and M-RoPE positions.

    `latent_vectors[k]` goes to the k-th True of `latent_mask` in row-major order. The videos are
    those of the rows in order, or, with `video_index` (`data.collate.row_prompt_batch`), distinct
    videos that rows share: `video_index[j]` is the video of the j-th video in the rows, so each
    distinct video goes through the tower once. Returns (inputs_embeds [B, T, H],
    position_ids [3, B, T]). A frozen vision tower runs without autograd.
    Positions follow the original Qwen2.5-VL rule (`fourdthinker.mrope`), the one vLLM serves with,
    not transformers 5.x's `get_rope_index`, which resumes text after a video too early.
    """
    config = model.config
    with torch.set_grad_enabled(torch.is_grad_enabled() and not _vision_is_frozen(model)):
        videos = _vision_features(model, pixel_values_videos, video_grid_thw, videos=True)
        images = _vision_features(model, pixel_values, image_grid_thw, videos=False)
    if isinstance(second_per_grid_ts, list):
        second_per_grid_ts = torch.tensor(second_per_grid_ts)
    if video_index is not None and videos is not None:
        videos, video_grid_thw, second_per_grid_ts = _videos_of_rows(
            model, videos, video_grid_thw, second_per_grid_ts, video_index.to(videos.device))
    embeds = model.get_input_embeddings()(input_ids)
    if videos is not None:
        embeds = _scatter(embeds, input_ids == config.video_token_id, videos, "video")
    if images is not None:
        embeds = _scatter(embeds, input_ids == config.image_token_id, images, "image")
    embeds = _scatter(embeds, latent_mask, latent_vectors, "latent")
    position_ids, _ = model_mrope_positions(model, input_ids, attention_mask, image_grid_thw=image_grid_thw,
                                            video_grid_thw=video_grid_thw,
                                            second_per_grid_ts=second_per_grid_ts)
    return embeds, position_ids


def _videos_of_rows(model, features: Tensor, grid_thw: Tensor, seconds: Tensor | None, video_index: Tensor):
    """Per-video merged features (and grids, seconds per grid) repeated into the rows' order."""
    merge = model.config.vision_config.spatial_merge_size
    counts = (grid_thw.prod(-1) // (merge * merge)).to(features.device)
    first = torch.cumsum(counts, 0) - counts
    take = counts[video_index]
    # row j's features are first[video j] + 0..take[j]-1, laid out back to back
    start = torch.repeat_interleave(first[video_index] - (torch.cumsum(take, 0) - take), take)
    rows = start + torch.arange(start.shape[0], device=features.device)
    if seconds is not None:
        seconds = seconds[video_index.to(seconds.device)]
    return features[rows], grid_thw[video_index.to(grid_thw.device)], seconds


def _no_vectors(model) -> Tensor:
    """[0, hidden]: the latent vectors of inputs that have no latent slots."""
    weight = model.get_input_embeddings().weight
    return weight.new_zeros(0, weight.shape[1])


def _vision_inputs(inputs: dict) -> dict:
    return {k: inputs[k] for k in _VISION_KEYS if inputs.get(k) is not None}


def _final_hidden(model, embeds: Tensor, attention_mask: Tensor | None, position_ids: Tensor,
                  **kwargs):
    """The language model's output: last_hidden_state is the post-norm state the LM head reads."""
    return model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, **kwargs)


@dataclass
class DiftOutput:
    loss: Tensor          # differentiable: ce_weight * ce + sim_weight * sim
    ce: Tensor            # mean CE over the batch's labelled tokens (detached)
    sim: Tensor           # mean over images of mean over slots of 1 - cos (detached)
    cos: Tensor           # mean cosine over latent slots (detached; nan without latents)
    num_text_tokens: int
    num_latents: int

    def metrics(self) -> dict[str, float]:
        """Plain numbers for logging (one device sync)."""
        values = torch.stack([self.loss.detach(), self.ce, self.sim, self.cos]).tolist()
        return dict(zip(("loss", "ce", "sim", "cos"), values),
                    num_text_tokens=float(self.num_text_tokens), num_latents=float(self.num_latents))


def dift_forward(model, batch: dict, latent_ids: LatentIds, ce_weight: float = DIFT_CE_WEIGHT,
                 sim_weight: float = DIFT_SIM_WEIGHT) -> DiftOutput:
    """DIFT loss of a `DiftCollator` batch with teacher-forced latent targets.

    Logits are computed only at labelled positions (the full [B, T, vocab] tensor is never built).
    """
    if not _vision_is_frozen(model):
        raise ValueError("DIFT trains with the vision tower frozen: call "
                         "fourdthinker.model.freeze_vision_tower(model) before training")
    size = latent_ids.latent_size
    targets = latent_targets(model, batch["pixel_values_latent"], batch["image_grid_thw_latent"], size)
    hidden_size = targets.shape[-1]
    embeds, position_ids = embed_with_latents(
        model, batch["input_ids"], batch["latent_mask"], targets.view(-1, hidden_size),
        attention_mask=batch["attention_mask"], **_vision_inputs(batch))
    hidden = _final_hidden(model, embeds, batch["attention_mask"], position_ids,
                           use_cache=False).last_hidden_state

    # Position t-1 predicts token t (its label) and, at a latent slot t, the slot's target vector.
    before = hidden[:, :-1]
    labels = batch["labels"][:, 1:]
    labelled = labels != IGNORE_INDEX
    num_text = int(labelled.sum())
    if num_text == 0:
        raise ValueError("the batch has no labelled tokens; check the collator's labels")
    logits = model.lm_head(before[labelled]).float()
    ce = F.cross_entropy(logits, labels[labelled])
    predicted = before[batch["latent_mask"][:, 1:]].view(-1, size, hidden_size)

    loss, sim, cos = dift_loss_terms(ce, predicted, targets, ce_weight, sim_weight)
    return DiftOutput(loss=loss, ce=ce.detach(), sim=sim.detach(), cos=cos.detach(),
                      num_text_tokens=num_text, num_latents=predicted.shape[0] * size)


def latent_slot_mask(tokens: Tensor, valid: Tensor, latent_ids: LatentIds) -> Tensor:
    """True at the latent_size positions after each `<|latent_start|>` (within `valid`).

    That is where generation feeds hidden states; a pad or end token elsewhere is plain text.
    """
    starts = ((tokens == latent_ids.start) & valid).long().cumsum(-1)
    length = tokens.shape[-1]
    # starts in the window [t - latent_size, t - 1]
    upto_prev = F.pad(starts, (1, 0))[..., :length]
    before_window = F.pad(starts, (latent_ids.latent_size + 1, 0))[..., :length]
    return (upto_prev - before_window > 0) & valid


@dataclass
class LatentGeneration:
    sequences: list[list[int]]      # generated ids per row (completion only, up to and incl. eos)
    latents: list[Tensor]           # per row [n_latent_slots, H] fp32: the vectors fed at pad slots
    logprobs: list[Tensor]          # per row: raw log-prob (before temperature/top-p) of each token
    finish_reasons: list[str]       # "stop" | "length"


def _eos_ids(model, eos_token_ids) -> list[int]:
    if eos_token_ids is None:
        eos_token_ids = model.generation_config.eos_token_id
    if eos_token_ids is None:
        return []
    return [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)


def _forced_start_mask(forced_latent_steps, batch: int, steps: int, device) -> Tensor:
    mask = torch.zeros(batch, steps, dtype=torch.bool, device=device)
    if forced_latent_steps is None:
        return mask
    if len(forced_latent_steps) != batch:
        raise ValueError(f"forced_latent_steps has {len(forced_latent_steps)} rows for a batch of {batch}")
    pairs = [(row, step) for row, row_steps in enumerate(forced_latent_steps) for step in row_steps]
    if any(step < 0 for _, step in pairs):
        raise ValueError(f"forced_latent_steps must be output step indices >= 0, got {forced_latent_steps}")
    for row, step in pairs:
        if step < steps:
            mask[row, step] = True
    return mask


def _choose_tokens(logits: Tensor, do_sample: bool, temperature: float, top_p: float,
                   generator: torch.Generator | None) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        # nucleus: the smallest most-likely set whose mass reaches top_p (the top token always stays)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_latent(model, inputs: dict, latent_ids: LatentIds, max_new_tokens: int, *,
                    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None, eos_token_ids=None,
                    forced_latent_steps: list[list[int]] | None = None) -> LatentGeneration:
    """Latent-aware decoding of a left-padded prompt batch (see `prompt_batch`), per row independently.

    A row that emits `<|latent_start|>` gets it embedded as usual; each of its next latent_size steps
    emits `<|latent_pad|>` and feeds back the hidden state it just produced; then `<|latent_end|>` is
    forced and text resumes. `forced_latent_steps[row]` lists output steps at which that row is
    made to emit `<|latent_start|>` (ignored inside a block): a test hook, as a random model rarely
    samples it.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 when sampling (or use do_sample=False)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(_LEFT_PADDED)
    batch, device = input_ids.shape[0], input_ids.device
    size = latent_ids.latent_size
    eos = torch.tensor(_eos_ids(model, eos_token_ids), dtype=torch.long, device=device)
    filler = int(eos[0]) if eos.numel() else int(latent_ids.end)
    embed_tokens = model.get_input_embeddings()

    no_latents = torch.zeros_like(input_ids, dtype=torch.bool)
    embeds, position_ids = embed_with_latents(
        model, input_ids, no_latents, _no_vectors(model), attention_mask=attention_mask,
        **_vision_inputs(inputs))
    out = _final_hidden(model, embeds, attention_mask, position_ids, use_cache=True)
    cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]
    # A prompt ends in text, which holds its largest M-RoPE index: decoding continues right after
    # it, per row, exactly where the same row alone (no padding) would.
    real = attention_mask.bool().unsqueeze(0)
    next_position = position_ids.masked_fill(~real, 0).amax(dim=(0, 2)) + 1

    forced = _forced_start_mask(forced_latent_steps, batch, max_new_tokens, device)
    tokens = torch.full((batch, max_new_tokens), filler, dtype=torch.long, device=device)
    token_logprobs = torch.zeros(batch, max_new_tokens, device=device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
    in_block = torch.zeros(batch, dtype=torch.bool, device=device)
    pads_done = torch.zeros(batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    latent_rows, latent_vectors = [], []
    ones = torch.ones(batch, 1, dtype=attention_mask.dtype, device=device)

    for step in range(max_new_tokens):
        logits = model.lm_head(hidden).float()
        chosen = _choose_tokens(logits, do_sample, temperature, top_p, generator)
        chosen = torch.where(forced[:, step], latent_ids.start, chosen)
        block_token = torch.where(pads_done < size, latent_ids.pad, latent_ids.end)
        token = torch.where(in_block, block_token, chosen)
        token = torch.where(finished, filler, token)
        tokens[:, step] = token
        token_logprobs[:, step] = torch.log_softmax(logits, -1).gather(1, token[:, None]).squeeze(1)

        feeds_hidden = in_block & (pads_done < size) & ~finished
        latent_rows.append(feeds_hidden.nonzero().squeeze(1))
        latent_vectors.append(hidden[feeds_hidden].float())
        entering = ~in_block & ~finished & (token == latent_ids.start)
        leaving = in_block & (token == latent_ids.end)
        pads_done = torch.where(entering, 0, pads_done + feeds_hidden.long())
        stops = ~in_block & ~finished & torch.isin(token, eos)
        in_block = (in_block & ~leaving) | entering
        lengths = torch.where(stops, step + 1, lengths)
        finished = finished | stops
        if step == max_new_tokens - 1 or bool(finished.all()):
            break

        next_input = torch.where(feeds_hidden.unsqueeze(-1), hidden, embed_tokens(token))
        attention_mask = torch.cat([attention_mask, ones], dim=1)
        positions = (next_position + step).view(1, batch, 1).expand(3, batch, 1)
        out = _final_hidden(model, next_input.unsqueeze(1), attention_mask, positions,
                            past_key_values=cache, use_cache=True)
        cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]

    rows = torch.cat(latent_rows)
    order = torch.argsort(rows, stable=True)  # steps were appended in order: stays chronological
    per_row = torch.cat(latent_vectors)[order].split(torch.bincount(rows, minlength=batch).tolist())
    lengths_list, all_tokens = lengths.tolist(), tokens.tolist()
    return LatentGeneration(
        sequences=[row[:n] for row, n in zip(all_tokens, lengths_list)],
        latents=list(per_row),
        logprobs=[token_logprobs[b, :n] for b, n in enumerate(lengths_list)],
        finish_reasons=["stop" if f else "length" for f in finished.tolist()],
    )


def completion_logprobs(model, inputs: dict, completions: list[list[int]], latents: list[Tensor],
                        latent_ids: LatentIds) -> list[Tensor]:
    """Teacher-forced log-prob of each completion token after its left-padded prompt.

    `latents[row]` are the vectors fed at that completion's latent slots (as `generate_latent`
    returns them, one per slot, including a last one that a cut block never fed). Differentiable.
    """
    prompt_ids = inputs["input_ids"]
    prompt_mask = inputs.get("attention_mask")
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError(_LEFT_PADDED)
    batch, prompt_len = prompt_ids.shape
    if len(completions) != batch or len(latents) != batch:
        raise ValueError(f"{batch} prompts but {len(completions)} completions and {len(latents)} latent sets")
    device = prompt_ids.device
    lengths = torch.tensor([len(c) for c in completions], device=device)
    if bool((lengths == 0).any()):
        raise ValueError("every completion needs at least one token")
    padded = torch.nn.utils.rnn.pad_sequence(
        [torch.as_tensor(c, dtype=torch.long, device=device) for c in completions],
        batch_first=True, padding_value=0)  # padding: masked out below
    valid = torch.arange(padded.shape[1], device=device) < lengths.unsqueeze(1)
    slots = latent_slot_mask(padded, valid, latent_ids)
    if not bool((padded[slots] == latent_ids.pad).all()):
        raise ValueError("a latent block must be latent_size <|latent_pad|> tokens after <|latent_start|>")
    slot_counts = slots.sum(1).tolist()
    given = [v.shape[0] for v in latents]
    if slot_counts != given:
        raise ValueError(f"latent slots per completion {slot_counts} != latent vectors given {given}")

    input_ids = torch.cat([prompt_ids, padded], dim=1)
    attention_mask = torch.cat([prompt_mask, valid.to(prompt_mask.dtype)], dim=1)
    latent_mask = torch.cat([torch.zeros_like(prompt_ids, dtype=torch.bool), slots], dim=1)
    vectors = torch.cat([v.to(device) for v in latents]) if latents else _no_vectors(model)
    embeds, position_ids = embed_with_latents(model, input_ids, latent_mask, vectors,
                                              attention_mask=attention_mask, **_vision_inputs(inputs))
    hidden = _final_hidden(model, embeds, attention_mask, position_ids, use_cache=False).last_hidden_state

    # Token j of a completion is predicted at position prompt_len + j - 1; only those rows reach
    # the LM head, and gather - logsumexp avoids a second [tokens, vocab] tensor.
    rows, cols = valid.nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, prompt_len + cols - 1]).float()
    chosen = logits.gather(1, padded[rows, cols].unsqueeze(1)).squeeze(1)
    return list((chosen - torch.logsumexp(logits, -1)).split(lengths.tolist()))
