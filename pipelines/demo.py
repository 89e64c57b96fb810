"""The main job end to end on the embedded default: tiny model, synthetic videos, local Ray.

Every stage that exists runs in order, on the previous stage's files, and prints what it produced:
  1. tiny model     an offline random Qwen2.5-VL with the latent tokens
  2. synth          a synthetic 4D world in the SpatialVID layout (+ DSR-format benchmark)
  3. preprocess     Ray Data: frames, masks, camera/object labels, QA with mental images -> JSONL
  4. dift           Ray Train + DeepSpeed ZeRO-2 on the DIFT JSONL -> HF checkpoint
  5. grpo           vLLM rollout actors + DeepSpeed learners on the 4DRL JSONL -> HF checkpoint

    python pipelines/demo.py --out runs/demo [--videos 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = 5


def _stage(i: int, name: str) -> float:
    print(f"\n== {i}/{STAGES} {name}", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"   {what}  ({time.perf_counter() - t0:.1f} s)", flush=True)


def _jsonl_rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="working directory (replaced)")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "pipelines"))
    import dift as dift_stage
    import grpo as grpo_stage
    import preprocess as preprocess_stage
    from transformers import AutoConfig

    from fourdthinker.data.synth import SynthConfig, build_world
    from fourdthinker.tiny_model import build_tiny_model, weights_digest
    from fourdthinker.tokens import LatentIds

    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    t0 = _stage(1, "tiny model")
    model_dir = build_tiny_model(out / "tiny-model", seed=args.seed)
    ids = LatentIds.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    _done(t0, f"{model_dir}: latent ids pad/start/end = {ids.pad}/{ids.start}/{ids.end}, "
              f"latent_size {ids.latent_size}, weights sha256 {weights_digest(model_dir)[:12]}")

    t0 = _stage(2, "synthetic 4D world")
    world = out / "world"
    _done(t0, build_world(world, SynthConfig(videos=args.videos, seed=args.seed)))

    t0 = _stage(3, "preprocess (Ray Data)")
    prep = out / "preprocess"
    rc = preprocess_stage.main(["--config", str(ROOT / "configs/tiny/preprocess.yaml"),
                                f"input_root={world}", f"output_dir={prep}", f"seed={args.seed}"])
    if rc != 0:
        return rc
    _done(t0, f"{_jsonl_rows(prep / 'dift.jsonl')} DIFT samples, {_jsonl_rows(prep / 'rl.jsonl')} 4DRL prompts "
              f"-> {prep}")

    t0 = _stage(4, "DIFT (Ray Train + DeepSpeed)")
    dift_out = out / "dift"
    rc = dift_stage.main(["--config", str(ROOT / "configs/tiny/dift.yaml"), f"model_dir={model_dir}",
                          f"train_jsonl={prep / 'dift.jsonl'}", f"output_dir={dift_out}", "max_steps=6",
                          "cpus_per_worker=0.5", "progress_bar=false"])
    if rc != 0:
        return rc
    log = [json.loads(line) for line in (dift_out / "dift-tiny" / "metrics.jsonl").read_text().splitlines()]
    _done(t0, f"{len(log)} steps, loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}, latent cos "
              f"{log[0]['cos']:.3f} -> {log[-1]['cos']:.3f}; checkpoint {dift_out / 'final'}")

    t0 = _stage(5, "4DRL (GRPO: vLLM rollout actors + DeepSpeed learners)")
    grpo_out = out / "grpo"
    rc = grpo_stage.main(["--config", str(ROOT / "configs/tiny/grpo.yaml"), f"model_dir={dift_out / 'final'}",
                          f"train_jsonl={prep / 'rl.jsonl'}", f"output_dir={grpo_out}", "max_steps=2"])
    if rc != 0:
        return rc
    run = grpo_out / "grpo-tiny"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    _done(t0, f"{len(steps)} steps, reward {steps[-1]['reward/total/mean']:.3f}, rollout-vs-learner log-prob gap "
              f"{max(m['logprob_gap/max'] for m in steps):.1e}; checkpoint {run / 'final'}")
    print(f"\ndemo finished: outputs under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
