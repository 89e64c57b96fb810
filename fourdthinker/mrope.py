"""Qwen2.5-VL's 3D rotary positions (M-RoPE), computed the way the model was trained and vLLM serves.

Text tokens advance all three axes together; a vision block of (t, h, w) merged patches takes
positions base + (t_index * t_factor, h_index, w_index) with t_factor = second_per_grid_ts *
tokens_per_second, and the text after it resumes at the block's largest position + 1.
transformers 5.x resumes after `max(h, w)` instead, ignoring the temporal extent: for videos of
two or more temporal patches that shifts every later position away from what vLLM (and the
original Qwen2.5-VL code) uses, so training and rollouts would see different positions. Computing
them here keeps the learner and the rollout engine on one definition.

Vectorised over the whole batch: no loop over rows or tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mrope_positions(input_ids: Tensor, attention_mask: Tensor | None, *, image_token_id: int,
                    video_token_id: int, spatial_merge_size: int, tokens_per_second: float,
                    image_grid_thw: Tensor | None = None, video_grid_thw: Tensor | None = None,
                    second_per_grid_ts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Positions [3, B, T] (padding gets 1, as in transformers) and per-row deltas [B, 1]
    (max position + 1 - number of real tokens: decode step s of a row sits at len + s + delta)."""
    device = input_ids.device
    batch, length = input_ids.shape
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_image = (input_ids == image_token_id) & valid
    is_video = (input_ids == video_token_id) & valid
    is_vision = is_image | is_video
    index = valid.long().cumsum(1) - 1  # index among the row's real tokens

    prev = torch.nn.functional.pad(is_vision, (1, 0))[:, :-1]
    nxt = torch.nn.functional.pad(is_vision, (0, 1))[:, 1:]
    starts, ends = is_vision & ~prev, is_vision & ~nxt
    num_segments = int(starts.sum())

    positions = index.unsqueeze(0).expand(3, -1, -1).clone()
    if num_segments == 0:
        positions = positions.masked_fill(~valid.unsqueeze(0), 1)
        return positions, (positions.amax(dim=(0, 2)) + 1 - valid.sum(1)).unsqueeze(1)

    # Segments in row-major order; images and videos each consume their own grid list in order.
    seg_is_video = is_video[starts]
    grids = torch.zeros(num_segments, 3, dtype=torch.long, device=device)
    t_factor = torch.ones(num_segments, dtype=torch.float64, device=device)
    if seg_is_video.any():
        if video_grid_thw is None:
            raise ValueError("input_ids hold video tokens but no video_grid_thw was given")
        grids[seg_is_video] = video_grid_thw.to(device).long()
        spg = (second_per_grid_ts.to(device, torch.float64) if second_per_grid_ts is not None
               else torch.ones(int(seg_is_video.sum()), dtype=torch.float64, device=device))
        t_factor[seg_is_video] = spg * tokens_per_second
    if (~seg_is_video).any():
        if image_grid_thw is None:
            raise ValueError("input_ids hold image tokens but no image_grid_thw was given")
        grids[~seg_is_video] = image_grid_thw.to(device).long()
    t = grids[:, 0]
    h = grids[:, 1] // spatial_merge_size
    w = grids[:, 2] // spatial_merge_size
    if not torch.equal((t * h * w), (ends.nonzero()[:, 1] - starts.nonzero()[:, 1] + 1)):
        raise ValueError("vision token runs do not match their grids (t*h*w merged patches each)")
    extent = torch.stack([((t - 1).double() * t_factor).long(), h - 1, w - 1], dim=1).amax(1) + 1
    saved = t * h * w - extent  # tokens a block occupies minus the positions it advances

    # Shift of every token: the `saved` of the blocks that ended strictly before it in its row.
    marker = torch.zeros(batch, length, dtype=torch.long, device=device)
    marker[ends] = saved
    shift = marker.cumsum(1) - marker
    positions = positions - shift.unsqueeze(0)

    seg_id = (starts.flatten().long().cumsum(0) - 1).view(batch, length)
    seg_start_index = index[starts]  # per segment
    local = index - seg_start_index[seg_id.clamp(min=0)]
    sid = seg_id.clamp(min=0)
    hw = h[sid] * w[sid]
    t_idx = ((local // hw).double() * t_factor[sid]).long()
    h_idx = (local // w[sid]) % h[sid]
    w_idx = local % w[sid]
    base = seg_start_index[sid] - shift
    vision_pos = torch.stack([base + t_idx, base + h_idx, base + w_idx])
    positions = torch.where(is_vision.unsqueeze(0), vision_pos, positions)
    positions = positions.masked_fill(~valid.unsqueeze(0), 1)
    last = torch.where(valid.unsqueeze(0), positions, torch.zeros_like(positions)).amax(dim=(0, 2))
    return positions, (last + 1 - valid.sum(1)).unsqueeze(1)


def model_mrope_positions(model, input_ids: Tensor, attention_mask: Tensor | None = None, **grids) -> tuple[Tensor, Tensor]:
    """`mrope_positions` with the constants read from a Qwen2.5-VL model's config."""
    config = model.config
    vision = config.vision_config
    return mrope_positions(input_ids, attention_mask, image_token_id=config.image_token_id,
                           video_token_id=config.video_token_id,
                           spatial_merge_size=vision.spatial_merge_size,
                           tokens_per_second=vision.tokens_per_second, **grids)
