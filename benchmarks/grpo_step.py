"""Time split of GRPO steps (generate / reward / train / sync) through the real driver.

Runs `pipelines/grpo.py`'s loop on a tiny random model and a synthetic 4DRL set (random 56x56
two-frame clips), then reports the per-phase seconds of the steps after the first (warm-up).
Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/grpo_step.py                               # CPU: configs/tiny/grpo.yaml
    python benchmarks/grpo_step.py --config configs/3b/grpo.yaml model_dir=... train_jsonl=...
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
from pathlib import Path

from report import write_result  # benchmarks/report.py (scripts run from benchmarks/)

REPO = Path(__file__).resolve().parents[1]
PHASES = ("time/generate", "time/reward", "time/train", "time/wake", "time/sync", "time/step")


def _synthetic_jsonl(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        frames = []
        for j in range(2):
            path = root / f"clip{i}_{j}.png"
            Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(path)
            frames.append(str(path))
        lines.append(json.dumps({"Question": f"Where does object {i} move?", "A": "Left", "B": "Right",
                                 "C": "Up", "D": "Down", "Correct": "ABCD"[i % 4], "frame_paths": frames}))
    path = root / "4drl.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/tiny/grpo.yaml"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/grpo_step-<device>.json)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()

    import torch

    from fourdthinker.config import load_config
    from fourdthinker.grpo_config import GrpoConfig
    from fourdthinker.tiny_model import build_tiny_model

    spec = importlib.util.spec_from_file_location("grpo_pipeline", REPO / "pipelines" / "grpo.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        defaults = [f"model_dir={build_tiny_model(root / 'model')}", f"train_jsonl={_synthetic_jsonl(root, 8)}"]
        cfg = load_config(GrpoConfig, args.config, defaults + [f"output_dir={root / 'runs'}", f"max_steps={args.steps}",
                                                               "save_checkpoints=false", "progress_bar=false",
                                                               "tensorboard=false"] + args.overrides)
        import ray

        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        pipeline.train(cfg)
        ray.shutdown()
        steps = [json.loads(line) for line in (root / "runs" / cfg.run_name / "metrics.jsonl").read_text().splitlines()]
    warm = steps[1:] or steps
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": device, "steps": len(warm), "prompts_per_step": cfg.prompts_per_step,
              "num_generations": cfg.num_generations, "max_tokens": cfg.max_tokens,
              "num_learners": cfg.num_learners, "num_rollouts": cfg.num_rollouts,
              "mean_completion_length": statistics.mean(s["completion_length/mean"] for s in warm),
              "weight_sync": cfg.weight_sync, "colocate": cfg.colocate, "micro_batch_size": cfg.micro_batch_size,
              "sync_phases": {k.removeprefix("sync/"): statistics.mean(s.get(k, float("nan")) for s in warm)
                              for k in warm[-1] if k.startswith("sync/")},
              "sync_bytes": warm[-1].get("sync_bytes"),
              "sync_bytes_per_s": statistics.mean([s["sync_bytes"] / s["sync_s"] for s in warm if s.get("sync_s")]
                                                  or [float("nan")]),
              # steps after the first run on synced weights: their gap is the sync's policy consistency
              "logprob_gap_max": max(s["logprob_gap/max"] for s in warm),
              "logprob_gap_mean": statistics.mean(s["logprob_gap/mean"] for s in warm),
              **{p: statistics.mean(s[p] for s in warm) for p in PHASES}}
    print(f"\nGRPO step on {device}: {cfg.prompts_per_step} prompts x {cfg.num_generations} completions, "
          f"{cfg.num_rollouts} rollout actors, {cfg.num_learners} learner ranks (mean of {len(warm)} warm steps)")
    print("".join(f"{p.removeprefix('time/'):>10}" for p in PHASES) + "   (seconds)")
    print("".join(f"{result[p]:>10.3f}" for p in PHASES))
    print(f"sync ({cfg.weight_sync}): {result['sync_bytes_per_s'] / 1e9:.2f} GB/s; rollout-vs-learner log-prob gap "
          f"after sync: max {result['logprob_gap_max']:.4f}, mean {result['logprob_gap_mean']:.5f}")
    write_result("grpo_step", device, result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
