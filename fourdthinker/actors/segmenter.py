"""Text-prompted video segmentation (SAM3) behind one interface, and the Ray Data actor that runs it.

Backends, chosen by `SegmenterConfig.backend`; the pipeline code is the same for all of them:
- `sam3`: the `sam3` package's video predictor on GPU (the production path);
- `transformers`: transformers' `Sam3Model`, sized by config, on CPU (tests, demo, CPU clusters);
- `ground_truth`: the synthetic world's exact masks (label-quality tests and the offline demo).

`SegmentClips` is the callable class given to `Dataset.map_batches`: each actor builds its backend
once, reads a clip's frames from disk, segments every concept, keeps the tracks found often enough,
and writes their masks as 1-bit PNGs with per-frame boxes and areas. Rows carry paths, not pixels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from PIL import Image

from fourdthinker.preprocess.config import PreprocessConfig, SegmenterConfig
from fourdthinker.preprocess.frames import load_frame_arrays
from fourdthinker.preprocess.index import STATUS_OK
from fourdthinker.preprocess.object_motion import mask_statistics

MASKS_DIR = "masks"


@dataclass(frozen=True)
class ClipFrames:
    """A clip as the segmenter sees it: RGB frames (T, H, W, 3) uint8 and their times in seconds."""

    clip_id: str
    frames: np.ndarray
    times: np.ndarray


@dataclass
class Track:
    """One prompt's object over the clip: a boolean (H, W) mask per frame (None where not found)."""

    prompt: str
    masks: list[np.ndarray | None]
    score: float

    def stacked(self, height: int, width: int) -> np.ndarray:
        """(T, H, W) bool, empty where the object was not found."""
        empty = np.zeros((height, width), dtype=bool)
        return np.stack([empty if m is None else m for m in self.masks])


class Segmenter(Protocol):
    def segment(self, clip: ClipFrames, prompts: Sequence[str]) -> list[Track]:
        """One track per prompt, in prompt order; masks have the frames' height and width."""
        ...


class GroundTruthSegmenter:
    """Exact masks of a synthetic world (`fourdthinker.data.synth`): a prompt names an object
    ("red box"); an object that is not in the clip gives an empty track with score 0."""

    def __init__(self, world_root: str | Path):
        self.root = Path(world_root)
        if not (self.root / "ground_truth").is_dir():
            raise FileNotFoundError(f"segmenter.world_root {self.root}: no ground_truth/ directory; "
                                    "point it at a world built by `fourdthinker synth`")

    def segment(self, clip: ClipFrames, prompts: Sequence[str]) -> list[Track]:
        truth = self.root / "ground_truth" / clip.clip_id
        tracks = json.loads((truth / "tracks.json").read_text())
        with np.load(truth / "masks.npz") as data:
            ids = data["instance_ids"]
        source = np.clip(np.round(np.asarray(clip.times) * tracks["fps"]).astype(int), 0, len(ids) - 1)
        _, height, width = clip.frames.shape[:3]
        # Nearest-neighbour resize by index maps at pixel centres.
        rows = np.minimum(((np.arange(height) + 0.5) * ids.shape[1] / height).astype(int), ids.shape[1] - 1)
        cols = np.minimum(((np.arange(width) + 0.5) * ids.shape[2] / width).astype(int), ids.shape[2] - 1)
        frames = ids[source][:, rows][:, :, cols]
        by_name = {o["name"]: o["id"] for o in tracks["objects"]}
        result = []
        for prompt in prompts:
            if prompt not in by_name:
                result.append(Track(prompt, [None] * len(source), 0.0))
                continue
            masks = frames == by_name[prompt]
            result.append(Track(prompt, [m if m.any() else None for m in masks], 1.0))
        return result


def build_segmenter(cfg: SegmenterConfig, input_root: str = "") -> Segmenter:
    """The configured backend, loaded (model weights included): call once per actor."""
    if cfg.backend == "ground_truth":
        return GroundTruthSegmenter(cfg.world_root or input_root)
    if cfg.backend == "transformers":
        return TransformersSam3Segmenter(cfg)
    if cfg.backend == "sam3":
        return Sam3PackageSegmenter(cfg)
    raise ValueError(f"segmenter.backend={cfg.backend!r}: use sam3, transformers or ground_truth")


def save_mask(mask: np.ndarray, path: Path) -> None:
    """A boolean mask as a 1-bit PNG (a few hundred bytes for a blob)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=bool)).save(path, optimize=True)


def keep_objects(tracks: Sequence[Track], min_visible_fraction: float, max_objects: int) -> list[Track]:
    """Tracks found in at least `min_visible_fraction` of the frames, best scores first, at most
    `max_objects`; prompts that found nothing or flicker in and out are not objects of the clip."""
    found = [t for t in tracks if t.masks and
             sum(m is not None for m in t.masks) >= min_visible_fraction * len(t.masks)]
    return sorted(found, key=lambda t: -t.score)[:max_objects]


def track_record(track: Track, mask_dir: Path, height: int, width: int) -> dict:
    """Write a track's masks and return its JSON-able summary (paths, boxes, areas, centroids)."""
    stacked = track.stacked(height, width)
    centroids, areas, boxes = mask_statistics(stacked)
    paths: list[str | None] = []
    for frame, mask in enumerate(track.masks):
        if mask is None:
            paths.append(None)
            continue
        path = mask_dir / f"frame_{frame:04d}.png"
        save_mask(mask, path)
        paths.append(str(path))
    def listed(array: np.ndarray) -> list:
        return [None if not np.isfinite(row).all() else [float(v) for v in row] for row in array]
    return {"name": track.prompt, "score": float(track.score), "mask_paths": paths,
            "boxes": listed(boxes), "centroids": listed(centroids), "areas": areas.tolist()}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_") or "object"


class SegmentClips:
    """Ray Data callable class: one segmenter per actor, loaded in `__init__`.

    Input batches are pandas frames of clip rows (frames on disk); output rows gain a `tracks` column
    holding the JSON list of kept tracks (see `track_record`). Dropped rows pass through untouched.
    """

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        self.segmenter = build_segmenter(cfg.segmenter, cfg.input_root)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.copy()
        batch["tracks"] = [self._segment_row(row) if row["status"] == STATUS_OK else "[]"
                           for row in batch.to_dict("records")]
        return batch

    def _segment_row(self, row: dict) -> str:
        frames = load_frame_arrays(list(row["frame_paths"]))
        clip = ClipFrames(row["clip_id"], frames, np.asarray(row["frame_times"], dtype=np.float64))
        tracks = self.segmenter.segment(clip, self.cfg.concepts)
        kept = keep_objects(tracks, self.cfg.min_visible_fraction, self.cfg.max_objects)
        clip_dir = Path(self.cfg.output_dir) / MASKS_DIR / row["clip_id"]
        height, width = frames.shape[1:3]
        records = [track_record(t, clip_dir / f"{i:02d}_{_slug(t.prompt)}", height, width)
                   for i, t in enumerate(kept)]
        return json.dumps(records)


class TransformersSam3Segmenter:
    def __init__(self, cfg: SegmenterConfig):
        raise NotImplementedError


class Sam3PackageSegmenter:
    def __init__(self, cfg: SegmenterConfig):
        raise NotImplementedError
