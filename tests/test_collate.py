"""DIFT collation: what is labelled, where the latent slots are, and that batching changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fourdthinker.data.collate import DiftCollator, chat_messages, prompt_batch, render_latent_text
from fourdthinker.data.dift_dataset import DiftSample
from fourdthinker.data.video import VIDEO_FPS, load_frames, load_image
from fourdthinker.model import IGNORE_INDEX, dift_forward, embed_with_latents, latent_targets
from fourdthinker.prompts import question_prompt
from fourdthinker.tokens import LATENT_END, LATENT_PAD, LATENT_START


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("collate")

    def images(name, count, height, width):
        paths = []
        for i in range(count):
            paths.append(str(root / f"{name}_{i}.png"))
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(paths[-1])
        return paths

    return [
        DiftSample("short", "Left or right?", "<think><output_image></think><answer>A</answer>",
                   images("s", 2, 56, 84), images("so", 1, 56, 84)),
        DiftSample("long", "Which direction does the green cube move relative to the camera from 1s to 5s?",
                   "<think>The cube starts here <output_image> and ends there <output_image>, so it moves "
                   "right.</think><answer>B. Moving Right</answer>",
                   images("l", 5, 84, 112), images("lo", 1, 84, 84) + images("lp", 1, 112, 84)),
    ]


def test_render_latent_text_and_chat_messages(ids):
    block = LATENT_START + LATENT_PAD * ids.latent_size + LATENT_END
    assert render_latent_text("a <output_image> b <output_image>", ids) == f"a {block} b {block}"
    frame = Image.new("RGB", (56, 56))
    user, assistant = chat_messages("Q?", [frame], "A.")
    assert user["role"] == "user"
    assert user["content"][0] == {"type": "video", "video": [frame], "fps": VIDEO_FPS}
    assert user["content"][1] == {"type": "text", "text": "Q?"}
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": "A."}]}
    assert chat_messages("Q?", None) == [{"role": "user", "content": [{"type": "text", "text": "Q?"}]}]


def test_labels_cover_exactly_the_assistant_turn_minus_latent_pads(processor, ids, samples):
    batch = DiftCollator(processor, ids)(samples)
    tokenizer = processor.tokenizer
    for row, sample in enumerate(samples):
        length = int(batch["attention_mask"][row].sum())
        input_ids, labels = batch["input_ids"][row], batch["labels"][row]
        # the prompt is exactly what generation starts from
        frames = load_frames(sample.image_input)
        prompt = prompt_batch(processor, [(question_prompt(sample.text_input), frames)])["input_ids"][0]
        prompt_len = len(prompt)
        assert torch.equal(input_ids[:prompt_len], prompt)
        assert (labels[:prompt_len] == IGNORE_INDEX).all()
        # the rest is the assistant turn as the chat template ends it
        answer = tokenizer.decode(input_ids[prompt_len:length])
        assert answer == render_latent_text(sample.text_output, ids) + "<|im_end|>\n"
        is_pad = input_ids[prompt_len:length] == ids.pad
        assert torch.equal(labels[prompt_len:length][~is_pad], input_ids[prompt_len:length][~is_pad])
        assert (labels[prompt_len:length][is_pad] == IGNORE_INDEX).all()
        assert (labels[length:] == IGNORE_INDEX).all() and (batch["attention_mask"][row, length:] == 0).all()
        for token in (ids.start, ids.end, tokenizer.convert_tokens_to_ids("<|im_end|>")):
            assert (labels == token).any()
    assert batch["num_tokens"] == int(batch["attention_mask"].sum())
    # the video's M-RoPE time step follows the policy frame rate, as in generation
    temporal = processor.video_processor.temporal_patch_size
    assert batch["second_per_grid_ts"].tolist() == [temporal / VIDEO_FPS] * len(samples)


def test_latent_slots_are_latent_size_pads_per_output_image(processor, ids, samples):
    batch = DiftCollator(processor, ids)(samples)
    K = ids.latent_size
    for row, sample in enumerate(samples):
        tokens = batch["input_ids"][row].tolist()
        starts = [t for t, tok in enumerate(tokens) if tok == ids.start]
        assert len(starts) == len(sample.image_output)
        expected = torch.zeros(len(tokens), dtype=torch.bool)
        for t in starts:
            assert tokens[t + 1:t + 2 + K] == [ids.pad] * K + [ids.end]
            expected[t + 1:t + 1 + K] = True
        assert torch.equal(batch["latent_mask"][row], expected)

    images = [load_image(p) for s in samples for p in s.image_output]
    reference = processor.image_processor(images=images, return_tensors="pt")
    assert torch.equal(batch["pixel_values_latent"], reference["pixel_values"])
    assert torch.equal(batch["image_grid_thw_latent"], reference["image_grid_thw"])


def test_text_with_literal_latent_tokens_is_refused(processor, ids, samples):
    broken = DiftSample("broken", "q", f"<think>{LATENT_PAD}<output_image></think>", samples[0].image_input,
                        samples[0].image_output)
    with pytest.raises(ValueError, match="broken"):
        DiftCollator(processor, ids)([broken])


def _row_hidden(model, batch, row_slice, targets):
    """Final hidden states of the real tokens of each row in `batch`."""
    embeds, positions = embed_with_latents(
        model, batch["input_ids"], batch["latent_mask"], targets, attention_mask=batch["attention_mask"],
        pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"],
        second_per_grid_ts=batch["second_per_grid_ts"])
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                            position_ids=positions).last_hidden_state
    return [hidden[r][batch["attention_mask"][r].bool()] for r in row_slice]


def test_a_batch_of_two_equals_each_sample_alone(model, processor, ids, samples):
    collate = DiftCollator(processor, ids)
    pair = collate(samples)
    alone = [collate([s]) for s in samples]
    assert pair["input_ids"].shape[1] == max(a["input_ids"].shape[1] for a in alone)
    assert alone[0]["input_ids"].shape[1] != alone[1]["input_ids"].shape[1]
    for row, single in enumerate(alone):
        n = single["input_ids"].shape[1]
        for key in ("input_ids", "labels", "latent_mask", "attention_mask"):
            assert torch.equal(pair[key][row, :n], single[key][0])
    assert torch.equal(pair["pixel_values_latent"], torch.cat([a["pixel_values_latent"] for a in alone]))
    assert torch.equal(pair["pixel_values_videos"], torch.cat([a["pixel_values_videos"] for a in alone]))

    with torch.no_grad():
        both = dift_forward(model, pair, ids)
        each = [dift_forward(model, a, ids) for a in alone]
    tokens = [e.num_text_tokens for e in each]
    images = [e.num_latents // ids.latent_size for e in each]
    assert both.num_text_tokens == sum(tokens) and both.num_latents == sum(e.num_latents for e in each)
    # CE is a mean over the batch's tokens, the cosine term a mean over its images
    ce = sum(e.ce * n for e, n in zip(each, tokens)) / sum(tokens)
    sim = sum(e.sim * n for e, n in zip(each, images)) / sum(images)
    assert both.ce.item() == pytest.approx(ce.item(), abs=1e-5)
    assert both.sim.item() == pytest.approx(sim.item(), abs=1e-5)

    def targets(b):
        return latent_targets(model, b["pixel_values_latent"], b["image_grid_thw_latent"],
                              ids.latent_size).flatten(0, 1)

    pair_rows = _row_hidden(model, pair, range(2), targets(pair))
    for row, single in enumerate(alone):
        (single_row,) = _row_hidden(model, single, range(1), targets(single))
        torch.testing.assert_close(pair_rows[row], single_row, atol=1e-5, rtol=0)


def test_prompt_batch_left_pads_and_matches_single_prompts(processor, samples):
    prompts = [(question_prompt(s.text_input), load_frames(s.image_input)) for s in samples]
    batch = prompt_batch(processor, prompts)
    assert (batch["attention_mask"][:, -1] == 1).all()
    temporal = processor.video_processor.temporal_patch_size
    assert batch["second_per_grid_ts"].tolist() == [temporal / VIDEO_FPS] * 2
    for row, prompt in enumerate(prompts):
        single = prompt_batch(processor, [prompt])["input_ids"][0]
        assert torch.equal(batch["input_ids"][row][batch["attention_mask"][row].bool()], single)
        text = processor.tokenizer.decode(single)
        assert text.endswith("<|im_start|>assistant\n") and prompt[0] in text


def test_a_sample_whose_media_fail_to_load_is_skipped_counted_and_replaced(processor, ids, samples, tmp_path):
    broken_frame = tmp_path / "broken.png"
    broken_frame.write_bytes(b"not an image")
    short, long = samples
    broken = DiftSample("broken", short.text_input, short.text_output, [str(broken_frame)], short.image_output)
    collator = DiftCollator(processor, ids)
    batch = collator([broken, long])
    assert collator.load_failures == 1
    reference = DiftCollator(processor, ids)([long, long])  # the loaded sample takes the broken one's place
    for key, value in reference.items():
        assert torch.equal(batch[key], value) if torch.is_tensor(value) else batch[key] == value, key
    only_broken = collator([broken, broken])  # a batch with nothing loadable: the last good batch's samples
    assert collator.load_failures == 3
    assert torch.equal(only_broken["input_ids"], reference["input_ids"])
    import pickle

    from fourdthinker.data.video import FrameLoadError

    with pytest.raises(FrameLoadError) as err:  # nothing ever loaded: the error survives Ray's pickling
        DiftCollator(processor, ids)([broken])
    back = pickle.loads(pickle.dumps(err.value))
    assert back.path == err.value.path and str(back) == str(err.value)
