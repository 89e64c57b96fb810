"""DSR evaluation of several checkpoints: which questions still need an answer, the rows the Ray plan
carries, the per-sample results kept on disk as they finish (resume), and each model's outputs.

Layout of a run directory (`EvaluateConfig.output_dir`):

    <name>/shards/*.jsonl           per-sample results, one file per engine batch, written whole
    <name>/dsr_eval.jsonl           per evaluated question (the reference's keys + options, error)
    <name>/dsr_eval_summary.json    the reference's summary schema (`dsr.score`)
    <name>/dsr_eval_skipped.jsonl   per skipped question: its reason
    comparison.md, comparison.png   all models (and the published runs) side by side
    run.json                        what this run did: models, decodes, generations, times

A sample is keyed by its benchmark row and content (`sample_key`) and belongs to a model by its
results directory; a shard record of another checkpoint path or engine under the same name is not
reused. Skips are not stored: they are decided again on every run (a video may have been fixed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fourdthinker.atomic import atomic_write, atomic_write_json
from fourdthinker.dsr import DsrItem, DsrRecord, item_prompt, read_benchmark_rows, score, video_path, write_results
from fourdthinker.errors import UsageError
from fourdthinker.eval_config import EvaluateConfig, ModelSpec
from fourdthinker.rewards import extract_choice

logger = logging.getLogger(__name__)

RESULT_STEM = "dsr_eval"
SHARDS_DIR = "shards"
RUN_FILE = "run.json"


def sample_key(item: DsrItem) -> str:
    """A question's identity across runs: its row and everything the model sees of it."""
    text = json.dumps([item.index, item.video_id, item.question, list(item.options)], ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class Benchmark:
    """The questions of one evaluation, with the rows that cannot be evaluated and why."""

    def __init__(self, cfg: EvaluateConfig):
        rows = read_benchmark_rows(cfg.benchmark)
        if cfg.limit:
            rows = rows[: cfg.limit]
        self.video_root = cfg.videos
        self.items = [item for item, _ in rows]
        self.keys = [sample_key(item) for item in self.items]
        self.skip_reasons: dict[str, str] = {}
        for key, (item, reason) in zip(self.keys, rows):
            if reason:
                self.skip_reasons[key] = reason
            elif not video_path(item, self.video_root).is_file():
                self.skip_reasons[key] = f"video missing: {video_path(item, self.video_root)}"

    def evaluable(self) -> list[tuple[str, DsrItem]]:
        return [(k, item) for k, item in zip(self.keys, self.items) if k not in self.skip_reasons]

    def sample_row(self, key: str, item: DsrItem) -> dict[str, Any]:
        """What the plan carries of a question (the frames join it after decoding)."""
        return {"key": key, "index": item.index, "video_id": item.video_id, "prompt": item_prompt(item),
                "answer": item.answer, "video_path": str(video_path(item, self.video_root))}


# ------------------------------------------------------------------------------------ plan rows

def video_rows(samples_by_video: Mapping[str, Sequence[dict]]) -> list[dict[str, Any]]:
    """One row per video to decode: the questions of a video are grouped so it is decoded once."""
    return [{"video_id": video_id, "video_path": samples[0]["video_path"]}
            for video_id, samples in samples_by_video.items()]


def decode_video_row(row: dict[str, Any], max_frames: int, max_pixels: int) -> dict[str, Any]:
    """A video row with its clip decoded by the one video policy (uint8 bytes + shape, which Arrow
    carries as plain columns whatever the clip's size) or the reason it cannot be; `decode_id` is
    unique per decode call, so the results show how often each video was decoded."""
    from fourdthinker.data.video import VIDEO_FPS, decode_video

    out = {**row, "decode_id": uuid.uuid4().hex, "decode_error": "", "frames": b"", "frames_shape": [0]}
    try:
        frames = decode_video(row["video_path"], VIDEO_FPS, max_frames, max_pixels)
    except Exception as err:  # noqa: BLE001 - an undecodable video skips its questions, never the run
        out["decode_error"] = f"video undecodable: {err}"
        return out
    array = np.stack([np.asarray(frame, dtype=np.uint8) for frame in frames])
    out["frames"], out["frames_shape"] = array.tobytes(), list(array.shape)
    return out


def samples_of_video(row: dict[str, Any], samples_by_video: Mapping[str, Sequence[dict]]) -> list[dict]:
    """`flat_map`: a decoded video -> its pending questions, each carrying the frames (none when the
    video failed: its questions are skipped by the driver)."""
    if row["decode_error"]:
        return []
    shared = {k: row[k] for k in ("frames", "frames_shape", "decode_id")}
    return [{**sample, **shared} for sample in samples_by_video.get(row["video_id"], ())]


# --------------------------------------------------------------------------------- shards (resume)

def model_dir(output_dir: str | Path, model: ModelSpec) -> Path:
    return Path(output_dir) / model.name


def shard_record(row: Mapping[str, Any], answer, model: ModelSpec, engine: str) -> dict[str, Any]:
    return {"key": row["key"], "index": int(row["index"]), "video_id": row["video_id"],
            "model_path": model.path, "engine": engine,
            "text": answer.text, "raw": answer.marked, "pred": extract_choice(answer.text),
            "error": answer.error, "num_tokens": answer.num_tokens,
            "num_latent_blocks": answer.num_latent_blocks, "decode_id": row["decode_id"]}


def write_shard(output_dir: str | Path, model: ModelSpec, records: Sequence[Mapping[str, Any]]) -> Path:
    """One engine batch's results, whole or not at all (a killed run leaves only complete shards)."""
    path = model_dir(output_dir, model) / SHARDS_DIR / f"{uuid.uuid4().hex}.jsonl"
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def finished_records(output_dir: str | Path, model: ModelSpec, engine: str) -> dict[str, dict[str, Any]]:
    """The stored results of `model` by sample key (results of another checkpoint path or engine
    under the same name are ignored, with a warning)."""
    shards = sorted((model_dir(output_dir, model) / SHARDS_DIR).glob("*.jsonl"))
    found, foreign = {}, 0
    for shard in shards:
        for line in shard.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record["model_path"] != model.path or record["engine"] != engine:
                foreign += 1
                continue
            found[record["key"]] = record
    if foreign:
        logger.warning("%s: %d stored results are of another checkpoint or engine; they are not reused",
                       model_dir(output_dir, model), foreign)
    return found


# ----------------------------------------------------------------------------------------- results

def model_records(bench: Benchmark, finished: Mapping[str, Mapping[str, Any]],
                  decode_errors: Mapping[str, str]) -> list[DsrRecord]:
    """Every question's record for one model, in benchmark order: its stored answer, or a skip with
    its reason (bad row, missing video, undecodable video)."""
    records = []
    for key, item in zip(bench.keys, bench.items):
        path = str(video_path(item, bench.video_root))
        reason = bench.skip_reasons.get(key) or decode_errors.get(item.video_id)
        if key in finished:
            r = finished[key]
            records.append(DsrRecord(item, path, raw=r["raw"], pred=r["pred"], error=r["error"]))
        elif reason:
            records.append(DsrRecord.skip(item, path, reason))
        else:
            raise RuntimeError(f"question {item.index} ({item.video_id}) has no result and no skip reason: "
                               "the evaluation did not finish; run it again on the same output_dir to resume")
    return records


def write_model_results(output_dir: str | Path, model: ModelSpec, records: Sequence[DsrRecord]) -> dict[str, Any]:
    summary = score(records)
    write_results(records, summary, model_dir(output_dir, model), RESULT_STEM)
    return summary


def summary_line(name: str, summary: Mapping[str, Any], generated: int) -> str:
    def pct(value):
        return "-" if value is None else f"{100 * value:.2f}%"

    return (f"{name}: accuracy {pct(summary['accuracy'])} ({summary['correct']}/{summary['eval_count']}), "
            f"macro {pct(summary['subtask_macro_avg'])}, skipped {summary['skipped']}, "
            f"answered this run {generated}")


def write_run_info(output_dir: str | Path, info: Mapping[str, Any]) -> Path:
    path = Path(output_dir) / RUN_FILE
    atomic_write_json(path, dict(info))
    return path


def check_models(cfg: EvaluateConfig) -> list[ModelSpec]:
    """The models to evaluate, failing before any work when a checkpoint dir is missing."""
    models = cfg.model_specs()
    if cfg.loads_model:
        missing = [m.path for m in models if not (Path(m.path) / "config.json").is_file()]
        if missing:
            raise UsageError(f"models: {missing} are not checkpoint directories (no config.json); "
                             "pass HF save_pretrained directories")
    return models


def group_by_video(rows: Iterable[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["video_id"], []).append(row)
    return groups
