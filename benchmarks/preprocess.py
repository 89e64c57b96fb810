"""Frames/s of the preprocess Ray Data plan (decode tasks -> segmenter actor pool) vs a bare loop.

Both do the same work on the same clips with the same segmenter: decode each clip's frames to disk
at the configured fps, then segment every configured concept over them. The bare loop runs clip
after clip in one process; the Ray Data plan overlaps decoding with segmentation. Each writes to
its own directory so neither reuses the other's decoded frames. Prints a table and writes JSON.

    python benchmarks/preprocess.py --videos 8                                   # CPU, tiny SAM3
    python benchmarks/preprocess.py --videos 64 segmenter.backend=sam3 segmenter.num_gpus_per_actor=1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from report import write_result  # benchmarks/report.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(cfg, rows) -> tuple[int, float]:
    import numpy as np

    from fourdthinker.actors.segmenter import ClipFrames, build_segmenter
    from fourdthinker.preprocess.frames import extract_frames, load_frame_arrays

    segmenter = build_segmenter(cfg.segmenter, cfg.input_root)  # model load is not timed
    frames, t0 = 0, time.perf_counter()
    for row in rows:
        row = extract_frames(row, cfg)
        if not row.get("frame_paths"):
            continue
        arrays = load_frame_arrays(list(row["frame_paths"]))
        segmenter.segment(ClipFrames(row["clip_id"], arrays, np.asarray(row["frame_times"])), cfg.concepts)
        frames += len(arrays)
    return frames, time.perf_counter() - t0


def ray_plan(cfg, rows) -> tuple[int, float]:
    from fourdthinker.preprocess.dataset import segmented_clips

    frames, t0 = 0, time.perf_counter()  # includes the actor pool's start and model load
    for row in segmented_clips(cfg, rows).iter_rows():
        frames += len(row.get("frame_paths") or [])
    return frames, time.perf_counter() - t0


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
                frames, seconds = fn(cfg, rows)
                results[name] = {"frames": frames, "seconds": seconds, "frames_per_s": frames / seconds}
        finally:
            ray.shutdown()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    ratio = results["ray data"]["frames_per_s"] / results["bare loop"]["frames_per_s"]
    print(f"\npreprocess (decode + segment), {args.videos} synthetic clips, backend "
          f"{cfg.segmenter.backend}, device {device}")
    print(f"{'mode':<10} {'frames':>7} {'seconds':>8} {'frames/s':>9}")
    for name, r in results.items():
        print(f"{name:<10} {r['frames']:>7} {r['seconds']:>8.2f} {r['frames_per_s']:>9.1f}")
    print(f"ray data / bare loop: {ratio:.2f}")
    write_result("preprocess", device, {"videos": args.videos, "overrides": args.overrides,
                                        "results": results, "ray_over_bare": ratio}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
