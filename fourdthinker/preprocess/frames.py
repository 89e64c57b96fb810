"""Decode a clip into frame images on disk, once (the CPU stage before segmentation).

Frames are sampled at the configured fps by the project's one video policy
(`fourdthinker.data.video.decode_video`: pixel budget, sides multiples of 28), then spread evenly
down to `max_frames`, and written as `frames/{clip_id}/frame_{seq:04d}.jpg`. `frames.json`, written
last, marks the directory complete: a re-run reuses it instead of decoding again. Later stages get
paths, never pixels, so a clip's frames are in memory only inside this stage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from fourdthinker.atomic import atomic_write_json
from fourdthinker.data.video import FrameLoadError, decode_video, spread_indices
from fourdthinker.preprocess.config import PreprocessConfig
from fourdthinker.preprocess.index import STATUS_DROPPED, STATUS_OK

FRAMES_DIR = "frames"
FRAMES_INDEX = "frames.json"
JPEG_QUALITY = 95
# A decode that covers less of the clip than this share of the metadata duration is a truncated file.
MIN_DECODED_SHARE = 0.8

# The columns this stage adds; dropped rows carry them too so every Ray Data row has one schema.
FRAME_COLUMNS = {"frames_dir": "", "frame_paths": [], "frame_times": [], "frame_width": 0,
                 "frame_height": 0, "stream_fps": float("nan"), "source_width": 0, "source_height": 0}


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    duration_s: float
    width: int
    height: int


def probe_video(path: str | Path) -> VideoInfo:
    """Stream rate, duration and size from the container header (no decoding)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise FrameLoadError(path, "the file has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = float("nan")
            return VideoInfo(fps, duration, stream.width, stream.height)
    except FileNotFoundError:
        raise FrameLoadError(path, "no such file") from None
    except av.FFmpegError as err:
        raise FrameLoadError(path, f"{type(err).__name__}: {err}") from None


def _drop(row: dict, reason: str) -> dict:
    return {**FRAME_COLUMNS, **row, "status": STATUS_DROPPED, "reason": reason}


def _read_existing(frames_dir: Path) -> dict | None:
    index = frames_dir / FRAMES_INDEX
    if not index.is_file():
        return None
    record = json.loads(index.read_text())
    paths = [str(frames_dir / name) for name in record["files"]]
    return {"frames_dir": str(frames_dir), "frame_paths": paths, "frame_times": record["times"],
            "frame_width": record["width"], "frame_height": record["height"], "stream_fps": record["stream_fps"],
            "source_width": record["source_width"], "source_height": record["source_height"]}


def extract_frames(row: dict, cfg: PreprocessConfig) -> dict:
    """Ray Data `map` function: an index row -> the row plus its frames on disk, or dropped with a reason
    (unreadable/truncated video, fps metadata that disagrees with the stream, too few frames, or any
    other error decoding this clip: one clip never stops the job)."""
    if row["status"] != STATUS_OK:
        return {**FRAME_COLUMNS, **row}
    try:
        return _extract_frames(row, cfg)
    except Exception as err:
        return _drop(row, f"frame extraction failed: {type(err).__name__}: {err}")


def _extract_frames(row: dict, cfg: PreprocessConfig) -> dict:
    frames_dir = Path(cfg.output_dir) / FRAMES_DIR / row["clip_id"]
    existing = _read_existing(frames_dir)
    if existing is not None:
        return {**row, **existing}
    try:
        info = probe_video(row["video_path"])
        csv_fps = row["csv_fps"]
        if math.isfinite(csv_fps) and abs(csv_fps - info.fps) > cfg.fps_tolerance * info.fps:
            return _drop(row, f"fps mismatch: metadata says {csv_fps:g}, the stream has {info.fps:g}")
        # All samples at cfg.fps first, so each kept frame's time is known; then spread to max_frames.
        samples = decode_video(row["video_path"], fps=cfg.fps, max_frames=10**9, max_pixels=cfg.max_pixels)
    except FrameLoadError as err:
        return _drop(row, f"unreadable video: {err.reason}")
    expected = row["duration_s"] if math.isfinite(row["duration_s"]) else info.duration_s
    decoded_s = len(samples) / cfg.fps
    if math.isfinite(expected) and expected > 0 and decoded_s < MIN_DECODED_SHARE * expected:
        return _drop(row, f"truncated video: decoded {decoded_s:.2f} s of {expected:.2f} s")
    keep = spread_indices(len(samples), cfg.max_frames)
    if len(keep) < cfg.min_frames:
        return _drop(row, f"too short: {len(keep)} frames at {cfg.fps:g} fps; need >= {cfg.min_frames}")
    width, height = samples[keep[0]].size
    frames_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for seq, index in enumerate(keep):
        name = f"frame_{seq:04d}.jpg"
        samples[index].save(frames_dir / name, quality=JPEG_QUALITY)
        samples[index] = None  # release each frame once written
        names.append(name)
    record = {"files": names, "times": (np.asarray(keep, dtype=np.float64) / cfg.fps).tolist(),
              "width": width, "height": height, "stream_fps": info.fps,
              "source_width": info.width, "source_height": info.height, "video_path": row["video_path"]}
    atomic_write_json(frames_dir / FRAMES_INDEX, record)
    return {**row, **_read_existing(frames_dir)}


def load_frame_arrays(paths: list[str]) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames from disk."""
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    return np.stack(arrays)
