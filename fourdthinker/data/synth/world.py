"""A whole synthetic world: every clip, the ground truth and the DSR benchmark, written whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from fourdthinker.atomic import atomic_output_dir
from fourdthinker.data.spatialvid import METADATA_CSV, ClipPaths
from fourdthinker.data.synth.benchmark import benchmark_rows, clip_questions
from fourdthinker.data.synth.clip import make_clip, write_clip
from fourdthinker.data.synth.config import SynthConfig


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:        # another filesystem or no hard links: a copy is equally valid
        shutil.copyfile(source, target)


def build_world(out: str | Path, cfg: SynthConfig, overwrite: bool = False) -> str:
    """Render `cfg.videos` clips into `out` (atomically) and return a one-line summary."""
    rows = _write_world(out, cfg, overwrite)
    kinds = len({row["type"] for row in rows})
    groups = -(-cfg.videos // cfg.videos_per_group)
    return (f"synthetic world: {cfg.videos} clips in {groups} groups ({cfg.num_frames} frames, "
            f"{cfg.width}x{cfg.height} at {cfg.fps} fps), {len(rows)} benchmark questions over "
            f"{kinds} sub-tasks -> {Path(out)}")


def _write_world(out: str | Path, cfg: SynthConfig, overwrite: bool) -> list[dict]:
    with atomic_output_dir(out, overwrite) as root:
        metadata, questions = [], []
        (root / "dsr" / "videos").mkdir(parents=True)
        for index in range(cfg.videos):
            clip = make_clip(cfg, index)
            tracks = write_clip(root, clip)
            paths = ClipPaths(root, clip.group, clip.video_id)
            _link_or_copy(paths.video, root / "dsr" / "videos" / f"{paths.video_id}.mp4")
            metadata.append({"id": paths.video_id, "video path": paths.video_path_column,
                             "group": paths.group, "num frames": clip.num_frames, "fps": cfg.fps,
                             "width": cfg.width, "height": cfg.height,
                             "duration": (clip.num_frames) / cfg.fps,
                             "camera motion": json.dumps([list(s.labels) for s in clip.segments])})
            rng = np.random.default_rng([cfg.seed, index, 1])
            questions += clip_questions(tracks, rng, cfg.questions_per_clip,
                                        first_key=index * cfg.questions_per_clip)
        pd.DataFrame(metadata).to_csv(root / METADATA_CSV, index=False)
        rows = benchmark_rows(questions, np.random.default_rng([cfg.seed, cfg.videos, 2]))
        pd.DataFrame(rows, columns=["videoID", "question", "options", "answer", "type"]).to_parquet(
            root / "dsr" / "benchmark.parquet", index=False)
        with open(root / "ground_truth" / "benchmark.jsonl", "w", encoding="utf-8") as f:
            for q, row in zip(questions, rows):
                f.write(json.dumps({**row, "subjects": list(q.subjects), "answer_text": q.answer}) + "\n")
    return rows
