"""Latent special tokens: add them to a tokenizer + model, and read their ids back.

The three tokens are appended in the reference order (pad, start, end) so that released 4DThinker
checkpoints and ours agree on ids (151665/151666/151667 for the Qwen2.5 tokenizer). Ids are never
written in code: they are derived from the tokenizer and stored in the model config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LATENT_PAD = "<|latent_pad|>"
LATENT_START = "<|latent_start|>"
LATENT_END = "<|latent_end|>"
LATENT_TOKENS = (LATENT_PAD, LATENT_START, LATENT_END)

# Placeholder for a mental image in the reference's text_output (one per image_output).
OUTPUT_IMAGE = "<output_image>"

DEFAULT_LATENT_SIZE = 4


@dataclass(frozen=True)
class LatentIds:
    """Token ids the latent machinery needs, read from a tokenizer or a model config."""

    pad: int
    start: int
    end: int
    latent_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer, latent_size: int = DEFAULT_LATENT_SIZE) -> "LatentIds":
        ids = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [t for t, i in zip(LATENT_TOKENS, ids) if i is None or (i == unk and unk is not None)]
        if missing:
            raise ValueError(
                f"tokenizer has no latent tokens {missing}: call fourdthinker.tokens.add_latent_tokens "
                "on the processor and model first (or load a fourdthinker checkpoint)"
            )
        return cls(pad=ids[0], start=ids[1], end=ids[2], latent_size=latent_size)

    @classmethod
    def from_config(cls, config) -> "LatentIds":
        try:
            return cls(
                pad=int(config.latent_token_id),
                start=int(config.latent_start_id),
                end=int(config.latent_end_id),
                latent_size=int(config.latent_size),
            )
        except AttributeError as err:
            raise ValueError(
                f"model config lacks latent keys ({err}); add them with fourdthinker.tokens.add_latent_tokens"
            ) from None


def _tokenizer_of(processor_or_tokenizer):
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def _mean_init_rows(weight: torch.Tensor, new_ids: list[int], num_old: int) -> None:
    with torch.no_grad():
        mean = weight[:num_old].float().mean(dim=0).to(weight.dtype)
        weight[new_ids] = mean


def add_latent_tokens(processor_or_tokenizer, model, latent_size: int = DEFAULT_LATENT_SIZE,
                      compress_strategy: str = "average") -> LatentIds:
    """Add the latent tokens to the tokenizer and the model, the reference-compatible way.

    New embedding rows (and untied lm_head rows) start at the mean of the rows of the tokens that
    existed before. The embedding matrix only grows (Qwen's checkpoints carry spare rows beyond
    the tokenizer; those are reused, never cut). Idempotent: on a tokenizer and model that already
    carry the tokens and config keys nothing changes.
    """
    tokenizer = _tokenizer_of(processor_or_tokenizer)
    config = model.config
    present = [t in tokenizer.get_vocab() for t in LATENT_TOKENS]
    if all(present):
        ids = LatentIds.from_tokenizer(tokenizer, latent_size=getattr(config, "latent_size", latent_size))
        if getattr(config, "latent_token_id", None) == ids.pad:
            return ids  # already a latent checkpoint: nothing to do
    elif any(present):
        raise ValueError(f"tokenizer has only some latent tokens ({dict(zip(LATENT_TOKENS, present))}); "
                         "refusing to guess the order: start from the base tokenizer")

    num_old = len(tokenizer)
    if not all(present):
        tokenizer.add_special_tokens({"additional_special_tokens": list(LATENT_TOKENS)},
                                     replace_extra_special_tokens=False)
    ids = LatentIds.from_tokenizer(tokenizer, latent_size=latent_size)
    if [ids.pad, ids.start, ids.end] != list(range(ids.pad, ids.pad + 3)):
        raise ValueError(f"latent tokens did not get consecutive ids: {ids}")
    new_ids = [ids.pad, ids.start, ids.end]
    num_old = min(num_old, ids.pad)

    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _mean_init_rows(model.get_input_embeddings().weight, new_ids, num_old)
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        _mean_init_rows(out.weight, new_ids, num_old)

    config.latent_token_id = ids.pad
    config.latent_start_id = ids.start
    config.latent_end_id = ids.end
    config.latent_size = latent_size
    config.compress_strategy = compress_strategy
    return ids
