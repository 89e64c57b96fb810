"""The 4DRL (GRPO) stage config: one typed object, defaults from the reference recipe.

Loaded like every stage config (`fourdthinker.config.load_config(GrpoConfig, yaml, overrides)`).
Defaults are the reference's GRPO run (REFERENCE.md "4DRL JSONL"): 8 generations, lr 1e-6,
beta 0.01, epsilon 0.2, accuracy 1.0 + format 0.2, temperature 1.0, top-p 0.9, ZeRO-2; the KL
estimator defaults to k3 (non-negative, unbiased) where the reference used k1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from fourdthinker.config import ConfigError, check_file, check_model_dir, check_named_resources
from fourdthinker.rewards import RewardSpec

KlEstimator = Literal["k1", "k3"]


@dataclasses.dataclass
class GrpoConfig:
    """4DRL: GRPO on latent-reasoning rollouts from vLLM actors, trained by a DeepSpeed learner group."""

    # Made absolute before Ray starts; refused when relative under a Ray job (fourdthinker.paths).
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("model_dir", "train_jsonl", "output_dir")

    model_dir: str = ""  # a DIFT checkpoint (HF dir with processor and latent tokens)
    train_jsonl: str = ""  # 4DRL JSONL in the reference format
    output_dir: str = "runs/grpo"  # run directory = <output_dir>/<run_name>
    run_name: str = "grpo"

    # -- the algorithm ---------------------------------------------------------------------------
    prompts_per_step: int = 8  # B prompts sampled per step
    num_generations: int = 8  # G completions per prompt (a group)
    max_steps: int = 100
    num_iterations: int = 1  # optimizer steps on each rollout batch (PPO epochs)
    lr: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    beta: float = 0.01  # KL weight; 0 drops the reference model
    kl_estimator: KlEstimator = "k3"
    advantage_eps: float = 1e-4
    rewards: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.2})

    # -- sampling --------------------------------------------------------------------------------
    max_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int = 42
    max_frames: int = 50
    max_pixels: int = 256 * 28 * 28

    # -- learner group (one DeepSpeed world) -----------------------------------------------------
    num_learners: int = 1
    micro_batch_size: int = 1  # completions per forward/backward on one learner
    zero_stage: int = 2
    bf16: bool | None = None  # None: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = True
    freeze_vision_tower: bool = True
    learner_gpus: float = 1.0  # per learner actor; 0 trains on CPU (gloo)
    learner_cpus: float = 1.0
    # Named Ray resources per learner (and below, per rollout actor), e.g. {"accelerator_type:H200": 0.001}
    # to land on one cluster worker type (cluster.yaml declares the names its node types offer).
    learner_resources: dict[str, float] = dataclasses.field(default_factory=dict)

    # -- rollout actors --------------------------------------------------------------------------
    num_rollouts: int = 1
    rollout_gpus: float = 1.0  # per rollout actor
    rollout_cpus: float = 1.0
    rollout_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra vLLM engine kwargs
    rollout_env: dict[str, str] = dataclasses.field(default_factory=dict)  # actor env vars
    colocate: bool = False  # rollout i and learner i share one bundle (one GPU): engine sleeps to train
    max_rollout_retries: int = 2  # per step, re-queued prompts of a rollout actor that died

    # -- weight sync, checkpoints, logging ------------------------------------------------------
    # auto: a broadcast group (NCCL on GPU, gloo on CPU) between learner rank 0 and the engines,
    # CUDA IPC when colocated on a GPU; object_store: through Ray's object store.
    weight_sync: str = "auto"
    weight_bucket_mb: int = 256
    checkpoint_every: int = 50  # steps; 0: only at the end
    save_checkpoints: bool = True  # false: none at all, not even the final one (benchmarks, dry runs)
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress_bar: bool = True

    def reward_specs(self) -> list[RewardSpec]:
        return [RewardSpec(name, float(weight)) for name, weight in self.rewards.items()]

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations

    def validate(self) -> None:
        if not self.model_dir:
            raise ConfigError("model_dir: required (a local DIFT checkpoint directory)")
        if not self.train_jsonl:
            raise ConfigError("train_jsonl: required (a 4DRL JSONL file)")
        for name in ("prompts_per_step", "max_steps", "num_iterations", "max_tokens", "num_learners",
                     "micro_batch_size", "num_rollouts", "weight_bucket_mb", "keep_checkpoints",
                     "max_frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations: must be >= 2 (a group's advantages need its spread), "
                              f"got {self.num_generations}")
        if self.rows_per_step % (self.num_learners * self.micro_batch_size):
            raise ConfigError(
                f"prompts_per_step x num_generations = {self.rows_per_step} completions must split evenly "
                f"into num_learners ({self.num_learners}) x micro_batch_size ({self.micro_batch_size}); "
                "change one of them")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"clip_eps: must be in (0, 1), got {self.clip_eps}")
        if self.beta < 0 or self.lr <= 0:
            raise ConfigError(f"beta must be >= 0 and lr > 0, got beta={self.beta}, lr={self.lr}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every: must be >= 0, got {self.checkpoint_every}")
        if self.colocate and self.num_rollouts != self.num_learners:
            raise ConfigError(f"colocate: needs num_rollouts == num_learners (one of each per GPU), got "
                              f"{self.num_rollouts} and {self.num_learners}")
        if not self.rewards:
            raise ConfigError("rewards: name at least one reward, e.g. {accuracy: 1.0, format: 0.2}")
        from fourdthinker.weight_sync import TRANSPORTS

        if self.weight_sync not in TRANSPORTS:
            raise ConfigError(f"weight_sync: one of {', '.join(TRANSPORTS)}, got {self.weight_sync!r}")
        if self.weight_sync == "cuda_ipc" and not (self.colocate and self.learner_gpus > 0):
            raise ConfigError("weight_sync: cuda_ipc needs colocate: true with learner_gpus > 0 (one GPU shared)")
        self.reward_specs()  # unknown reward names fail here, at load time
        check_named_resources("learner_resources", self.learner_resources)
        check_named_resources("rollout_resources", self.rollout_resources)

    def check_inputs(self) -> None:
        """The input files exist and the JSONL has a usable prompt (on the driver, before Ray starts)."""
        check_model_dir(self.model_dir)
        check_file(self.train_jsonl, "train_jsonl", "a 4DRL JSONL file (pipelines/preprocess.py writes rl.jsonl)")
        from fourdthinker.data.dift_dataset import require_usable
        from fourdthinker.data.rl_dataset import read_rl_jsonl

        prompts, skipped = read_rl_jsonl(self.train_jsonl)
        require_usable(self.train_jsonl, len(prompts), skipped, "prompts")
