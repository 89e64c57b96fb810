"""The latent model core on the tiny fp32 Qwen2.5-VL, each checked against an independent
recomputation through upstream transformers (loops where the library vectorises)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fourdthinker.data.collate import DiftCollator, prompt_batch
from fourdthinker.data.dift_dataset import DiftSample
from fourdthinker.model import (IGNORE_INDEX, completion_logprobs, dift_forward, generate_latent, latent_slot_mask, latent_targets)
from fourdthinker.prompts import question_prompt
from fourdthinker.tokens import LatentIds


def _noise(rng, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _save(image: Image.Image, path) -> str:
    image.save(path)
    return str(path)


def _official_positions(model, input_ids: list[int], video_grids, seconds) -> torch.Tensor:
    """The original Qwen2.5-VL M-RoPE rule (what vLLM serves with), one token at a time: text
    advances all three axes; a video of (t, h, w) merged patches sits at base + (t * seconds *
    tokens_per_second, h, w); text resumes at the block's largest position + 1."""
    vision = model.config.vision_config
    merge, per_second = vision.spatial_merge_size, vision.tokens_per_second
    out, i, base, grids = [], 0, 0, iter(zip(video_grids.tolist(), seconds.tolist()))
    while i < len(input_ids):
        if input_ids[i] == model.config.video_token_id:
            (t, h, w), step = next(grids)
            block = [(base + int(ti * step * per_second), base + hi, base + wi)
                     for ti in range(t) for hi in range(h // merge) for wi in range(w // merge)]
            out += block
            base = max(max(p) for p in block) + 1
            i += len(block)
        else:
            out.append((base, base, base))
            base += 1
            i += 1
    return torch.tensor(out).T


def _reference_targets(model, pixel_values, grid, size):
    """Per image: run the vision tower on that image alone, drop the remainder, average K chunks."""
    targets, start = [], 0
    for thw in grid:
        patches = int(thw.prod())
        with torch.no_grad():
            feats = model.model.visual(pixel_values[start:start + patches], grid_thw=thw[None]).pooler_output
        start += patches
        chunk = feats.shape[0] // size
        targets.append(torch.stack([feats[k * chunk:(k + 1) * chunk].double().mean(0) for k in range(size)]))
    return torch.stack(targets)


def test_latent_targets_equal_a_per_image_reference(model, processor, ids):
    rng = np.random.default_rng(0)
    # merged tokens per image: 6 (remainder 2), 12 (none), 15 (remainder 3) for latent_size 4
    images = [_noise(rng, 56, 84), _noise(rng, 112, 84), _noise(rng, 84, 140)]
    enc = processor.image_processor(images=images, return_tensors="pt")
    got = latent_targets(model, enc["pixel_values"], enc["image_grid_thw"], ids.latent_size)
    assert got.shape == (3, ids.latent_size, model.config.text_config.hidden_size)
    assert got.dtype == torch.float32 and not got.requires_grad
    reference = _reference_targets(model, enc["pixel_values"], enc["image_grid_thw"], ids.latent_size)
    torch.testing.assert_close(got.double(), reference, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="latent_size=7"):  # the first image has 6 merged tokens
        latent_targets(model, enc["pixel_values"], enc["image_grid_thw"], 7)


@pytest.fixture(scope="module")
def dift_samples(tmp_path_factory):
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("dift")

    def clip(name, count, height, width):
        return [_save(_noise(rng, height, width), root / f"{name}_{i}.png") for i in range(count)]

    return [
        DiftSample("two_images", "Which way does the red box move?",
                   "<think>first <output_image> then <output_image></think><answer>B</answer>",
                   clip("a", 3, 56, 84), clip("ao", 1, 56, 84) + clip("ap", 1, 112, 84)),
        DiftSample("one_image", "Is the camera panning left or right between 2s and 6s?",
                   "<think>the view <output_image> shifts</think><answer>A. Pan Left</answer>",
                   clip("b", 4, 84, 56), clip("bo", 1, 84, 140)),
    ]


def _reference_dift(model, batch, ids):
    """CE over full logits and the cosine term with per-slot loops, through upstream forward."""
    size = ids.latent_size
    targets = _reference_targets(model, batch["pixel_values_latent"], batch["image_grid_thw_latent"], size)
    input_ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(input_ids).detach().clone()
    slots = [(b, t) for b in range(input_ids.shape[0]) for t in range(input_ids.shape[1])
             if input_ids[b, t] == ids.pad and batch["labels"][b, t] == IGNORE_INDEX
             and batch["attention_mask"][b, t] == 1 and t > 0 and input_ids[b, t - 1] in (ids.start, ids.pad)]
    flat = targets.reshape(-1, targets.shape[-1])
    for k, (b, t) in enumerate(slots):
        embeds[b, t] = flat[k].float()
    positions = torch.ones(3, *input_ids.shape, dtype=torch.long)
    for b, length in enumerate(batch["attention_mask"].sum(1).tolist()):  # right padding
        positions[:, b, :length] = _official_positions(model, input_ids[b, :length].tolist(),
                                                       batch["video_grid_thw"][b:b + 1],
                                                       batch["second_per_grid_ts"][b:b + 1])
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, inputs_embeds=embeds, position_ids=positions,
                             attention_mask=batch["attention_mask"],
                             pixel_values_videos=batch["pixel_values_videos"],
                             video_grid_thw=batch["video_grid_thw"]).last_hidden_state
        logits = model.lm_head(hidden).double()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                         ignore_index=IGNORE_INDEX)
    per_image = []
    for i in range(targets.shape[0]):
        cos = [F.cosine_similarity(hidden[b, t - 1].double(), flat[i * size + s], dim=0)
               for s, (b, t) in enumerate(slots[i * size:(i + 1) * size])]
        per_image.append(sum(1 - c for c in cos) / size)
    sim = sum(per_image) / len(per_image)
    return float(0.1 * ce + sim), float(ce), float(sim)


def test_dift_loss_equals_plain_torch_recomputation(model, processor, ids, dift_samples):
    batch = DiftCollator(processor, ids)(dift_samples)
    out = dift_forward(model, batch, ids)
    loss, ce, sim = _reference_dift(model, batch, ids)
    assert out.loss.item() == pytest.approx(loss, abs=1e-5)
    assert out.ce.item() == pytest.approx(ce, abs=1e-5)
    assert out.sim.item() == pytest.approx(sim, abs=1e-5)
    assert out.num_latents == 3 * ids.latent_size
    assert out.num_text_tokens == int((batch["labels"] != IGNORE_INDEX).sum())
    assert set(out.metrics()) >= {"loss", "ce", "sim", "cos"}


def test_dift_gradient_skips_targets_and_vision_tower(model, processor, ids, dift_samples):
    batch = DiftCollator(processor, ids)(dift_samples)
    model.zero_grad(set_to_none=True)
    try:
        dift_forward(model, batch, ids).loss.backward()
        assert all(p.grad is None for p in model.model.visual.parameters())
        assert model.lm_head.weight.grad.abs().sum() > 0
        assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        # text embeddings train; the latent pad rows never (their slots hold the targets)
        embedding_grad = model.get_input_embeddings().weight.grad
        assert embedding_grad[batch["input_ids"][batch["labels"] != IGNORE_INDEX]].abs().sum() > 0
        assert embedding_grad[ids.pad].abs().sum() == 0
    finally:
        model.zero_grad(set_to_none=True)


def test_compiled_blocks_give_the_eager_dift_loss_and_gradients(tiny_model_dir, processor, ids, dift_samples):
    """`compile_blocks` (inductor) changes speed only: the DIFT loss and every gradient match eager,
    with gradient checkpointing on, and a batch of another length reuses the dynamic-shape graphs."""
    from fourdthinker.model import compile_blocks, freeze_vision_tower, load_model

    def run(model, samples):
        model.zero_grad(set_to_none=True)
        out = dift_forward(model, DiftCollator(processor, ids)(samples), ids)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    models = []
    for compiled in (False, True):
        m = load_model(tiny_model_dir, torch.float32)  # the tiny model has its latent tokens
        freeze_vision_tower(m)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        if compiled:
            assert compile_blocks(m) == len(m.model.language_model.layers) + len(m.model.visual.blocks)
        models.append(m)
    for samples in (dift_samples, dift_samples[:1]):  # two lengths
        (eager_loss, eager_grads), (loss, grads) = run(models[0], samples), run(models[1], samples)
        assert loss == pytest.approx(eager_loss, abs=1e-5)
        assert grads.keys() == eager_grads.keys() and len(grads) > 10
        assert all(torch.allclose(grads[n], eager_grads[n], atol=1e-5, rtol=1e-4) for n in grads)


def test_dift_forward_refuses_a_trainable_vision_tower(tiny_model_dir, processor, ids, dift_samples):
    from transformers import Qwen2_5_VLForConditionalGeneration

    trainable = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="freeze_vision_tower"):
        dift_forward(trainable, DiftCollator(processor, ids)(dift_samples[:1]), ids)


def test_dift_without_latents_is_weighted_ce(model, processor, ids, dift_samples):
    plain = DiftSample("plain", "q", "<think>no images</think><answer>C</answer>",
                       dift_samples[0].image_input, [])
    batch = DiftCollator(processor, ids)([plain])
    assert batch["pixel_values_latent"].shape[0] == 0 and not batch["latent_mask"].any()
    out = dift_forward(model, batch, ids, ce_weight=0.1)
    assert out.num_latents == 0
    assert out.loss.item() == pytest.approx(0.1 * out.ce.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# latent-aware generation

@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(2)
    return [
        (question_prompt("What moves?"), [_noise(rng, 56, 84) for _ in range(2)]),
        (question_prompt("Which direction does the camera move between 1s and 5s?"),
         [_noise(rng, 84, 56) for _ in range(3)]),
        (question_prompt("Is the blue sphere getting closer to the camera?"),
         [_noise(rng, 56, 56) for _ in range(4)]),
        (question_prompt("Describe the motion."), None),  # text only, in the same batch
    ]


# Row 0 never enters latent mode, row 1 enters once, row 2 twice (the second block right after
# the first one's <|latent_end|> + a few text tokens), row 3 (no video) once.
FORCED = [[], [2], [0, 9], [4]]
ROWS = range(len(FORCED))
STEPS = 18


def _blocks_at(steps: list[int], ids: LatentIds) -> dict[int, int]:
    """Expected token at each step of the forced blocks."""
    expected = {}
    for s in steps:
        expected[s] = ids.start
        expected.update({s + 1 + i: ids.pad for i in range(ids.latent_size)})
        expected[s + 1 + ids.latent_size] = ids.end
    return expected


@pytest.fixture(scope="module")
def batched(model, processor, ids, prompts):
    inputs = prompt_batch(processor, prompts)
    return inputs, generate_latent(model, inputs, ids, STEPS, eos_token_ids=[], forced_latent_steps=FORCED)


def test_batched_greedy_generation_equals_each_row_alone(model, processor, ids, prompts, batched):
    _, gen = batched
    assert gen.finish_reasons == ["length"] * len(ROWS)
    for row, (prompt, forced) in enumerate(zip(prompts, FORCED)):
        alone = generate_latent(model, prompt_batch(processor, [prompt]), ids, STEPS, eos_token_ids=[],
                                forced_latent_steps=[forced])
        assert gen.sequences[row] == alone.sequences[0]
        torch.testing.assert_close(gen.latents[row], alone.latents[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(gen.logprobs[row], alone.logprobs[0], atol=1e-5, rtol=0)

        sequence = gen.sequences[row]
        for step, token in _blocks_at(forced, ids).items():
            assert sequence[step] == token
        assert sequence.count(ids.start) == len(forced)
        assert gen.latents[row].shape == (len(forced) * ids.latent_size, model.config.text_config.hidden_size)


def _teacher_forced_hidden(model, inputs, row, completion, latents, ids):
    """Upstream forward of one unpadded row (prompt + completion) with `latents` written, by a
    Python loop, at the pads that follow each <|latent_start|>."""
    keep = inputs["attention_mask"][row].bool()
    prompt = inputs["input_ids"][row][keep]
    input_ids = torch.cat([prompt, torch.tensor(completion)])[None]
    embeds = model.get_input_embeddings()(input_ids).detach().clone()
    slots = []
    for j, token in enumerate(completion):
        if token == ids.start:
            for i in range(1, ids.latent_size + 1):
                if j + i < len(completion):
                    slots.append(len(prompt) + j + i)
    for k, position in enumerate(slots):
        embeds[0, position] = latents[k]
    video = {}
    if (prompt == model.config.video_token_id).any():  # the rows with a video come first here
        patches = slice(int(inputs["video_grid_thw"][:row].prod(-1).sum()),
                        int(inputs["video_grid_thw"][:row + 1].prod(-1).sum()))
        video = {"pixel_values_videos": inputs["pixel_values_videos"][patches],
                 "video_grid_thw": inputs["video_grid_thw"][row:row + 1]}
    positions = _official_positions(model, input_ids[0].tolist(), inputs["video_grid_thw"][row:row + 1],
                                    inputs["second_per_grid_ts"][row:row + 1])[:, None]
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, inputs_embeds=embeds, position_ids=positions,
                             **video).last_hidden_state[0]
    return hidden, len(prompt), slots


def test_fed_latents_are_the_hidden_states_before_each_slot(model, ids, batched):
    inputs, gen = batched
    for row in ROWS:
        hidden, prompt_len, slots = _teacher_forced_hidden(model, inputs, row, gen.sequences[row],
                                                           gen.latents[row], ids)
        assert len(slots) == gen.latents[row].shape[0]
        for k, position in enumerate(slots):
            torch.testing.assert_close(gen.latents[row][k], hidden[position - 1], atol=1e-4, rtol=0)
        # and the generation's log-probs are the raw distribution at each step
        logits = model.lm_head(hidden[prompt_len - 1:-1]).double()
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(gen.sequences[row])[:, None])[:, 0]
        torch.testing.assert_close(gen.logprobs[row].double(), expected, atol=1e-4, rtol=0)


def test_completion_logprobs_reproduce_generation_only_with_its_latents(model, ids, batched):
    inputs, gen = batched
    scored = completion_logprobs(model, inputs, gen.sequences, gen.latents, ids)
    for row in ROWS:
        assert (scored[row] - gen.logprobs[row]).abs().max() < 1e-4

    pad_embedding = model.get_input_embeddings().weight[ids.pad].detach()
    as_pads = [pad_embedding.expand_as(v).clone() for v in gen.latents]
    wrong = completion_logprobs(model, inputs, gen.sequences, as_pads, ids)
    assert (wrong[0] - gen.logprobs[0]).abs().max() < 1e-4  # row 0 has no latents
    for row in ROWS[1:]:
        after_first_block = FORCED[row][0] + 2  # logits that already read a latent slot
        diff = (wrong[row] - gen.logprobs[row])[after_first_block:].abs().max()
        assert diff > 1e-3

    with pytest.raises(ValueError, match="latent slots"):
        completion_logprobs(model, inputs, gen.sequences, [v[:1] for v in gen.latents], ids)


def test_rows_sharing_prompts_score_as_if_each_row_had_its_own_video(model, processor, ids, prompts, batched):
    """GRPO scores G completions per prompt: `row_prompt_batch` processes each distinct video once and
    the tower sees it once, and the log-probs equal those of one video per row."""
    from fourdthinker.data.collate import row_prompt_batch

    _, gen = batched
    index = [2, 0, 2, 3, 0, 2]  # shared videos, rows out of order, a text-only prompt between
    completions, latents = [gen.sequences[i] for i in index], [gen.latents[i] for i in index]
    per_row = prompt_batch(processor, [prompts[i] for i in index])
    shared = row_prompt_batch(processor, prompts, index)
    assert torch.equal(shared["input_ids"], per_row["input_ids"])
    assert torch.equal(shared["attention_mask"], per_row["attention_mask"])
    assert shared["video_grid_thw"].shape[0] == 2 < per_row["video_grid_thw"].shape[0] == 5
    assert shared["video_index"].tolist() == [1, 0, 1, 0, 1]  # distinct prompts 0, 2 (3 has no video)
    expected = completion_logprobs(model, per_row, completions, latents, ids)
    got = completion_logprobs(model, shared, completions, latents, ids)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-5)


def test_completion_logprobs_are_differentiable(model, ids, batched):
    inputs, gen = batched
    model.zero_grad(set_to_none=True)
    try:
        scored = completion_logprobs(model, inputs, gen.sequences, gen.latents, ids)
        torch.stack([s.sum() for s in scored]).sum().backward()
        assert model.lm_head.weight.grad.abs().sum() > 0
        assert model.get_input_embeddings().weight.grad[gen.sequences[0]].abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)


def test_generation_stops_at_eos_per_row(model, processor, ids, prompts, batched):
    inputs, free = batched
    eos = free.sequences[0][3]  # a text token row 0 emits greedily at step 3
    gen = generate_latent(model, inputs, ids, STEPS, eos_token_ids=[eos], forced_latent_steps=FORCED)
    for row in ROWS:
        full = free.sequences[row]
        text_steps = [s for s, t in enumerate(full) if t == eos and s not in _blocks_at(FORCED[row], ids)]
        if text_steps:
            assert gen.sequences[row] == full[:text_steps[0] + 1] and gen.finish_reasons[row] == "stop"
        else:
            assert gen.sequences[row] == full and gen.finish_reasons[row] == "length"
        torch.testing.assert_close(gen.logprobs[row], free.logprobs[row][:len(gen.sequences[row])])
    assert gen.finish_reasons[0] == "stop" and len(gen.sequences[0]) <= 4


def test_a_block_cut_by_max_new_tokens_just_ends(model, processor, ids, prompts):
    inputs = prompt_batch(processor, prompts[:1])
    gen = generate_latent(model, inputs, ids, 6, eos_token_ids=[], forced_latent_steps=[[3]])
    assert gen.sequences[0][3:] == [ids.start, ids.pad, ids.pad]
    assert gen.finish_reasons == ["length"] and gen.latents[0].shape[0] == 2
    scored = completion_logprobs(model, inputs, gen.sequences, gen.latents, ids)
    assert (scored[0] - gen.logprobs[0]).abs().max() < 1e-4


def test_sampling_is_reproducible_and_top_p_narrows_to_greedy(model, processor, ids, prompts):
    inputs = prompt_batch(processor, prompts[:2])

    def sample(seed, **kw):
        return generate_latent(model, inputs, ids, 10, do_sample=True, eos_token_ids=[],
                               generator=torch.Generator().manual_seed(seed), **kw).sequences

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    greedy = generate_latent(model, inputs, ids, 10, eos_token_ids=[]).sequences
    assert sample(3, top_p=1e-6) == greedy
    assert sample(3, temperature=1e-4) == greedy


def test_generation_rejects_right_padded_prompts(model, ids):
    inputs = {"input_ids": torch.tensor([[5, 6, 7], [5, 6, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    with pytest.raises(ValueError, match="left-padded"):
        generate_latent(model, inputs, ids, 3)


def test_latent_slot_mask_marks_the_positions_after_each_start(ids):
    S, P, E, x = ids.start, ids.pad, ids.end, 5
    K = ids.latent_size
    tokens = torch.tensor([[x, S] + [P] * K + [E, P, x, S, P],
                           [P, E, x, x, x, x, x, x, x, x, x]])
    assert tokens.shape[1] == 11 and K == 4
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, -2:] = False
    expected = torch.zeros_like(valid)
    expected[0, 2:2 + K] = True  # a pad outside a block (position 7) is plain text
    expected[0, 10] = True      # a block cut short still marks what it has
    assert torch.equal(latent_slot_mask(tokens, valid, ids), expected)
