"""Learner -> rollout weight sync: seconds per sync and bytes/s, through the real path.

A learner group (DeepSpeed, 1 rank) pushes its full parameters with `broadcast_weights`
(`pack_buckets` -> one `ray.put` -> `update_weights` on every vLLM rollout actor, layerwise reload)
several times; the first push is a warm-up. The model is a random Qwen2.5-VL of the given shape
(`--hidden`, `--layers`; head size 64), or an existing checkpoint (`--model`). Prints a table and
writes JSON to benchmarks/results/.

    python benchmarks/weight_sync.py                               # CPU: tiny shape, 2 rollout actors
    python benchmarks/weight_sync.py --hidden 1024 --layers 8 --rollouts 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from report import write_result  # benchmarks/report.py (scripts run from benchmarks/)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="existing model dir (default: build a random one of --hidden/--layers)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/weight_sync-<device>.json)")
    args = parser.parse_args()

    import ray
    import torch

    from fourdthinker.actors.learner import LearnerGroup
    from fourdthinker.actors.rollout import rollout_actor_class
    from fourdthinker.grpo_config import GrpoConfig
    from fourdthinker.tiny_model import TinyShape, build_tiny_model

    on_gpu = torch.cuda.is_available()
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or str(build_tiny_model(
        Path(tmp.name) / "model", shape=TinyShape(hidden_size=args.hidden, num_layers=args.layers,
                                                  num_heads=args.hidden // 64, num_kv_heads=1,
                                                  intermediate_size=4 * args.hidden)))
    gpus = 1.0 if on_gpu else 0.0
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                       **({} if on_gpu else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})}})
    cfg = GrpoConfig(model_dir=model_dir, train_jsonl="-", prompts_per_step=1, num_generations=2, beta=0.0,
                     num_learners=1, learner_gpus=gpus, learner_cpus=0.25 if not on_gpu else 1,
                     gradient_checkpointing=False, weight_bucket_mb=args.bucket_mb)
    cfg.validate()
    rollouts = [rollout_actor_class(num_gpus=gpus, num_cpus=0.25 if not on_gpu else 1).remote(
        model_dir, {"max_model_len": 1024, "max_num_seqs": 4}) for _ in range(args.rollouts)]
    learner = LearnerGroup(cfg)
    params = learner.info[0]["trainable_params"]
    runs = [learner.broadcast_weights(rollouts, version) for version in range(1, args.repeats + 2)][1:]
    seconds = [r["sync_s"] for r in runs]
    nbytes = runs[0]["sync_bytes"]
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    result = {"device": device, "transport": "ray object store", "parameters": params, "bytes": nbytes,
              "buckets": runs[0]["sync_buckets"], "rollouts": args.rollouts, "seconds": seconds,
              "median_s": statistics.median(seconds),
              "bytes_per_s_per_rollout": nbytes / statistics.median(seconds) * args.rollouts,
              "hidden": args.hidden, "layers": args.layers}
    print(f"\nweight sync on {device}: {params / 1e6:.1f}M parameters, {nbytes / 2**20:.1f} MiB, "
          f"{int(result['buckets'])} buckets -> {args.rollouts} rollout actors")
    print(f"{'median s':>9} {'min s':>7} {'MiB/s delivered':>16}")
    print(f"{result['median_s']:>9.3f} {min(seconds):>7.3f} {result['bytes_per_s_per_rollout'] / 2**20:>16.1f}")
    write_result("weight_sync", device, result, args.out)
    learner.shutdown()
    ray.shutdown()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
