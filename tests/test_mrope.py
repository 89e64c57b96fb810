"""M-RoPE positions follow the original Qwen2.5-VL rule (the one vLLM serves with)."""

from __future__ import annotations

import torch

from fourdthinker.mrope import mrope_positions

IMG, VID, TXT = 90, 91, 5
MERGE, TPS = 2, 2.0


def _official_row(ids: list[int], grids: list[tuple[int, int, int, float]]) -> torch.Tensor:
    """The rule written plainly, one block at a time: text advances all axes; a block of
    (t, h, w) merged patches sits at base + (t*factor, h, w); text resumes at its max + 1."""
    out, i, g, next_pos = [], 0, iter(grids), 0
    while i < len(ids):
        if ids[i] in (IMG, VID):
            t, h, w, factor = next(g)
            block = [(int(ti * factor), hi, wi) for ti in range(t) for hi in range(h) for wi in range(w)]
            out += [(next_pos + a, next_pos + b, next_pos + c) for a, b, c in block]
            next_pos = max(max(p) for p in out[-len(block):]) + 1
            i += len(block)
        else:
            out.append((next_pos,) * 3)
            next_pos += 1
            i += 1
    return torch.tensor(out).T


def test_positions_equal_the_official_rule_for_mixed_left_padded_batches():
    # row 0: text, a 3-temporal-patch video (3x2x3 merged), text, an image (1x3x2), text
    # row 1: left padding, text, a 1-patch video (1x2x2), text
    row0 = [TXT] * 3 + [VID] * 18 + [TXT] * 2 + [IMG] * 6 + [TXT] * 4
    row1 = [TXT] * 2 + [VID] * 4 + [TXT] * 5
    pad = len(row0) - len(row1)
    ids = torch.tensor([row0, [0] * pad + row1])
    mask = torch.tensor([[1] * len(row0), [0] * pad + [1] * len(row1)])
    video_grid = torch.tensor([[3, 4, 6], [1, 4, 4]])
    image_grid = torch.tensor([[1, 6, 4]])
    spg = torch.tensor([2.0, 0.5])
    pos, delta = mrope_positions(ids, mask, image_token_id=IMG, video_token_id=VID,
                                 spatial_merge_size=MERGE, tokens_per_second=TPS,
                                 image_grid_thw=image_grid, video_grid_thw=video_grid, second_per_grid_ts=spg)
    expected0 = _official_row(row0, [(3, 2, 3, 2.0 * TPS), (1, 3, 2, 1.0)])
    expected1 = _official_row(row1, [(1, 2, 2, 0.5 * TPS)])
    assert torch.equal(pos[:, 0], expected0)
    assert torch.equal(pos[:, 1, pad:], expected1)
    assert (pos[:, 1, :pad] == 1).all()
    assert delta[:, 0].tolist() == [int(expected0.max()) + 1 - len(row0), int(expected1.max()) + 1 - len(row1)]
    # The temporal extent (2 * 4 = 8) of the video, not max(h, w), decides where text resumes.
    assert int(pos[0, 0, 21]) == 3 + 8 + 1


def test_text_only_rows_are_plain_arange():
    ids = torch.full((2, 6), TXT)
    pos, delta = mrope_positions(ids, None, image_token_id=IMG, video_token_id=VID,
                                 spatial_merge_size=MERGE, tokens_per_second=TPS)
    assert torch.equal(pos, torch.arange(6).expand(3, 2, 6))
    assert delta.tolist() == [[0], [0]]
