"""The rollout actor: one vLLM engine with latent decoding, owned by one Ray actor.

The actor is a thin shell around `LatentGenerator` (the library does the work, tests call it
without Ray): it owns the engine's process and resources, receives new weights in buckets from
the learner group, keeps a weight version counter, and can sleep/wake its engine so a learner can
use the same GPU in colocated mode.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from fourdthinker.vllm_plugin.generate import Completion, GenerationRequest, LatentGenerator, SamplingConfig
from fourdthinker.weights import WeightBucket


class RolloutWorker:
    def __init__(self, model_dir: str | Path | None = None, engine_kwargs: dict[str, Any] | None = None,
                 generator: LatentGenerator | None = None):
        kwargs = dict(engine_kwargs or {})
        self.sleep_mode = bool(kwargs.get("enable_sleep_mode", False))
        if generator is None and model_dir is None:
            raise ValueError("RolloutWorker needs a model_dir (or an existing generator)")
        self.generator = generator or LatentGenerator.from_model_dir(model_dir, **kwargs)
        self.version = 0
        self.asleep = False
        self.started = time.time()
        self.generated_tokens = 0

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[list[Completion]]:
        if self.asleep:
            raise RuntimeError("rollout engine is asleep: call wake() before generate()")
        out = self.generator.generate(requests, sampling)
        self.generated_tokens += sum(len(c.token_ids) for group in out for c in group)
        return out

    def update_weights(self, buckets: Sequence[WeightBucket], version: int) -> int:
        """Load a new weight version (all buckets of it), then drop the now-stale prefix cache."""
        llm = self.generator.llm
        llm.collective_rpc("bucket_update_begin")
        for bucket in buckets:
            llm.collective_rpc("load_weight_bucket", args=bucket.to_wire())
        llm.collective_rpc("bucket_update_end")
        # Cached KV blocks (and so the latent vectors they imply) and cached vision-encoder
        # outputs of recurring videos belong to the old weights.
        llm.reset_prefix_cache()
        llm.llm_engine.reset_encoder_cache()
        self.version = int(version)
        return self.version

    def weights_checksums(self) -> dict[str, float]:
        return self.generator.llm.collective_rpc("weights_checksums")[0]

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory (weights offloaded at level 1) for a colocated learner."""
        if not self.sleep_mode:
            raise RuntimeError("this engine was built without enable_sleep_mode=True "
                               "(vLLM supports sleep mode on CUDA only)")
        self.generator.llm.sleep(level=level)
        self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.generator.llm.wake_up()
            self.asleep = False

    def health(self) -> dict[str, Any]:
        return {"version": self.version, "asleep": self.asleep, "uptime_s": time.time() - self.started,
                "generated_tokens": self.generated_tokens}


def rollout_actor_class(num_gpus: float = 0, num_cpus: float = 1):
    """`RolloutWorker` as a Ray actor class with its resources; restarts itself if it dies."""
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=2, max_task_retries=0)(RolloutWorker)
