"""The rollout actor: one vLLM engine with latent decoding, owned by one Ray actor.

The actor is a thin shell around `LatentGenerator` (the library does the work, tests call it
without Ray): it owns the engine's process and resources, receives new weights in buckets from
the learner group, keeps a weight version counter, and can sleep/wake its engine so a learner can
use the same GPU in colocated mode.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from fourdthinker.generation import Completion, GenerationRequest, SamplingConfig
from fourdthinker.vllm_plugin.generate import LatentGenerator
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
        self.weight_token: str | None = None  # the weight group this engine's workers joined
        self._phases: dict[str, float] = {}  # where the current weight update's time goes
        self.asleep = False
        self.started = time.time()
        self.generated_tokens = 0

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[list[Completion]]:
        if self.asleep:
            raise RuntimeError("rollout engine is asleep: call wake() before generate()")
        out = self.generator.generate(requests, sampling)
        self.generated_tokens += sum(len(c.token_ids) for group in out for c in group)
        return out

    # -- weights (see fourdthinker/weight_sync.py for the sender side) ----------------------------
    def _rpc(self, phase: str, method: str, *args):
        """One collective_rpc into the engine's workers, its wall time kept under `phase`; what the
        workers report of their own time shows the rest is the RPC's."""
        start = time.perf_counter()
        out = self.generator.llm.collective_rpc(method, args=args)
        self._phases[phase] = self._phases.get(phase, 0.0) + time.perf_counter() - start
        return out

    def _open_update(self, names: Sequence[str] | None) -> None:
        self._update_started = time.perf_counter()
        self._phases = {}
        # Cached vision-encoder outputs stay valid unless the vision tower itself changes (DIFT and
        # GRPO keep it frozen, so its weights never travel).
        self._vision_changes = names is None or any(".visual." in f".{n}" for n in names)

    def begin_weight_update(self, names: Sequence[str] | None = None) -> None:
        """Open an update of the parameters `names` (HF names; None: all of them)."""
        self._open_update(names)
        worker = self._rpc("begin_s", "bucket_update_begin", list(names) if names is not None else None)
        self._phases["begin_worker_s"] = max(worker)

    def finish_weight_update(self, version: int) -> dict[str, Any]:
        """Close the update, then make what belongs to the old weights unusable: cached KV blocks
        (and so the latent vectors they imply) by a new prefix-cache salt, no reset needed; cached
        vision-encoder outputs of recurring videos, if the vision tower changed, by a reset.
        Returns the new version and where the time went (to see a slow sync's cause): `load_s`
        from begin to here, `finish_s` for the close, and `phases`, the finer split."""
        loaded = time.perf_counter()
        if "end_worker_s" not in self._phases:  # not closed by the workers themselves
            self._phases["end_worker_s"] = max(self._rpc("end_s", "bucket_update_end"))
        start = time.perf_counter()
        # a fresh salt even for a repeated version number (a restarted learner counts from 1 again)
        self.generator.cache_salt = f"weights-{int(version)}-{uuid.uuid4().hex[:12]}"
        if self._vision_changes:
            self.generator.llm.llm_engine.reset_encoder_cache()
        self._phases["reset_caches_s"] = time.perf_counter() - start
        self.version = int(version)
        done = time.perf_counter()
        return {"version": self.version, "load_s": loaded - self._update_started, "finish_s": done - loaded,
                "phases": dict(self._phases)}

    def update_weights(self, buckets: Sequence[WeightBucket], version: int) -> dict[str, Any]:
        """Load a new weight version from host-memory buckets (`ObjectStoreWeightSync`)."""
        self.begin_weight_update([n for b in buckets for n in b.names])
        for bucket in buckets:
            self._rpc("receive_s", "load_weight_bucket", *bucket.to_wire())
        return self.finish_weight_update(version)

    def load_bucket_ipc(self, layout, handle: bytes) -> int:
        """One bucket from a learner on the same GPU (`CudaIpcWeightSync`)."""
        return self._rpc("receive_s", "load_weight_bucket_ipc", layout, handle)[0]

    def num_weight_receivers(self) -> int:
        """vLLM workers of this engine: each joins the weight group (tensor parallel shards load
        their part of every full tensor)."""
        return self.generator.llm.llm_engine.vllm_config.parallel_config.world_size

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                          token: str) -> list[int]:
        ranks = self.generator.llm.collective_rpc(
            "weight_group_join", args=(host, port, rank_offset, world_size, backend))
        self.weight_token = token
        return ranks

    def weight_group_token(self) -> str | None:
        return self.weight_token

    def receive_weights(self, layouts: list, version: int) -> dict[str, Any]:
        """Every bucket of one sync, broadcast by learner rank 0 (`CollectiveWeightSync`)."""
        names = [n for bucket_names, _, _ in layouts for n in bucket_names]
        self._open_update(names)
        worker = self._rpc("receive_s", "weight_group_update", names, layouts)  # begin, buckets, end
        for key, phase in (("begin_s", "begin_worker_s"), ("transfer_s", "receive_transfer_s"),
                           ("load_s", "receive_load_s"), ("end_s", "end_worker_s")):
            self._phases[phase] = max(w[key] for w in worker)
        return self.finish_weight_update(version)

    def probe_weight_group(self, sizes: list[int]) -> int:
        return self.generator.llm.collective_rpc("weight_group_probe", args=(sizes,))[0]

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
        # pid: a restarted actor is a new process (its uptime alone can't tell a fast restart apart)
        return {"version": self.version, "asleep": self.asleep, "pid": os.getpid(),
                "uptime_s": time.time() - self.started, "generated_tokens": self.generated_tokens}


def rollout_actor_class(num_gpus: float = 0, num_cpus: float = 1):
    """`RolloutWorker` as a Ray actor class with its resources; restarts itself if it dies."""
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=2, max_task_retries=0)(RolloutWorker)
