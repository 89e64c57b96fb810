"""The DIFT training loop that runs on each Ray Train worker (DeepSpeed ZeRO inside).

Ray Train starts the workers and the process group (NCCL on GPU, gloo on CPU); this loop builds
the model, data shard and DeepSpeed engine, trains with the DIFT loss, reports metrics every step,
and saves a Ray Train checkpoint every `checkpoint_every` optimizer steps and at the end: the
DeepSpeed state (for exact resume) plus, from rank 0, an HF `save_pretrained` directory with the
processor. A rerun of the same run resumes from the latest checkpoint at the step it recorded.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from fourdthinker.config import DiftConfig, from_dict, to_dict
from fourdthinker.metrics_log import MetricsLog

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
HF_DIR = "hf"
DS_DIR = "deepspeed"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_step_{step:06d}"


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: DiftConfig, world_size: int, bf16: bool, on_gpu: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "contiguous_gradients": True,
                            "overlap_comm": on_gpu, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if cfg.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.per_device_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _trainable_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def load_model_and_processor(cfg: DiftConfig, dtype: torch.dtype, attn_implementation: str | None = None,
                             window_attention: bool = True):
    """The base model with latent tokens (added if missing) and its vision tower frozen."""
    from transformers import AutoProcessor

    from fourdthinker.model import load_model
    from fourdthinker.tokens import add_latent_tokens

    processor = AutoProcessor.from_pretrained(cfg.model_dir, local_files_only=True)
    model = load_model(cfg.model_dir, dtype, attn_implementation, window_attention)
    ids = add_latent_tokens(processor, model, latent_size=cfg.latent_size)
    model.model.visual.requires_grad_(False)
    model.model.visual.eval()
    return model, processor, ids


def _save_hf(engine, processor, out_dir: Path, zero_stage: int) -> None:
    """Rank-0 HF directory. ZeRO-3 shards parameters, so they are gathered first (every rank)."""
    import torch.distributed as dist

    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if dist.get_rank() == 0:
        module = engine.module
        module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        processor.save_pretrained(out_dir)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    from fourdthinker.data.collate import DiftCollator
    from fourdthinker.data.dift_dataset import read_dift_jsonl
    from fourdthinker.model import compile_blocks, dift_forward

    cfg = from_dict(DiftConfig, config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu if cfg.bf16 is None else cfg.bf16
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)

    # fp32 master weights; DeepSpeed's bf16 mode keeps the fp32 copy in the optimizer.
    model, processor, ids = load_model_and_processor(cfg, torch.float32)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.compile:
        compile_blocks(model)

    samples, skipped = read_dift_jsonl(cfg.train_jsonl)
    if not samples:
        raise ValueError(f"train_jsonl {cfg.train_jsonl}: no usable samples (skipped: {dict(skipped)})")
    sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    collator = DiftCollator(processor, ids, max_frames=cfg.max_frames, max_pixels=cfg.max_pixels)
    loader = DataLoader(samples, batch_size=cfg.per_device_batch_size, sampler=sampler,
                        collate_fn=collator, num_workers=0, drop_last=True)
    steps_per_epoch = len(loader) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"train_jsonl {cfg.train_jsonl}: {len(samples)} samples make no full step of "
                         f"{cfg.per_device_batch_size * cfg.grad_accum * world}; lower the batch size")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch

    fused = {"fused": True} if on_gpu else {"foreach": True}
    optimizer = torch.optim.AdamW(_trainable_params(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8, **fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, bf16, on_gpu), dist_init_required=False)

    step, start_batch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
            engine.load_checkpoint(str(Path(ckpt_dir) / DS_DIR), tag="state")
        step = int(state["step"])
        start_batch = (step % steps_per_epoch) * cfg.grad_accum
        log.info("resumed from step %d", step)

    metrics_log = None
    if rank == 0:  # a resumed run logs each step once: later steps of the killed run are dropped first
        metrics_log = MetricsLog(Path(cfg.output_dir) / cfg.run_name / "metrics.jsonl", step,
                                 Path(cfg.output_dir) / "tensorboard" / cfg.run_name if cfg.tensorboard else None,
                                 prefix="dift")
    progress = None
    if rank == 0 and cfg.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc="dift", unit="step", dynamic_ncols=True)

    engine.train()
    model.model.visual.eval()
    sums: Counter = Counter()
    t0 = time.perf_counter()
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        for batch_index, batch in enumerate(loader):
            if batch_index < start_batch:
                continue  # resuming inside an epoch: these micro-batches were already trained
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = dift_forward(engine.module, batch, ids, ce_weight=cfg.ce_weight, sim_weight=cfg.sim_weight)
            engine.backward(out.loss)
            engine.step()
            for name in ("loss", "ce", "sim", "cos"):
                sums[name] += float(getattr(out, name).detach())
            sums["tokens"] += int(batch["attention_mask"].sum())
            sums["micro"] += 1
            if sums["micro"] % cfg.grad_accum:
                continue  # DeepSpeed applies the optimizer step every grad_accum micro-batches
            step += 1
            metrics = _step_metrics(sums, engine, world, time.perf_counter() - t0, step, epoch)
            metrics["skipped_samples"] = sum(skipped.values())  # at reading (fourdthinker.data.dift_dataset)
            metrics["load_failures"] = collator.load_failures  # media that failed to load in training
            sums.clear()
            t0 = time.perf_counter()
            if metrics_log is not None:
                metrics_log.write(metrics)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", cos=f"{metrics['cos']:.3f}",
                                     tok_s=f"{metrics['tokens_per_s']:.0f}")
            last = step >= total_steps
            if last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                _report_with_checkpoint(engine, processor, cfg, step, metrics, rank)
            else:
                ray.train.report(metrics)
            if last:
                break
        start_batch = 0
    if metrics_log is not None:
        metrics_log.close()
    if progress is not None:
        progress.close()
    dist.barrier()


def _step_metrics(sums: Counter, engine, world: int, seconds: float, step: int, epoch: int) -> dict[str, float]:
    import torch.distributed as dist

    local = torch.tensor([sums["loss"], sums["ce"], sums["sim"], sums["cos"], sums["micro"], sums["tokens"]],
                         dtype=torch.float64)
    if dist.is_initialized() and world > 1:
        dist.all_reduce(local)  # gloo/NCCL both support float64 sums of a few scalars
    loss, ce, sim, cos, micro, tokens = local.tolist()
    grad_norm = engine.get_global_grad_norm()
    return {
        "step": step, "epoch": epoch, "loss": loss / micro, "ce": ce / micro, "sim": sim / micro,
        "cos": cos / micro, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": engine.get_lr()[0], "tokens_per_s": tokens / max(seconds, 1e-9),
    }


def _report_with_checkpoint(engine, processor, cfg: DiftConfig, step: int, metrics: dict, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        engine.save_checkpoint(str(tmp_path / DS_DIR), tag="state")
        _save_hf(engine, processor, tmp_path / HF_DIR, cfg.zero_stage)
        if rank == 0:
            (tmp_path / STATE_FILE).write_text(json.dumps({"step": step, "config": to_dict(cfg)}, indent=2))
        # Named by step (Ray's default name is a timestamp): <output_dir>/<run_name>/checkpoint_step_000050
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_dir_name(step))
