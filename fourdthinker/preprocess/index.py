"""The video index: one row per clip of a SpatialVID-style root, filtered, bucketed and resumable.

Rows are plain dicts (they become Ray Data rows). A clip whose files are missing is not an error:
its row carries `status="dropped"` and a reason, so it reaches the manifest and the job goes on.
Rows are ordered by bucket (duration x resolution) so that consecutive batches hold clips of one
size class: a segmenter batch then has uniform frame shapes and similar lengths.
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path

import pandas as pd

from fourdthinker.data.spatialvid import METADATA_CSV, ClipPaths, LayoutError
from fourdthinker.errors import UsageError
from fourdthinker.preprocess.config import PreprocessConfig
from fourdthinker.preprocess.manifest import finished_clip_ids

STATUS_OK = "ok"
STATUS_DROPPED = "dropped"
_VIDEO_PATH_COLUMN = "video path"


def read_metadata(root: str | Path) -> pd.DataFrame:
    """The metadata CSV of `root`; a UsageError when it is missing or has no 'video path' column."""
    path = Path(root) / METADATA_CSV
    if not path.is_file():
        raise UsageError(f"input_root {root}: no {METADATA_CSV}; point input_root at a SpatialVID-style root")
    table = pd.read_csv(path)
    if _VIDEO_PATH_COLUMN not in table.columns:
        raise UsageError(f"{path}: no {_VIDEO_PATH_COLUMN!r} column (has {list(table.columns)})")
    return table


def bucket_of(duration_s: float, pixels: int, duration_edges: list[float], pixel_edges: list[int]) -> str:
    """"d{i}_r{j}": the duration and resolution classes a clip falls in (edges are upper-exclusive)."""
    d = bisect.bisect_right(duration_edges, duration_s) if math.isfinite(duration_s) else len(duration_edges)
    r = bisect.bisect_right(pixel_edges, pixels)
    return f"d{d}_r{r}"


def _number(value, default: float = float("nan")) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _row(root: Path, record: dict, cfg: PreprocessConfig) -> dict:
    video_path = str(record[_VIDEO_PATH_COLUMN])
    base = {"clip_id": "", "group": "", "video_path": video_path, "annotations": "", "bucket": "",
            "duration_s": float("nan"), "csv_fps": float("nan"), "width": 0, "height": 0,
            "status": STATUS_OK, "reason": ""}
    try:
        paths = ClipPaths.from_video_path(root, video_path)
    except LayoutError as err:
        return {**base, "clip_id": Path(video_path).stem or video_path, "status": STATUS_DROPPED,
                "reason": f"bad metadata row: {err}"}
    fps = _number(record.get("fps"))
    frames = _number(record.get("num frames"))
    duration = _number(record.get("duration"), frames / fps if fps > 0 else float("nan"))
    width, height = int(_number(record.get("width"), 0)), int(_number(record.get("height"), 0))
    row = {**base, "clip_id": paths.video_id, "group": paths.group, "video_path": str(paths.video),
           "annotations": str(paths.annotations), "duration_s": duration, "csv_fps": fps,
           "width": width, "height": height,
           "bucket": bucket_of(duration, width * height, cfg.duration_edges_s, cfg.resolution_edges_px)}
    if not paths.video.is_file():
        return {**row, "status": STATUS_DROPPED, "reason": f"video missing: {paths.video_path_column}"}
    if paths.video.stat().st_size == 0:
        return {**row, "status": STATUS_DROPPED, "reason": "video is empty (0 bytes)"}
    if not paths.annotations.is_dir():
        return {**row, "status": STATUS_DROPPED,
                "reason": f"annotations missing: annotations/{paths.group}/{paths.video_id}"}
    return row


def _passes_filters(row: dict, cfg: PreprocessConfig) -> bool:
    if cfg.groups and row["group"] not in cfg.groups:
        return False
    duration = row["duration_s"]
    if math.isnan(duration):  # unknown durations are checked after decode, not filtered blind
        return True
    return duration >= cfg.min_duration_s and (not cfg.max_duration_s or duration <= cfg.max_duration_s)


def build_index(cfg: PreprocessConfig) -> tuple[list[dict], dict[str, int]]:
    """Index rows still to process, in bucket order, and counts {"listed", "filtered", "finished"}.

    Clips already recorded in `cfg.output_dir` (finished or dropped) are left out: re-running the
    stage resumes where it stopped. Duplicate clip ids keep their first row.
    """
    root = Path(cfg.input_root)
    table = read_metadata(root)
    rows = [_row(root, record, cfg) for record in table.to_dict("records")]
    listed = len(rows)
    rows = [r for r in rows if _passes_filters(r, cfg)]
    filtered = listed - len(rows)
    seen: set[str] = set()
    rows = [r for r in rows if not (r["clip_id"] in seen or seen.add(r["clip_id"]))]
    rows.sort(key=lambda r: (r["bucket"], r["clip_id"]))
    if cfg.max_clips:
        rows = rows[:cfg.max_clips]
    done = finished_clip_ids(cfg.output_dir)
    todo = [r for r in rows if r["clip_id"] not in done]
    return todo, {"listed": listed, "filtered": filtered, "finished": len(rows) - len(todo)}
