"""Latent blocks rendered as markers, whole and streamed; the latent viewer's nearest-patch math."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image

from fourdthinker.latent_viewer import VideoGrid, block_summaries, contact_sheet, nearest_patches
from fourdthinker.reply import ReplyStream, latent_blocks, render_reply
from fourdthinker.tokens import LATENT_END, LATENT_PAD, LATENT_START, LatentIds


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    return tokenizer, LatentIds.from_config(AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_each_block_becomes_a_numbered_marker(tok):
    tokenizer, ids = tok
    k = ids.latent_size
    block = LATENT_START + LATENT_PAD * k + LATENT_END
    tokens = _ids(tokenizer, f"<think>look {block} then {block}</think><answer>B</answer>") + [tokenizer.eos_token_id]
    text = render_reply(tokens, tokenizer, ids)
    assert text == "<think>look ⟨latent 1⟩ then ⟨latent 2⟩</think><answer>B</answer>"
    blocks = latent_blocks(tokens, ids)
    assert [(b.number, b.closed, len(b.slots)) for b in blocks] == [(1, True, k), (2, True, k)]
    assert all(tokens[b.start] == ids.start and tokens[b.stop - 1] == ids.end for b in blocks)
    assert all(tokens[s] == ids.pad for b in blocks for s in b.slots)


def test_a_block_cut_by_max_tokens_still_shows_and_is_marked_open(tok):
    tokenizer, ids = tok
    tokens = _ids(tokenizer, "ab" + LATENT_START + LATENT_PAD * 2)
    assert render_reply(tokens, tokenizer, ids) == "ab⟨latent 1⟩"
    (block,) = latent_blocks(tokens, ids)
    assert not block.closed and block.stop == len(tokens) and len(block.slots) == 2


def test_streamed_pieces_concatenate_to_the_whole_reply_and_hold_back_open_blocks(tok):
    tokenizer, ids = tok
    block = LATENT_START + LATENT_PAD * ids.latent_size + LATENT_END
    tokens = _ids(tokenizer, f"héllo wörld {block}ünïcode {block}end")
    stream, pieces = ReplyStream(tokenizer, ids), []
    for n in range(1, len(tokens) + 1):
        piece = stream.update(tokens[:n], final=n == len(tokens))
        pieces.append(piece)
        assert "\ufffd" not in piece
        if tokens[n - 1] in (ids.start, ids.pad):
            assert "⟨latent" not in piece  # an open block shows once it is closed
    assert "".join(pieces) == render_reply(tokens, tokenizer, ids)


def _brute_force(vectors, features, grid, k, num_frames):
    scored = []
    for i, (t, r, c) in enumerate(itertools.product(range(grid.t), range(grid.rows), range(grid.cols))):
        f = features[i]
        best = max(float(v @ f / (v.norm() * f.norm())) for v in vectors)
        scored.append((best, min(t * grid.temporal_patch, num_frames - 1), r, c))
    scored.sort(key=lambda s: -s[0])
    return scored[:k]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_patches_equal_a_brute_force_search(seed):
    g = torch.Generator().manual_seed(seed)
    grid = VideoGrid(t=3, rows=2, cols=4)
    features = torch.randn(grid.size, 16, generator=g)
    vectors = torch.randn(4, 16, generator=g)
    got = nearest_patches(vectors, features, grid, k=5, num_frames=5)
    want = _brute_force(vectors, features, grid, 5, 5)
    assert [(m.frame, m.row, m.col) for m in got] == [w[1:] for w in want]
    assert [m.cosine for m in got] == pytest.approx([w[0] for w in want], abs=1e-5)
    # a vector equal to one patch's feature finds that patch first, at cosine 1
    hit = nearest_patches(features[13:14] * 3.0, features, grid, k=1)[0]
    assert (hit.frame, hit.row, hit.col, round(hit.cosine, 5)) == (2, 1, 1, 1.0)


def test_block_summaries_and_contact_sheet_have_one_panel_per_block():
    g = torch.Generator().manual_seed(0)
    ids = LatentIds(pad=10, start=11, end=12, latent_size=2)
    tokens = [1, 11, 10, 10, 12, 2, 11, 10, 10, 12, 3]
    blocks = latent_blocks(tokens, ids)
    latents = torch.randn(4, 8, generator=g)
    grid = VideoGrid(t=2, rows=2, cols=3)
    features = torch.randn(grid.size, 8, generator=g)
    summaries = block_summaries(blocks, [2, 3, 7, 8], latents, features, grid, k=3, num_frames=4)
    assert [s["block"] for s in summaries] == [1, 2]
    assert summaries[1]["norms"] == pytest.approx(latents[2:].norm(dim=-1).tolist())
    assert summaries[0]["nearest"] == [vars(m) for m in nearest_patches(latents[:2], features, grid, 3, 4)]
    frames = [Image.new("RGB", (84, 56), (40 * i, 0, 0)) for i in range(4)]
    sheet = contact_sheet(frames, summaries, label_height=18)
    columns = max(len({m["frame"] for m in s["nearest"]}) for s in summaries)
    assert sheet.size == (columns * (84 + 4) + 4, 2 * (56 + 18 + 4) + 4)
