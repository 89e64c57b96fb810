"""The offline tiny Qwen2.5-VL: loads like the real one, carries the latent tokens, is reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fourdthinker.cli import main as cli_main
from fourdthinker.tiny_model import QWEN_SPECIAL_TOKENS, build_tiny_model, weights_digest
from fourdthinker.tokens import LATENT_TOKENS, LatentIds, add_latent_tokens


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True)
    return processor, model.eval()


def _frames(n: int, h: int = 56, w: int = 84, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def test_latent_ids_are_consecutive_after_the_base_vocab_in_tokenizer_and_config(loaded):
    processor, model = loaded
    tok = processor.tokenizer
    ids = LatentIds.from_tokenizer(tok)
    assert [ids.pad, ids.start, ids.end] == tok.convert_tokens_to_ids(list(LATENT_TOKENS))
    # Qwen's specials come right after the BPE vocabulary, the latent tokens right after them.
    last_qwen_special = max(tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)))
    assert [ids.pad, ids.start, ids.end] == [last_qwen_special + 1, last_qwen_special + 2, last_qwen_special + 3]
    assert ids.end == len(tok) - 1
    assert LatentIds.from_config(model.config) == LatentIds(ids.pad, ids.start, ids.end, latent_size=4)
    assert model.config.compress_strategy == "average"


def test_new_embedding_and_lm_head_rows_equal_the_mean_of_the_old_rows(loaded):
    _, model = loaded
    ids = LatentIds.from_config(model.config)
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        expected = weight[: ids.pad].mean(dim=0)
        for row in (ids.pad, ids.start, ids.end):
            torch.testing.assert_close(weight[row], expected, rtol=0, atol=1e-6)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_adding_latent_tokens_again_changes_nothing(loaded):
    processor, model = loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_tokens = len(processor.tokenizer)
    ids = add_latent_tokens(processor, model, latent_size=4)
    assert len(processor.tokenizer) == n_tokens
    assert ids == LatentIds.from_config(model.config)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_forward_with_an_image_and_with_a_four_frame_video(loaded):
    processor, model = loaded
    for kind, media in (("image", _frames(1)[0]), ("video", _frames(4))):
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "What moves?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        kwargs = {"images": [media]} if kind == "image" else {"videos": [media]}
        inputs = processor(text=[text], return_tensors="pt", **kwargs)
        with torch.no_grad():
            out = model(**inputs)
        pad_id = model.config.image_token_id if kind == "image" else model.config.video_token_id
        grid = inputs["image_grid_thw" if kind == "image" else "video_grid_thw"][0]
        # One placeholder per merged 2x2 patch group of the vision tower.
        assert int((inputs["input_ids"] == pad_id).sum()) == int(grid.prod()) // 4
        assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
        assert torch.isfinite(out.logits).all()


def test_same_seed_gives_identical_weights_and_another_seed_differs(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert weights_digest(again) == weights_digest(tiny_model_dir)
    assert weights_digest(other) != weights_digest(tiny_model_dir)
    assert (again / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_cli_refuses_a_non_empty_dir_without_overwrite_and_keeps_it(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["tiny-model", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_rejects_an_unwritable_dir_and_a_bad_latent_size(tmp_path, capsys):
    assert cli_main(["tiny-model", "--out", "/proc/fourdthinker/m"]) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["tiny-model", "--out", str(tmp_path / "m"), "--latent-size", "0"])
    assert exc.value.code == 2
    assert "--latent-size" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
