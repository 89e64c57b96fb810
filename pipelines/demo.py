"""The main job end to end on the embedded default: tiny model, synthetic videos, local Ray.

Each stage that exists runs in order and prints what it produced:
  1. tiny model (offline Qwen2.5-VL with latent tokens)   2. synthetic 4D world (SpatialVID layout)
Later stages (preprocess, DIFT, 4DRL, evaluate) are appended here as they land.

    python pipelines/demo.py --out runs/demo [--videos 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def _stage(name: str):
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"   {what}  ({time.perf_counter() - t0:.1f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="working directory (replaced)")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from fourdthinker.data.synth import SynthConfig, build_world
    from fourdthinker.tiny_model import build_tiny_model, weights_digest
    from fourdthinker.tokens import LatentIds

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    t0 = _stage("1/2 tiny model")
    model_dir = build_tiny_model(out / "tiny-model", seed=args.seed)
    from transformers import AutoConfig

    ids = LatentIds.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    _done(t0, f"{model_dir}: latent ids pad/start/end = {ids.pad}/{ids.start}/{ids.end}, "
              f"latent_size {ids.latent_size}, weights sha256 {weights_digest(model_dir)[:12]}")

    t0 = _stage("2/2 synthetic 4D world")
    summary = build_world(out / "world", SynthConfig(videos=args.videos, seed=args.seed))
    _done(t0, str(summary))
    print(f"\ndemo finished: outputs under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
