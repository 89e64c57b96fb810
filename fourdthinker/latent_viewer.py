"""Latent imagery viewer: which parts of the input video a latent block "looks like".

DIFT pulls each latent vector towards the frozen vision tower's merged features of a mental image
(`model.latent_targets`), so the natural place to look a latent block up is that same space: the
merged vision tokens of the input clip, one per 28x28 pixel cell of a temporal pair of frames. For
each block, a patch's score is its best cosine against the block's vectors (one [K, N] matmul per
block), and the k best patches are reported as (frame, row, col, cosine); `contact_sheet` draws
them, one panel per block, the frames holding them with the patches outlined.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from fourdthinker.reply import LatentBlock


@dataclass(frozen=True)
class VideoGrid:
    """The layout of a clip's merged vision tokens: raster order over (t, row, col)."""

    t: int  # temporal groups (each `temporal_patch` frames)
    rows: int  # merged rows per frame (pixels / (patch * merge))
    cols: int
    temporal_patch: int = 2
    cell: int = 28  # pixels per merged token side (ViT patch x spatial merge)

    @classmethod
    def from_grid_thw(cls, grid_thw: Sequence[int], video_processor) -> "VideoGrid":
        """From a clip's `video_grid_thw` (in ViT patches) and the processor that made it."""
        merge = int(video_processor.merge_size)
        t, h, w = (int(x) for x in grid_thw)
        return cls(t, h // merge, w // merge, int(video_processor.temporal_patch_size),
                   int(video_processor.patch_size) * merge)

    @property
    def size(self) -> int:
        return self.t * self.rows * self.cols


@dataclass(frozen=True)
class PatchMatch:
    frame: int  # index of the first frame of the patch's temporal group, in the frames the model saw
    row: int
    col: int
    cosine: float


def nearest_patches(vectors: torch.Tensor, features: torch.Tensor, grid: VideoGrid, k: int,
                    num_frames: int | None = None) -> list[PatchMatch]:
    """The k patches whose features have the highest cosine to any of `vectors` ([K, H]), best first."""
    if features.shape[0] != grid.size:
        raise ValueError(f"{features.shape[0]} vision features for a {grid.t}x{grid.rows}x{grid.cols} grid")
    sims = F.normalize(vectors.float(), dim=-1) @ F.normalize(features.float(), dim=-1).T  # [K, N]
    best, index = sims.amax(0).topk(min(k, grid.size))
    per_frame = grid.rows * grid.cols
    last = (num_frames - 1) if num_frames else None
    out = []
    for cos, i in zip(best.tolist(), index.tolist()):
        frame = (i // per_frame) * grid.temporal_patch
        out.append(PatchMatch(min(frame, last) if last is not None else frame,
                              (i % per_frame) // grid.cols, i % grid.cols, float(cos)))
    return out


def block_summaries(blocks: list[LatentBlock], latent_positions: list[int], latents: torch.Tensor | None,
                    features: torch.Tensor | None, grid: VideoGrid | None, k: int = 5,
                    num_frames: int | None = None) -> list[dict]:
    """Per latent block: its number, token span, the norms of its vectors and (with a clip) its
    nearest patches, as plain data (the `fourdthinker.latents` field of a reply)."""
    row_of = {pos: r for r, pos in enumerate(latent_positions)}
    out = []
    for block in blocks:
        rows = [row_of[s] for s in block.slots if s in row_of]
        entry = {"block": block.number, "start": block.start, "stop": block.stop, "slots": block.slots,
                 "closed": block.closed, "norms": [], "nearest": []}
        if rows and latents is not None:
            vectors = latents[rows].float()
            entry["norms"] = vectors.norm(dim=-1).tolist()
            if features is not None and grid is not None:
                entry["nearest"] = [asdict(m) for m in nearest_patches(vectors, features, grid, k, num_frames)]
        out.append(entry)
    return out


_COLOURS = ["#ff3b30", "#ffcc00", "#34c759", "#0a84ff", "#bf5af2", "#ff9f0a", "#64d2ff", "#ff375f"]


def contact_sheet(frames: Sequence[Image.Image], summaries: list[dict], cell: int = 28,
                  label_height: int = 30, scale: int = 1) -> Image.Image:
    """One panel (a row) per latent block: a label, then each frame that holds one of its nearest
    patches (enlarged `scale` times), those patches outlined and numbered by rank (colour by rank)."""
    if not summaries:
        raise ValueError("no latent blocks to show: the reply has none")
    if scale > 1:
        frames = [f.resize((f.width * scale, f.height * scale), Image.Resampling.NEAREST) for f in frames]
        cell *= scale
    width, height = frames[0].size
    columns = max(1, max(len({m["frame"] for m in s["nearest"]}) for s in summaries))
    sheet = Image.new("RGB", (columns * (width + 4) + 4, len(summaries) * (height + label_height + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for p, summary in enumerate(summaries):
        top = 4 + p * (height + label_height + 4)
        norms = summary["norms"]
        norm_text = f", |v| {sum(norms) / len(norms):.2f}" if norms else ""
        draw.text((4, top + 2), f"latent {summary['block']}{norm_text}", fill="black")
        shown = sorted({m["frame"] for m in summary["nearest"]})
        for c, frame in enumerate(shown):
            left = 4 + c * (width + 4)
            sheet.paste(frames[frame].convert("RGB"), (left, top + label_height))
            draw.text((left, top + label_height - 13), f"frame {frame}", fill="black")
            for rank, m in enumerate(summary["nearest"]):
                if m["frame"] != frame:
                    continue
                x, y = left + m["col"] * cell, top + label_height + m["row"] * cell
                colour = _COLOURS[rank % len(_COLOURS)]
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=colour, width=2)
                _label(draw, (x + 3, y + 3), f"{rank + 1}: {m['cosine']:.2f}", colour)
    return sheet


def _label(draw: ImageDraw.ImageDraw, at: tuple[int, int], text: str, colour: str) -> None:
    """Text on a black box: legible on any frame."""
    box = draw.textbbox(at, text)
    draw.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], fill="black")
    draw.text(at, text, fill=colour)


def write_contact_sheet(path: str | Path, frames: Sequence[Image.Image], summaries: list[dict],
                        min_height: int = 224) -> Path:
    """The contact sheet as a PNG; small frames are enlarged to at least `min_height` pixels."""
    from fourdthinker.atomic import atomic_write

    sheet = contact_sheet(frames, summaries, scale=max(1, -(-min_height // frames[0].height)))
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
