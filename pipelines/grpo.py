"""4DRL stage: GRPO with vLLM rollout actors and a DeepSpeed learner group, on Ray.

    python pipelines/grpo.py --config configs/tiny/grpo.yaml model_dir=... train_jsonl=...
    ray job submit --working-dir . -- python pipelines/grpo.py --config configs/3b/grpo.yaml

Per step: draw B prompts -> rollout actors sample G completions each (prompts sharded over the
actors) -> rewards (Ray tasks) -> group advantages -> learner step(s) -> weight sync -> metrics.
Rerunning the same run (output_dir + run_name) resumes from its latest checkpoint. Checkpoints
are <run>/checkpoints/step_NNNNNN/{hf, deepspeed, state.json}; the last HF model is copied to
<run>/final. Metrics: one JSON line per step in <run>/metrics.jsonl (and TensorBoard).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from fourdthinker.actors.rollout_group import generate_groups, score_groups
from fourdthinker.cluster import run_stage
from fourdthinker.config import to_dict
from fourdthinker.errors import StageError, UsageError
from fourdthinker.grpo_config import GrpoConfig
from fourdthinker.metrics_log import MetricsLog

log = logging.getLogger("grpo")

STATE_FILE = "state.json"
CHECKPOINT_PREFIX = "step_"


# -- checkpoints -------------------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (its state file is written last)."""
    done = sorted(p.parent for p in (run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*/{STATE_FILE}"))
    return done[-1] if done else None


def finished_step(run_dir: Path) -> int:
    """The step of the run's latest complete checkpoint (0 without one)."""
    last = latest_checkpoint(run_dir)
    return json.loads((last / STATE_FILE).read_text())["step"] if last is not None else 0


def save_checkpoint(learner, run_dir: Path, step: int, cfg: GrpoConfig) -> Path:
    """Learner state into a temp dir, then renamed: a crash mid-save never leaves a checkpoint that
    looks complete, and a skipped (non-finite) step never changed the weights it holds."""
    root = run_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp_{CHECKPOINT_PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    learner.save_checkpoint(tmp)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "config": to_dict(cfg)}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p.parent for p in root.glob(f"{CHECKPOINT_PREFIX}*/{STATE_FILE}"))[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- placement ---------------------------------------------------------------------------------------
def _bundle(cpus: float, gpus: float, named: dict[str, float]) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {}), **named}


def placement_bundles(cfg: GrpoConfig) -> dict[str, list[dict[str, float]]]:
    """The placement-group bundles the run asks for: "rollout" and "learner" (separate groups), or one
    "colocated" group whose bundle i holds rollout i and learner rank i on one GPU."""
    if cfg.colocate:
        gpus = 1.0 if cfg.rollout_gpus + cfg.learner_gpus > 0 else 0.0
        named = {k: cfg.rollout_resources.get(k, 0) + cfg.learner_resources.get(k, 0)
                 for k in {**cfg.rollout_resources, **cfg.learner_resources}}
        return {"colocated": [_bundle(cfg.rollout_cpus + cfg.learner_cpus, gpus, named)] * cfg.num_learners}
    return {"rollout": [_bundle(cfg.rollout_cpus, cfg.rollout_gpus, cfg.rollout_resources)] * cfg.num_rollouts,
            "learner": [_bundle(cfg.learner_cpus, cfg.learner_gpus, cfg.learner_resources)] * cfg.num_learners}


def build_actors(cfg: GrpoConfig):
    """Placement groups, rollout actors and the learner group.

    Colocated: bundle i holds rollout i and learner rank i on one GPU; the engine sleeps while the
    learner trains. Otherwise rollouts and learners get their own groups (their own GPUs).
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from fourdthinker.actors.learner import LearnerGroup
    from fourdthinker.actors.rollout import rollout_actor_class

    groups = {name: placement_group(bundles, strategy="PACK") for name, bundles in placement_bundles(cfg).items()}
    rollout_pg, learner_pg = (groups["colocated"],) * 2 if cfg.colocate else (groups["rollout"], groups["learner"])
    ray.get([rollout_pg.ready(), learner_pg.ready()])

    engine = dict(cfg.engine)
    if cfg.colocate and cfg.rollout_gpus > 0:
        engine.setdefault("enable_sleep_mode", True)
    rollout_cls = rollout_actor_class(num_gpus=cfg.rollout_gpus, num_cpus=cfg.rollout_cpus)
    rollouts = [rollout_cls.options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(rollout_pg, placement_group_bundle_index=i),
        runtime_env={"env_vars": dict(cfg.rollout_env)}).remote(cfg.model_dir, engine)
        for i in range(cfg.num_rollouts)]
    learner = LearnerGroup(cfg, placement_group=learner_pg)
    return rollouts, learner, list(groups.values())


# -- the run -----------------------------------------------------------------------------------------
def train(cfg: GrpoConfig) -> dict[str, float]:
    """Run (or resume) the GRPO stage described by `cfg`; returns the last step's metrics."""
    import ray
    from transformers import AutoConfig, AutoTokenizer

    from fourdthinker.data.dift_dataset import require_usable
    from fourdthinker.data.rl_dataset import PromptOrder, read_rl_jsonl
    from fourdthinker.generation import Completion, GenerationRequest, SamplingConfig
    from fourdthinker.grpo import build_train_rows, group_advantages, rollout_metrics, vision_placeholder_ids
    from fourdthinker.tokens import LatentIds

    prompts, skipped = read_rl_jsonl(cfg.train_jsonl)
    require_usable(cfg.train_jsonl, len(prompts), skipped, "prompts")
    model_config = AutoConfig.from_pretrained(cfg.model_dir, local_files_only=True)
    pad_id = AutoTokenizer.from_pretrained(cfg.model_dir, local_files_only=True).pad_token_id
    latent_ids = LatentIds.from_config(model_config)
    hidden = model_config.text_config.hidden_size
    untrainable = vision_placeholder_ids(model_config)
    specs = cfg.reward_specs()
    order = PromptOrder(len(prompts), cfg.seed)

    run_dir = Path(cfg.output_dir).resolve() / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    rollouts, learner, groups_to_remove = build_actors(cfg)
    step = 0
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        learner.load_checkpoint(resume)
        step = finished_step(run_dir)
        log.info("resumed from %s at step %d", resume, step)
    version = step
    if step > 0:
        learner.broadcast_weights(rollouts, version)  # engines start from model_dir
    on_gpu_colocated = cfg.colocate and cfg.rollout_gpus > 0

    def resync(actor) -> None:
        learner.broadcast_weights([actor], version)

    metrics_log = MetricsLog(run_dir / "metrics.jsonl", step, run_dir / "tensorboard" if cfg.tensorboard else None,
                             prefix="grpo")
    progress = None
    if cfg.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=cfg.max_steps, initial=step, desc="grpo", unit="step", dynamic_ncols=True)
    metrics: dict[str, float] = {}
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            batch = [prompts[i] for i in order.indices(step, cfg.prompts_per_step)]
            clips, load_errors = [], {}
            for k, p in enumerate(batch):
                try:
                    clips.append(p.load_frames(cfg.max_frames, cfg.max_pixels))
                except UsageError as err:  # an unreadable clip fails its own group only
                    clips.append(None)
                    load_errors[k] = str(err)
            live = [k for k in range(len(batch)) if k not in load_errors]
            requests = [GenerationRequest(batch[k].text, frames=clips[k]) for k in live]
            sampling = SamplingConfig(n=cfg.num_generations, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                      top_p=cfg.top_p, seed=cfg.seed + step * cfg.rows_per_step)
            generated = iter(generate_groups(rollouts, requests, sampling, resync, cfg.max_rollout_retries))
            groups = [[Completion([], "", [], None, [], "error", load_errors[k])] * cfg.num_generations
                      if k in load_errors else next(generated) for k in range(len(batch))]
            t1 = time.perf_counter()

            scores = score_groups(groups, [p.solution for p in batch], specs, len(rollouts))
            advantages = group_advantages(torch.from_numpy(scores.total), cfg.num_generations, cfg.advantage_eps)
            rows = build_train_rows(groups, advantages, hidden, pad_id, untrainable)
            t2 = time.perf_counter()

            if on_gpu_colocated:
                ray.get([r.sleep.remote() for r in rollouts])
            train_metrics = learner.train_step([(p.text, c) for p, c in zip(batch, clips)], rows)
            t3 = time.perf_counter()
            if on_gpu_colocated:
                ray.get([r.wake.remote() for r in rollouts])
            t3_woken = time.perf_counter()
            sync_metrics: dict[str, float] = {}
            if train_metrics["optimizer_steps"] > 0:
                version = step + 1
                sync_metrics = learner.broadcast_weights(rollouts, version)
            t4 = time.perf_counter()
            step += 1

            metrics = {"step": float(step), "weight_version": float(version), **rollout_metrics(groups, scores, latent_ids),
                       **train_metrics, **sync_metrics, "rows_untrainable": float((~rows.trainable).sum()),
                       "prompts_failed": float(len(load_errors)), "time/generate": t1 - t0,
                       "time/reward": t2 - t1, "time/train": t3 - t2, "time/wake": t3_woken - t3,
                       "time/sync": t4 - t3_woken, "time/step": t4 - t0}
            metrics_log.write(metrics)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward/total/mean']:.3f}", kl=f"{metrics['kl']:.4f}",
                                     gap=f"{metrics['logprob_gap/max']:.1e}")
            if cfg.save_checkpoints and (step == cfg.max_steps
                                         or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                save_checkpoint(learner, run_dir, step, cfg)
    except StageError as err:  # a learner died: say so and how to go on, instead of hanging or a traceback
        last = latest_checkpoint(run_dir)
        raise StageError(f"{err} at step {step + 1}; rerun the same command to resume from "
                         f"{last or 'the start (no checkpoint yet)'}") from None
    finally:
        metrics_log.close()
        if progress is not None:
            progress.close()
        learner.shutdown()
        for actor in rollouts:
            ray.kill(actor)
        from ray.util.placement_group import remove_placement_group

        for pg in groups_to_remove:
            remove_placement_group(pg)

    last = latest_checkpoint(run_dir)
    if last is not None:
        final = run_dir / "final"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(last / "hf", final, copy_function=_link_or_copy)
    return metrics


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no second copy of the weights) where the storage has them, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_stage("grpo", GrpoConfig, __doc__, argv, _run)


def _run(cfg: GrpoConfig) -> int:
    run_dir = Path(cfg.output_dir) / cfg.run_name
    done = finished_step(run_dir)
    if done >= cfg.max_steps:  # before any engine starts: nothing left to train
        print(f"grpo: already finished ({done} of max_steps={cfg.max_steps} steps); model -> {run_dir / 'final'} "
              "(raise max_steps to train on, or change run_name for a new run)")
        return 0
    metrics = train(cfg)
    print(f"grpo: {int(metrics.get('step', 0))} steps, reward {metrics.get('reward/total/mean', float('nan')):.3f}, "
          f"kl {metrics.get('kl', float('nan')):.4f}; model -> "
          f"{Path(cfg.output_dir).resolve() / cfg.run_name / 'final'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
