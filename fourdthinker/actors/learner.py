"""The GRPO learner group: Ray actors that form one DeepSpeed ZeRO world and push weights to rollouts.

Each `LearnerWorker` is one rank (torch.distributed inside Ray: NCCL on GPU, gloo on CPU). It owns
the policy, its optimizer and a frozen reference copy, and scores completions with the latent
vectors the rollout fed at the latent slots (`model.completion_logprobs`), so the policy it trains
is the one that sampled. After an optimizer step, every rank takes part in `broadcast_weights`
(ZeRO-3 gathers the shards) and rank 0 hands the full parameters to every rollout actor in one
pass through a `WeightSync` transport (fourdthinker/weight_sync.py: a NCCL/gloo broadcast group of
its own by default, CUDA IPC when colocated on one GPU, or the Ray object store).

`LearnerGroup` is the driver-side handle: it places the ranks, wires the process group, splits a
step's rows evenly over the ranks and returns the all-reduced metrics.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from fourdthinker.config import from_dict, to_dict
from fourdthinker.errors import StageError
from fourdthinker.grpo import TrainRows, grpo_loss, logprob_gap, pad_rows, trainable_text_mask
from fourdthinker.grpo_config import GrpoConfig
from fourdthinker.weight_sync import WeightSync, free_port, make_weight_sync

log = logging.getLogger(__name__)

HF_DIR = "hf"
DS_DIR = "deepspeed"
DS_TAG = "state"

# A step's prompts as the learner sees them: (user text, frames or None).
Prompt = tuple[str, Sequence[Image.Image] | None]


# -- one rank ---------------------------------------------------------------------------------------
def deepspeed_config(cfg: GrpoConfig, world_size: int, grad_accum: int, bf16: bool, on_gpu: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "contiguous_gradients": True, "overlap_comm": on_gpu}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": cfg.micro_batch_size * grad_accum * world_size,
        # Clipping makes DeepSpeed compute the global grad norm, and a non-finite norm then skips
        # the optimizer step on every rank (fp32 always; bf16 with check_grad_overflow).
        "gradient_clipping": cfg.max_grad_norm if cfg.max_grad_norm > 0 else 1e9,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class LearnerWorker:
    """One rank of the learner's DeepSpeed world."""

    def __init__(self, config: dict[str, Any], rank: int, world_size: int):
        self.cfg = from_dict(GrpoConfig, config)
        self.rank, self.world_size = rank, world_size
        self.engine = None
        self.steps_applied = 0
        self._sync_list: list[tuple[str, torch.nn.Parameter, torch.Tensor]] | None = None

    def master_address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        import deepspeed
        from transformers import AutoProcessor

        from fourdthinker.model import freeze_vision_tower, load_model
        from fourdthinker.tokens import LatentIds

        cfg = self.cfg
        on_gpu = torch.cuda.is_available()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if on_gpu:
            torch.cuda.set_device(0)  # Ray shows each actor only its own GPU
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        self.bf16 = on_gpu if cfg.bf16 is None else cfg.bf16

        self.processor = AutoProcessor.from_pretrained(cfg.model_dir, local_files_only=True)
        model = load_model(cfg.model_dir, torch.float32)
        self.latent_ids = LatentIds.from_config(model.config)
        if cfg.freeze_vision_tower:
            freeze_vision_tower(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reference = None
        if cfg.beta > 0:
            # The frozen reference is the starting policy, also after a resume.
            self.reference = load_model(cfg.model_dir, torch.bfloat16 if self.bf16 else torch.float32).to(self.device)
            self.reference.eval().requires_grad_(False)

        self.grad_accum = cfg.rows_per_step // (self.world_size * cfg.micro_batch_size)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      **({"fused": True} if on_gpu else {"foreach": True}))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, dist_init_required=False,
            config=deepspeed_config(cfg, self.world_size, self.grad_accum, self.bf16, on_gpu))
        self.sync: WeightSync = make_weight_sync(cfg.weight_sync, cfg.weight_bucket_mb * 1024 * 1024, self.device,
                                                 colocated=cfg.colocate)
        return {"rank": self.rank, "device": str(self.device), "grad_accum": self.grad_accum,
                "trainable_params": sum(p.numel() for p in params)}

    # -- scoring -----------------------------------------------------------------------------------
    def _inputs(self, prompts: Sequence[Prompt], rows: TrainRows) -> dict[str, torch.Tensor]:
        # A micro-batch holds several completions of one prompt: its video is processed and goes
        # through the vision tower once, not once per row.
        from fourdthinker.data.collate import row_prompt_batch

        encoded = row_prompt_batch(self.processor, prompts, rows.prompt_index)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in encoded.items()}

    def _logprobs(self, model, inputs: dict, rows: TrainRows) -> tuple[torch.Tensor, torch.Tensor]:
        from fourdthinker.model import completion_logprobs

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            per_row = completion_logprobs(model, inputs, rows.completions, rows.latents, self.latent_ids)
        logp, valid = pad_rows(per_row)
        return logp, trainable_text_mask(rows, valid, self.latent_ids)

    @torch.no_grad()
    def logprobs(self, prompts: Sequence[Prompt], rows: TrainRows) -> list[torch.Tensor]:
        """The current policy's log-prob of every completion token (on CPU), without training."""
        from fourdthinker.model import completion_logprobs

        self.engine.module.eval()
        per_row = completion_logprobs(self.engine.module, self._inputs(prompts, rows), rows.completions,
                                      rows.latents, self.latent_ids)
        return [lp.float().cpu() for lp in per_row]

    # -- training ----------------------------------------------------------------------------------
    def train_step(self, prompts: Sequence[Prompt], rows: TrainRows) -> dict[str, float]:
        """`num_iterations` optimizer steps on this rank's rows; metrics all-reduced over ranks."""
        import torch.distributed as dist

        cfg = self.cfg
        micro = rows.micro_batches(cfg.micro_batch_size)
        if len(micro) != self.grad_accum:
            raise ValueError(f"rank {self.rank} got {len(rows)} rows; the config expects "
                             f"{self.grad_accum * cfg.micro_batch_size} per rank per step")
        self.engine.train()
        if cfg.freeze_vision_tower:
            self.engine.module.model.visual.eval()
        inputs = [self._inputs(prompts, mb) for mb in micro]
        old, ref = [], []
        # sums: loss, policy_loss, kl, clip_fraction, ratio_mean, gap_sum, gap_tokens, micro-steps,
        # non-finite losses; gap_max is max-reduced.
        sums = torch.zeros(9, dtype=torch.float64)
        gap_max = torch.zeros(1, dtype=torch.float64)
        applied = 0
        for iteration in range(cfg.num_iterations):
            for k, (mb, mb_inputs) in enumerate(zip(micro, inputs)):
                logp, mask = self._logprobs(self.engine.module, mb_inputs, mb)
                if iteration == 0:
                    # The weights that sampled these rows: old log-probs for later iterations, and
                    # the rollout-vs-learner consistency gap.
                    old.append(logp.detach())
                    rollout, _ = pad_rows([lp.to(self.device) for lp in mb.rollout_logprobs])
                    worst, mean = logprob_gap(logp, rollout, mask)
                    tokens = int(mask.sum())
                    sums[5] += mean * tokens
                    sums[6] += tokens
                    gap_max[0] = max(gap_max[0].item(), worst)
                    if self.reference is not None:
                        with torch.no_grad():
                            ref.append(self._logprobs(self.reference, mb_inputs, mb)[0])
                out = grpo_loss(logp.float(), old[k].float(), mb.advantages.to(self.device), mask,
                                ref_logp=ref[k].float() if ref else None, clip_eps=cfg.clip_eps,
                                beta=cfg.beta, kl_estimator=cfg.kl_estimator)
                if not torch.isfinite(out.loss):
                    sums[8] += 1
                self.engine.backward(out.loss)
                self.engine.step()
                values = out.metrics()
                for i, key in enumerate(("loss", "policy_loss", "kl", "clip_fraction", "ratio_mean")):
                    sums[i] += values[key]
                sums[7] += 1
            applied += int(self.engine.was_step_applied())
        self.steps_applied += applied
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(gap_max, op=dist.ReduceOp.MAX)
        n = max(sums[7].item(), 1.0)
        metrics = {key: sums[i].item() / n for i, key in
                   enumerate(("loss", "policy_loss", "kl", "clip_fraction", "ratio_mean"))}
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update({
            "logprob_gap/max": gap_max.item(),
            "logprob_gap/mean": sums[5].item() / max(sums[6].item(), 1.0),
            "optimizer_steps": float(applied),
            "skipped_steps": float(cfg.num_iterations - applied),
            "nonfinite_losses": sums[8].item(),
            "grad_norm": float(grad_norm) if grad_norm is not None and math.isfinite(grad_norm) else float("nan"),
            "lr": float(self.engine.get_lr()[0]),
        })
        if applied < cfg.num_iterations and self.rank == 0:
            log.warning("skipped %d of %d optimizer steps: non-finite loss or gradient norm (%d non-finite "
                        "micro-batch losses); the weights are unchanged by them",
                        cfg.num_iterations - applied, cfg.num_iterations, int(sums[8].item()))
        return metrics

    # -- weights -----------------------------------------------------------------------------------
    def _full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full named trainable parameters; under ZeRO-3 gathered chunk by chunk (a collective: every
        rank iterates, only rank 0 receives tensors). Frozen ones (the vision tower by default) are
        left out: the engines loaded them from the same checkpoint and they never change."""
        if self.cfg.zero_stage != 3:
            if self.rank == 0:
                yield from ((n, view) for n, _, view in self._sync_views())
            return
        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        import deepspeed

        limit = self.cfg.weight_bucket_mb * 1024 * 1024
        chunk: list[tuple[str, torch.nn.Parameter]] = []

        def gathered(chunk):
            with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
                if self.rank == 0:
                    return [(n, p.detach().cpu().clone()) for n, p in chunk]
            return []

        size = 0
        for name, param in named:
            chunk.append((name, param))
            size += param.ds_numel * param.element_size()
            if size >= limit:
                yield from gathered(chunk)
                chunk, size = [], 0
        if chunk:
            yield from gathered(chunk)

    def _sync_views(self) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
        """(name, parameter, detached view) of every trainable parameter, listed once and kept: the
        optimizer writes into the parameters' storage, so the views stay current (walking the
        module's ~800 parameters and detaching each costs the host ~2 ms a sync at the 3B shape).
        Listed anew if one was re-allocated or frozen; none becomes trainable later (DeepSpeed's
        optimizer took its parameter groups at set-up)."""
        views = self._sync_list
        if views is None or any(view.data_ptr() != p.data_ptr() or view.shape != p.shape or not p.requires_grad
                                for _, p, view in views):
            views = [(n, p, p.detach()) for n, p in self.engine.module.named_parameters() if p.requires_grad]
            self._sync_list = views
        return views

    def broadcast_weights(self, rollouts: Sequence[Any], version: int) -> dict[str, float]:
        """Every rank calls this; rank 0 sends the full parameters to all `rollouts` in one pass."""
        named = self._full_parameters()
        if self.rank != 0:
            for _ in named:  # take part in ZeRO-3's gathers
                pass
            return {}
        stats = self.sync.push(named, list(rollouts), version)
        return {"sync_bytes": float(stats.bytes), "sync_s": stats.seconds, "sync_buckets": float(stats.num_buckets),
                "sync_receiver_load_s": stats.receiver_load_s, "sync_receiver_finish_s": stats.receiver_finish_s,
                **{f"sync/{k}": v for k, v in stats.phases.items()}}

    def probe_weight_sync(self, rollouts: Sequence[Any], nbytes: int) -> float:
        """Seconds for a plain broadcast of `nbytes` over the weight group (rank 0; collective only)."""
        from fourdthinker.weight_sync import CollectiveWeightSync

        if not isinstance(self.sync, CollectiveWeightSync):
            raise RuntimeError(f"weight_sync={self.cfg.weight_sync} has no broadcast group to probe")
        return self.sync.probe(list(rollouts), nbytes) if self.rank == 0 else 0.0

    def parameter_checksum(self) -> float:
        """float64 sum of this rank's parameters (ZeRO-2: the full model on every rank)."""
        return float(sum(p.detach().double().sum() for p in self.engine.module.parameters()))

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed state (every rank: exact resume) and, from rank 0, an HF directory + processor."""
        path = Path(path)
        self.engine.save_checkpoint(str(path / DS_DIR), tag=DS_TAG)
        state = self.engine._zero3_consolidated_16bit_state_dict() if self.cfg.zero_stage == 3 else None
        if self.rank == 0:
            self.engine.module.save_pretrained(path / HF_DIR, state_dict=state, safe_serialization=True)
            self.processor.save_pretrained(path / HF_DIR)

    def load_checkpoint(self, path: str) -> None:
        loaded, _ = self.engine.load_checkpoint(str(Path(path) / DS_DIR), tag=DS_TAG)
        if loaded is None:
            raise RuntimeError(f"no DeepSpeed state under {path}/{DS_DIR}")


# -- the group (driver side) -----------------------------------------------------------------------
def _actor_env(on_gpu: bool) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not on_gpu:
        env.update(DS_ACCELERATOR="cpu")
    return env


class LearnerGroup:
    """`num_learners` LearnerWorker actors forming one DeepSpeed world."""

    def __init__(self, cfg: GrpoConfig, placement_group=None, bundle_indices: Sequence[int] | None = None,
                 num_gpus: float | None = None, num_cpus: float | None = None, env: dict[str, str] | None = None):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg = cfg
        num_gpus = cfg.learner_gpus if num_gpus is None else num_gpus
        num_cpus = cfg.learner_cpus if num_cpus is None else num_cpus
        actor_cls = ray.remote(LearnerWorker)
        self.workers = []
        for rank in range(cfg.num_learners):
            options: dict[str, Any] = {"num_gpus": num_gpus, "num_cpus": num_cpus,
                                       "runtime_env": {"env_vars": {**_actor_env(num_gpus > 0), **(env or {})}}}
            if placement_group is not None:
                index = bundle_indices[rank] if bundle_indices is not None else rank
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=index)
            self.workers.append(actor_cls.options(**options).remote(to_dict(cfg), rank, cfg.num_learners))
        addr, port = ray.get(self.workers[0].master_address.remote())
        self.info = ray.get([w.setup.remote(addr, port) for w in self.workers])

    def _gather(self, refs: list, what: str) -> list:
        """Every rank's result, failing as soon as one rank fails: the other ranks of a collective
        would wait on a dead one forever, and so would a plain `ray.get` of all of them."""
        import ray

        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as err:
                rank = refs.index(ready[0])
                cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise StageError(f"learner rank {rank} of {len(refs)} died during {what} ({cause})") from None
        return ray.get(refs)

    def _call(self, method: str, *args) -> list:
        return self._gather([getattr(w, method).remote(*args) for w in self.workers], method)

    def _shards(self, prompts: Sequence[Prompt], rows: TrainRows):
        """Per rank: only the prompts its rows answer, with the rows' indices remapped to them."""
        for rank in range(len(self.workers)):
            shard = rows.shard(rank, len(self.workers))
            used = sorted(set(shard.prompt_index))
            remap = {p: i for i, p in enumerate(used)}
            shard.prompt_index = [remap[p] for p in shard.prompt_index]
            yield [prompts[p] for p in used], shard

    def train_step(self, prompts: Sequence[Prompt], rows: TrainRows) -> dict[str, float]:
        refs = [w.train_step.remote(p, s) for w, (p, s) in zip(self.workers, self._shards(prompts, rows))]
        return self._gather(refs, "train_step")[0]  # metrics are all-reduced: every rank returns the same

    def logprobs(self, prompts: Sequence[Prompt], rows: TrainRows) -> list[torch.Tensor]:
        refs = [w.logprobs.remote(p, s) for w, (p, s) in zip(self.workers, self._shards(prompts, rows))]
        return [lp for part in self._gather(refs, "logprobs") for lp in part]

    def broadcast_weights(self, rollouts: Sequence[Any], version: int) -> dict[str, float]:
        return self._call("broadcast_weights", list(rollouts), version)[0]

    def probe_weight_sync(self, rollouts: Sequence[Any], nbytes: int) -> float:
        import ray

        return ray.get(self.workers[0].probe_weight_sync.remote(list(rollouts), nbytes))

    def save_checkpoint(self, path: str | Path) -> None:
        self._call("save_checkpoint", str(path))

    def load_checkpoint(self, path: str | Path) -> None:
        self._call("load_checkpoint", str(path))

    def parameter_checksums(self) -> list[float]:
        return self._call("parameter_checksum")

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
