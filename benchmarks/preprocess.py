"""Frames/s of the preprocess Ray Data plan (decode tasks -> segmenter actor pool) vs a bare loop.

Both do the same work on the same clips with the same segmenter: decode each clip's frames to disk
at the configured fps, then segment every configured concept over them. The bare loop runs clip
after clip in one process; the Ray Data plan overlaps decoding with segmentation. Each writes to
its own directory so neither reuses the other's decoded frames. Two rates each: end to end (the
plan's actor start and model load included; the loop's model load is not) and steady state, from
the first clip out to the last (a long job's throughput). Prints a table and writes JSON.

    python benchmarks/preprocess.py --videos 8                                   # CPU, tiny SAM3
    python benchmarks/preprocess.py --videos 64 segmenter.backend=sam3 segmenter.num_gpus_per_actor=1 \
        segmenter.max_actors=1 'concepts=[red box, blue sphere]'              # GPU (see gpu/figures.sh)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from report import write_result  # benchmarks/report.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]


def _rates(marks: list[tuple[float, int]], t0: float) -> dict:
    """End to end (start-up included) and steady state: from the first clip out to the last, over
    the frames of every clip after the first (what a long job's throughput converges to)."""
    frames = sum(n for _, n in marks)
    out = {"frames": frames, "seconds": marks[-1][0] - t0 if marks else 0.0}
    out["frames_per_s"] = frames / out["seconds"] if out["seconds"] else 0.0
    if len(marks) > 1:
        steady_s = marks[-1][0] - marks[0][0]
        out.update(steady_frames=frames - marks[0][1], steady_seconds=steady_s,
                   steady_frames_per_s=(frames - marks[0][1]) / steady_s)
    return out


def bare_loop(cfg, rows) -> dict:
    import numpy as np

    from fourdthinker.actors.segmenter import ClipFrames, build_segmenter
    from fourdthinker.preprocess.frames import extract_frames, load_frame_arrays

    segmenter = build_segmenter(cfg.segmenter, cfg.input_root)  # model load is not timed
    marks, t0 = [], time.perf_counter()
    for row in rows:
        row = extract_frames(row, cfg)
        if not row.get("frame_paths"):
            continue
        arrays = load_frame_arrays(list(row["frame_paths"]))
        segmenter.segment(ClipFrames(row["clip_id"], arrays, np.asarray(row["frame_times"])), cfg.concepts)
        marks.append((time.perf_counter(), len(arrays)))
    return _rates(marks, t0)


def ray_plan(cfg, rows) -> dict:
    from fourdthinker.actors.preprocess_plan import segmented_clips

    marks, t0 = [], time.perf_counter()  # includes the actor pool's start and model load
    for row in segmented_clips(cfg, rows).iter_rows():
        marks.append((time.perf_counter(), len(row.get("frame_paths") or [])))
    return _rates(marks, t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny/preprocess.yaml"))
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides (default: the tiny random SAM3 on CPU)")
    args = parser.parse_args()

    import ray
    import torch

    from fourdthinker.config import load_config
    from fourdthinker.data.synth import SynthConfig, build_world
    from fourdthinker.preprocess.config import PreprocessConfig
    from fourdthinker.preprocess.index import build_index

    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        build_world(world, SynthConfig(videos=args.videos, seed=0))
        overrides = [f"input_root={world}", "segmenter.backend=transformers", *args.overrides]
        results = {}
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            for name, fn in (("bare loop", bare_loop), ("ray data", ray_plan)):
                cfg = load_config(PreprocessConfig, args.config, [*overrides, f"output_dir={Path(tmp) / name}"])
                rows, _ = build_index(cfg)
                results[name] = fn(cfg, rows)
        finally:
            ray.shutdown()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    ratio = results["ray data"]["frames_per_s"] / results["bare loop"]["frames_per_s"]
    steady = (results["ray data"].get("steady_frames_per_s", 0.0)
              / results["bare loop"].get("steady_frames_per_s", float("nan")))
    print(f"\npreprocess (decode + segment), {args.videos} synthetic clips, backend "
          f"{cfg.segmenter.backend}, device {device}")
    print(f"{'mode':<10} {'frames':>7} {'seconds':>8} {'frames/s':>9} {'steady frames/s':>16}")
    for name, r in results.items():
        print(f"{name:<10} {r['frames']:>7} {r['seconds']:>8.2f} {r['frames_per_s']:>9.1f} "
              f"{r.get('steady_frames_per_s', float('nan')):>16.1f}")
    print(f"ray data / bare loop: {ratio:.2f} end to end, {steady:.2f} steady state (after the first clip out)")
    write_result("preprocess", device, {"videos": args.videos, "overrides": args.overrides,
                                        "results": results, "ray_over_bare": ratio,
                                        "ray_over_bare_steady": steady}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
