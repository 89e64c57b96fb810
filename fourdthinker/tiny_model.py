"""Build a tiny random Qwen2.5-VL, fully offline, that loads wherever the real one does.

Tests and the demo need a model that `AutoProcessor`, `Qwen2_5_VLForConditionalGeneration` and
vLLM all load from a local directory, with no hub. This builds one: a byte-level BPE tokenizer
trained on a built-in corpus and wrapped as Qwen's tokenizer (Qwen's special tokens and chat
template), the real Qwen2.5-VL image and video processors, and a Qwen2.5-VL of a few million random
parameters; then the latent tokens are added exactly as for the real model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from fourdthinker.atomic import OutputDirError, atomic_output_dir, check_output_dir
from fourdthinker.tokens import DEFAULT_LATENT_SIZE, LATENT_TOKENS, add_latent_tokens

# Qwen2's special tokens, in Qwen's order (ids follow the BPE vocabulary, as in the real tokenizer).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# The Qwen2-VL chat template (Qwen2.5-VL uses the same one): a default system turn, vision
# placeholders for image/video items, optional generation prompt.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split pattern (contractions, letters, single digits, punctuation, spaces).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Per-frame pixel budget shared by every stage (DESIGN.md "one video policy").
MAX_PIXELS = 256 * 28 * 28
MIN_PIXELS = 4 * 28 * 28

_CORPUS = """
You are a helpful assistant. First, think about the reasoning process with mental imagery of the
relevant object or region, then provide the user with the answer. Put the reasoning in
<think>...</think> and only the final answer in <answer>...</answer>.
What is the camera movement from 2s to 6s? A. Pan Left B. Pan Right C. Dolly In D. Tilt Up
Pan Left, Pan Right, Tilt Up, Tilt Down, Dolly In, Dolly Out, Truck Left, Truck Right,
Pedestal Up, Pedestal Down, Roll Clockwise, Roll Counter-Clockwise, Stay.
Moving Left, Moving Right, Moving Up, Moving Down, Moving Left-Up, Moving Left-Down,
Moving Right-Up, Moving Right-Down, Moving Toward Camera, Moving Away from Camera, Stationary.
Speeding Up, Slowing Down, Maintaining a Constant Speed, First Speeding Up, Then Slowing Down,
First Slowing Down, Then Speeding Up, Moving at Varying Speeds. Getting Closer to Camera,
Getting Farther from Camera, Maintaining Roughly the Same Distance.
The red box moves to the right while the camera pans left, so the static blue sphere drifts.
Looking at the first frame and the final view, the object appears larger: it approaches.
Which direction is the green cube moving relative to the camera between 1s and 5s?
The answer is B. The best option is C. Answer: D. Option: A.
0 1 2 3 4 5 6 7 8 9 10 11 12 16 20 28 32 50 64 100 [12,40,96,120]
"""


@dataclass(frozen=True)
class TinyShape:
    """The shape of the random model. Head size 64: vLLM's CPU attention rejects smaller heads."""

    vocab_size: int = 1024  # BPE merges to learn (the corpus caps it lower)
    embedding_rows: int | None = None  # pad the embedding/lm_head rows (Qwen's checkpoints carry spare rows)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 512
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 256
    vision_depth: int = 2
    vision_heads: int = 2
    vision_fullatt_blocks: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = False


# Qwen2.5-VL-3B-Instruct's shape, for benchmarks with random weights (no hub download possible).
QWEN25_VL_3B = TinyShape(
    embedding_rows=151936, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2,
    intermediate_size=11008, vision_hidden_size=1280, vision_intermediate_size=3420, vision_depth=32,
    vision_heads=16, vision_fullatt_blocks=(7, 15, 23, 31), tie_word_embeddings=True)

SHAPES = {"tiny": TinyShape(), "3b": QWEN25_VL_3B}


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the built-in corpus, wrapped as Qwen's tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in _merges_of(bpe)]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.eos_token = "<|im_end|>"  # as in Qwen2.5-VL-Instruct: a turn ends generation
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tokenizer


def _merges_of(bpe) -> list:
    import json

    return json.loads(bpe.to_str())["model"]["merges"]


def build_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def build_config(tokenizer, shape: TinyShape):
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    head_dim = shape.hidden_size // shape.num_heads
    # M-RoPE splits the rotary half-dimension into (time, height, width) sections.
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(
        vocab_size=max(len(tokenizer), shape.embedding_rows or 0), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=shape.tie_word_embeddings,
    )
    vision = dict(
        depth=shape.vision_depth, hidden_size=shape.vision_hidden_size,
        intermediate_size=shape.vision_intermediate_size, num_heads=shape.vision_heads,
        out_hidden_size=shape.hidden_size, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=112, fullatt_block_indexes=list(shape.vision_fullatt_blocks),
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0, latent_size: int = DEFAULT_LATENT_SIZE,
                     shape: TinyShape = TinyShape(), overwrite: bool = False,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Path:
    """Build the model into `out_dir` (written to a temp dir first, then renamed).

    Large shapes: pass device="cuda" (initialising billions of weights on a CPU takes minutes)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    check_output_dir(out, overwrite)  # fail before the work, not after
    tokenizer = build_tokenizer(shape.vocab_size)
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    add_latent_tokens(processor, model, latent_size=latent_size)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                            tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out


def weights_digest(model_dir: str | Path) -> str:
    """sha256 over the model's tensors in name order: equal digests mean identical weights."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in sorted(st.keys()):
                h.update(name.encode())
                h.update(st.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = ["TinyShape", "build_tiny_model", "weights_digest", "OutputDirError", "LATENT_TOKENS"]
