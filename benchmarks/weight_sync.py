"""Learner -> rollout weight sync: seconds per sync and bytes/s, through the real path, with a check
that the engines really run the learner's new weights.

A learner group (DeepSpeed, 1 rank) and vLLM rollout actors (latent decoding on). First the check:
the rollout samples two prompts (one with a clip, both with latent blocks), the learner takes one
optimizer step at a large learning rate, and the rollout-vs-learner log-prob gap is measured on
fresh samples before the sync (stale engine: large) and after it (small: bf16 noise on a GPU).
Then `--repeats` timed syncs, and for the collective transport a plain broadcast of the same bytes
over the same group (the interconnect's figure; the sync's share of it is what packing and
loading cost). Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/weight_sync.py                                      # CPU: tiny shape, gloo
    python benchmarks/weight_sync.py --model /tmp/qwen3b                  # 2 GPUs: NCCL, GPU0 -> GPU1
    python benchmarks/weight_sync.py --model /tmp/qwen3b --colocate       # 1 GPU: CUDA IPC
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from report import write_result  # benchmarks/report.py (scripts run from benchmarks/)

from fourdthinker.weight_sync import TRANSPORTS, resolve_transport


def _prompts():
    import numpy as np
    from PIL import Image

    from fourdthinker.prompts import question_prompt

    rng = np.random.default_rng(0)
    clip = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(4)]
    return [(question_prompt("Which way does the camera pan?", {"A": "Left", "B": "Right"}), clip),
            (question_prompt("Is the cube moving toward the camera?"), None)]


def _gap(ray, learner, rollout, prompts, model_config, seed: int):
    """Max |learner - rollout| log-prob over the text tokens of fresh samples, and their rows."""
    import torch

    from fourdthinker.generation import GenerationRequest, SamplingConfig
    from fourdthinker.grpo import build_train_rows, rows_logprob_gap, vision_placeholder_ids
    from fourdthinker.tokens import LatentIds

    requests = [GenerationRequest(text, frames=frames, force_latent_steps=[1]) for text, frames in prompts]
    sampling = SamplingConfig(n=2, max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)
    groups = ray.get(rollout.generate.remote(requests, sampling))
    rows = build_train_rows(groups, torch.tensor([1.0, -1.0, 1.0, -1.0]), model_config.text_config.hidden_size,
                            model_config.text_config.pad_token_id, vision_placeholder_ids(model_config))
    return rows_logprob_gap(learner.logprobs(prompts, rows), rows, LatentIds.from_config(model_config))[0], rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="existing model dir (default: build a random one of --hidden/--layers)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=1)
    parser.add_argument("--transport", default="auto", choices=TRANSPORTS)
    parser.add_argument("--colocate", action="store_true", help="learner and rollouts share one GPU")
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-lr", type=float, default=1e-4, help="learning rate of the one check step")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/weight_sync-<device>.json)")
    args = parser.parse_args()

    import ray
    import torch
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from transformers import AutoConfig

    from fourdthinker.actors.learner import LearnerGroup
    from fourdthinker.actors.rollout import rollout_actor_class
    from fourdthinker.grpo_config import GrpoConfig
    from fourdthinker.tiny_model import TinyShape, build_tiny_model

    on_gpu = torch.cuda.is_available()
    gpu_count = torch.cuda.device_count()
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or str(build_tiny_model(
        Path(tmp.name) / "model", shape=TinyShape(hidden_size=args.hidden, num_layers=args.layers,
                                                  num_heads=args.hidden // 64, num_kv_heads=1,
                                                  intermediate_size=4 * args.hidden)))
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                       **({} if on_gpu else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})}})
    engine = {"max_model_len": 4096, "max_num_seqs": 8, "enforce_eager": True}
    if on_gpu:
        engine["gpu_memory_utilization"] = args.gpu_memory_utilization
    share = 0.5 if args.colocate else 1.0
    gpus = share if on_gpu else 0.0
    pg = placement_group([{"CPU": 2, **({"GPU": 1} if on_gpu else {})}]) if args.colocate else None
    if pg is not None:
        ray.get(pg.ready())
    placement = {} if pg is None else {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, 0)}
    rollouts = [rollout_actor_class(num_gpus=gpus, num_cpus=0.5).options(**placement).remote(model_dir, engine)
                for _ in range(args.rollouts)]
    ray.get([r.health.remote() for r in rollouts])  # engines first: vLLM sizes its cache on free memory

    cfg = GrpoConfig(model_dir=model_dir, train_jsonl="-", prompts_per_step=2, num_generations=2, beta=0.0,
                     num_learners=1, micro_batch_size=1, lr=args.check_lr, learner_gpus=gpus, learner_cpus=0.5,
                     gradient_checkpointing=True, weight_bucket_mb=args.bucket_mb, weight_sync=args.transport,
                     colocate=args.colocate)
    cfg.validate()
    learner = LearnerGroup(cfg, placement_group=pg, bundle_indices=[0] if pg is not None else None)
    params = learner.info[0]["trainable_params"]
    model_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    prompts = _prompts()

    # The check: one large step makes the engine stale; the sync must close the gap.
    _, rows = _gap(ray, learner, rollouts[0], prompts, model_config, seed=1)
    learner.train_step(prompts, rows)
    gap_stale, _ = _gap(ray, learner, rollouts[0], prompts, model_config, seed=2)
    first = learner.broadcast_weights(rollouts, 1)  # also forms the group (collective)
    gap_synced = max(_gap(ray, learner, r, prompts, model_config, seed=3)[0] for r in rollouts)

    runs = [learner.broadcast_weights(rollouts, version) for version in range(2, args.repeats + 2)]
    seconds = [r["sync_s"] for r in runs]
    nbytes = int(runs[0]["sync_bytes"])
    median = statistics.median(seconds)
    transport = resolve_transport(args.transport, torch.device("cuda" if on_gpu else "cpu"), args.colocate)
    probe = None
    if transport == "collective":
        probe = statistics.median(learner.probe_weight_sync(rollouts, nbytes) for _ in range(args.repeats))
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    backend = {"collective": "nccl" if on_gpu else "gloo"}.get(transport, transport)
    result = {"device": device, "gpus_visible": gpu_count, "transport": transport, "backend": backend,
              "colocated": args.colocate, "model": model_dir if args.model else f"hidden {args.hidden} x {args.layers}",
              "parameters": params, "bytes": nbytes, "buckets": int(runs[0]["sync_buckets"]),
              "bucket_mb": args.bucket_mb, "rollouts": args.rollouts, "first_sync_s": first["sync_s"],
              "seconds": seconds, "median_s": median, "bytes_per_s": nbytes / median,
              # the slowest receiver: buckets in (transfer + layerwise load), then reload end + cache resets
              "receiver_load_s": statistics.median(r["sync_receiver_load_s"] for r in runs),
              "receiver_finish_s": statistics.median(r["sync_receiver_finish_s"] for r in runs),
              # median seconds per phase: sender/* on learner rank 0, receiver/* on the slowest engine
              # (*_worker_s inside the vLLM worker; the rest of an RPC's time is the RPC's own)
              "phases": {k.removeprefix("sync/"): statistics.median(r[k] for r in runs)
                         for k in runs[0] if k.startswith("sync/")},
              "plain_broadcast_s": probe, "plain_broadcast_bytes_per_s": nbytes / probe if probe else None,
              "share_of_plain_broadcast": probe / median if probe else None,
              "logprob_gap_stale": gap_stale, "logprob_gap_synced": gap_synced}
    print(f"\nweight sync on {device} ({backend}{', colocated' if args.colocate else ''}): "
          f"{params / 1e6:.1f}M parameters, {nbytes / 2**30:.2f} GiB, {result['buckets']} buckets "
          f"-> {args.rollouts} rollout actor(s)")
    print(f"{'median s':>9} {'load s':>7} {'finish s':>8} {'first s':>8} {'GB/s':>7} {'plain GB/s':>11} "
          f"{'gap stale':>10} {'gap synced':>11}")
    plain = f"{nbytes / probe / 1e9:>11.2f}" if probe else f"{'-':>11}"
    print(f"{median:>9.3f} {result['receiver_load_s']:>7.3f} {result['receiver_finish_s']:>8.3f} "
          f"{first['sync_s']:>8.3f} {nbytes / median / 1e9:>7.2f} {plain} {gap_stale:>10.4f} {gap_synced:>11.4f}")
    print("phases (median s): " + "  ".join(f"{k} {v:.4f}" for k, v in result["phases"].items()))
    write_result("weight_sync", device, result, args.out)
    learner.shutdown()
    ray.shutdown()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
