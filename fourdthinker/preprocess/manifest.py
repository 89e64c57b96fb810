"""The stage's outputs: a result file per clip (the resume record), then DIFT/4DRL JSONL, a parquet
manifest (one row per sample or drop) and a summary with counts per label and drops per reason.

Each clip's result is written atomically under `clips/` as soon as that clip is done, so a job
killed half-way loses nothing finished; the final files are rebuilt from all clip results, so a
resumed run writes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from fourdthinker.atomic import atomic_write, atomic_write_json, atomic_write_jsonl
from fourdthinker.paths import relative_media_path
from fourdthinker.rewards import format_reward
from fourdthinker.tokens import OUTPUT_IMAGE

CLIPS_DIR = "clips"
DIFT_JSONL = "dift.jsonl"
RL_JSONL = "rl.jsonl"
MANIFEST_PARQUET = "manifest.parquet"
SUMMARY_JSON = "summary.json"

MANIFEST_COLUMNS = ("clip_id", "group", "bucket", "sample_id", "kind", "answer", "status", "reason",
                    "camera_labels", "object_labels", "video_path", "frames_dir", "image_output")
# Keys of a DIFT or 4DRL record that hold media paths (lists of paths).
_MEDIA_KEYS = ("image_input", "image_output", "frame_paths")
# A drop reason's category: the text before the first ':' (details such as paths follow it).
_REASON_HEAD = re.compile(r"^[^:]*")


def clip_result_path(output_dir: str | Path, clip_id: str) -> Path:
    return Path(output_dir) / CLIPS_DIR / f"{clip_id}.json"


def write_clip_result(output_dir: str | Path, result: dict) -> Path:
    """Record one clip as finished (processed or dropped with a reason)."""
    path = clip_result_path(output_dir, result["clip_id"])
    atomic_write_json(path, result)
    return path


def finished_clip_ids(output_dir: str | Path) -> set[str]:
    """Clip ids with a result under `output_dir` (nothing when the directory does not exist)."""
    clips = Path(output_dir) / CLIPS_DIR
    return {p.stem for p in clips.glob("*.json")} if clips.is_dir() else set()


def read_clip_results(output_dir: str | Path) -> list[dict]:
    """Every clip result under `output_dir`, ordered by clip id (so outputs do not depend on timing)."""
    clips = Path(output_dir) / CLIPS_DIR
    paths = sorted(clips.glob("*.json")) if clips.is_dir() else []
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def relative_media(record: dict, output_dir: str | Path) -> dict:
    """`record` with its media paths relative to `output_dir`, the folder of the JSONL files it goes
    into: the one rule of every JSONL the project writes and reads (fourdthinker.paths)."""
    return {k: [relative_media_path(p, output_dir) for p in v] if k in _MEDIA_KEYS else v
            for k, v in record.items()}


def dift_format_error(record: dict) -> str | None:
    """Why a DIFT record breaks the reference format, or None: one `<output_image>` per image_output,
    `<think>...</think>` followed by `<answer>...</answer>`, and non-empty inputs."""
    text = record.get("text_output", "")
    placeholders = text.count(OUTPUT_IMAGE)
    if placeholders != len(record.get("image_output", [])):
        return (f"format: {placeholders} {OUTPUT_IMAGE} placeholders but "
                f"{len(record.get('image_output', []))} image_output paths")
    if not format_reward(text, ""):
        return "format: text_output lacks <think>...</think><answer>...</answer>"
    if not record.get("image_input"):
        return "format: no image_input frames"
    if not record.get("text_input", "").strip():
        return "format: empty text_input"
    return None


def _manifest_rows(result: dict) -> list[dict]:
    base = {"clip_id": result["clip_id"], "group": result.get("group", ""), "bucket": result.get("bucket", ""),
            "sample_id": "", "kind": "", "answer": "", "status": result["status"],
            "reason": result.get("reason", ""),
            "camera_labels": json.dumps(result.get("camera_segments", [])),
            "object_labels": json.dumps(result.get("objects", [])),
            "video_path": result.get("video_path", ""), "frames_dir": result.get("frames_dir", ""),
            "image_output": "[]"}
    rows = [{**base, "sample_id": s["id"], "kind": s["kind"], "answer": s["rl"]["Correct"],
             "status": "ok", "reason": "", "image_output": json.dumps(s["dift"]["image_output"])}
            for s in result.get("samples", [])]
    rows += [{**base, "status": "dropped", "reason": reason} for reason in result.get("drops", [])]
    if result["status"] != "ok" or not rows:
        rows.append(base)
    return rows


def summarize(results: Iterable[dict]) -> dict:
    """Counts of clips, samples per kind, labels (camera, object direction/speed/distance) and drops
    per reason category."""
    results = list(results)
    kinds, camera, direction, speed, distance, drops = (Counter() for _ in range(6))
    for result in results:
        for sample in result.get("samples", []):
            kinds[sample["kind"]] += 1
        for _, _, labels in result.get("camera_segments", []):
            camera.update(labels)
        for obj in result.get("objects", []):
            direction.update([obj["direction"]] if obj.get("direction") else [])
            speed.update([obj["speed"]] if obj.get("speed") else [])
            distance.update([obj["distance"]] if obj.get("distance") else [])
        reasons = ([result["reason"]] if result["status"] != "ok" else []) + result.get("drops", [])
        drops.update(_REASON_HEAD.match(r).group(0).strip() for r in reasons)
    return {
        "clips": len(results),
        "clips_ok": sum(r["status"] == "ok" for r in results),
        "clips_dropped": sum(r["status"] != "ok" for r in results),
        "samples": sum(kinds.values()),
        "samples_per_kind": dict(sorted(kinds.items())),
        "camera_labels": dict(sorted(camera.items())),
        "object_directions": dict(sorted(direction.items())),
        "object_speeds": dict(sorted(speed.items())),
        "object_distances": dict(sorted(distance.items())),
        "drops_per_reason": dict(sorted(drops.items())),
    }


def write_outputs(output_dir: str | Path) -> dict:
    """Rebuild dift.jsonl, rl.jsonl, manifest.parquet and summary.json from every clip result."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = read_clip_results(output_dir)
    samples = [s for r in results for s in r.get("samples", [])]
    atomic_write_jsonl(output_dir / DIFT_JSONL, (s["dift"] for s in samples))
    atomic_write_jsonl(output_dir / RL_JSONL, (s["rl"] for s in samples))
    manifest = pd.DataFrame([row for r in results for row in _manifest_rows(r)], columns=list(MANIFEST_COLUMNS))
    atomic_write(output_dir / MANIFEST_PARQUET, lambda tmp: manifest.to_parquet(tmp, index=False))
    summary = summarize(results)
    atomic_write_json(output_dir / SUMMARY_JSON, summary)
    return summary


def summary_table(summary: dict) -> str:
    """The final counts as an aligned two-column text table."""
    lines = [("clips", summary["clips"]), ("  ok", summary["clips_ok"]), ("  dropped", summary["clips_dropped"]),
             ("samples", summary["samples"])]
    for title, key in (("samples", "samples_per_kind"), ("camera", "camera_labels"),
                       ("direction", "object_directions"), ("speed", "object_speeds"),
                       ("distance", "object_distances"), ("dropped", "drops_per_reason")):
        lines += [(f"  {title}: {name}", count) for name, count in summary[key].items()]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {count:>7}" for name, count in lines)
