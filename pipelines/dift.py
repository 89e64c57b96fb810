"""DIFT stage: Ray Train + DeepSpeed ZeRO fine-tuning with latent mental images.

    python pipelines/dift.py --config configs/tiny/dift.yaml [key=value ...]
    ray job submit --working-dir . -- python pipelines/dift.py --config configs/3b/dift.yaml

Resumes from the latest checkpoint of the same run (output_dir + run_name) when rerun. The final
Hugging Face checkpoint (model + processor) is copied to <output_dir>/final.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fourdthinker.cluster import run_stage
from fourdthinker.config import DiftConfig, to_dict
from fourdthinker.errors import StageError


def main(argv: list[str] | None = None) -> int:
    return run_stage("dift", DiftConfig, __doc__, argv, _train)


def _train(cfg: DiftConfig) -> int:
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from fourdthinker.dift_train import HF_DIR, train_loop_per_worker

    # run_stage made the config's paths absolute and checked the inputs (DiftConfig.check_inputs)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    output_dir = Path(cfg.output_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.worker_resources}),
        run_config=RunConfig(name=cfg.run_name, storage_path=str(output_dir),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as err:  # a worker died or raised: its traceback is in the log above
        raise StageError(f"training failed ({str(err).strip().splitlines()[0]}); rerun the same command to "
                         f"resume from the last checkpoint under {output_dir / cfg.run_name}") from None
    final = output_dir / "final"
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as ckpt:
            if final.exists():
                shutil.rmtree(final)
            shutil.copytree(Path(ckpt) / HF_DIR, final)
    metrics = result.metrics or {}
    print(f"dift: {metrics.get('step', 0)} steps, final loss {metrics.get('loss', float('nan')):.4f}, "
          f"cos {metrics.get('cos', float('nan')):.3f}; model -> {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
