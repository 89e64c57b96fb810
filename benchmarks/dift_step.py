"""Tokens/s and MFU of one DIFT training step (DeepSpeed ZeRO engine, one process).

The step is the real one: `DiftCollator` batch (video user turn + assistant text with latent
blocks), `dift_forward` (vision tower frozen, latent targets, CE + cosine loss), DeepSpeed
backward and optimizer step, as `fourdthinker.dift_train` runs it. FLOPs count 6 x (trainable LM
parameters) per token plus 2 x (vision parameters) per vision patch (forward only, frozen), and
MFU divides by the card's dense bf16 peak.

    python benchmarks/dift_step.py --model runs/tiny-model                     # CPU, tiny
    python benchmarks/dift_step.py --model /tmp/qwen3b --frames 16 --frame-size 448 --text-words 1500
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from report import write_result  # benchmarks/report.py (scripts run from benchmarks/)

# Dense bf16 peak (TFLOP/s) by card name fragment; CPU runs report no MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _peak(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _samples(tmp: Path, n: int, frames: int, size: int, words: int, images: int):
    import numpy as np
    from PIL import Image

    from fourdthinker.data.dift_dataset import DiftSample

    rng = np.random.default_rng(0)
    out = []
    for s in range(n):
        paths = []
        for f in range(frames + images):
            p = tmp / f"s{s}_f{f}.png"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
            paths.append(str(p))
        body = " ".join(["the camera pans left while the red box moves"] * max(1, words // 8))
        tags = " then ".join(["<output_image>"] * images)
        text = f"<think>{body} I imagine {tags} so the answer follows.</think><answer>B. Pan Left</answer>"
        out.append(DiftSample(f"bench{s}", "What is the camera movement?\n\nA. Pan Right\nB. Pan Left\n"
                              "C. Dolly In\nD. Tilt Up", text, paths[:frames], paths[frames:]))
    return out


def _profile(step, split: dict[str, float], cuda: bool, rows: int = 15) -> dict[str, list]:
    """One more step under torch.profiler: the top CUDA kernels and CPU ops by total time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step(split)
    events = prof.key_averages()
    out = {}
    for kind, attr in (("cuda", "device_time_total"), ("cpu", "self_cpu_time_total")):
        if kind == "cuda" and not cuda:
            continue
        ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:rows]
        out[kind] = [{"name": e.key[:90], "ms": getattr(e, attr) / 1e3, "calls": e.count} for e in ranked]
        print(f"\ntop {kind} by total time (one optimizer step):")
        for e in out[kind]:
            print(f"{e['ms']:>10.1f} ms {e['calls']:>7}  {e['name']}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--frame-size", type=int, default=224)
    parser.add_argument("--text-words", type=int, default=200)
    parser.add_argument("--images", type=int, default=2, help="mental images per sample")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per optimizer step (the step time covers all of them)")
    parser.add_argument("--attn", default=None, help="the language model's attn_implementation")
    parser.add_argument("--per-window-vision-attention", action="store_true",
                        help="transformers' one attention call per vision window (the comparison)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step and print the top CUDA kernels and CPU ops")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed
    import torch

    from fourdthinker.config import DiftConfig
    from fourdthinker.data.collate import DiftCollator
    from fourdthinker.dift_train import deepspeed_config, load_model_and_processor
    from fourdthinker.model import compile_blocks, dift_forward

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    cfg = DiftConfig(model_dir=args.model, train_jsonl="-", per_device_batch_size=args.batch,
                     grad_accum=args.grad_accum, zero_stage=args.zero, gradient_checkpointing=not args.no_gradient_checkpointing,
                     max_frames=args.frames, max_pixels=max(args.frame_size ** 2, 28 * 28))
    model, processor, ids = load_model_and_processor(cfg, torch.float32, attn_implementation=args.attn,
                                                     window_attention=not args.per_window_vision_attention)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if args.compile:
        compile_blocks(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, **({"fused": True} if cuda else {"foreach": True}))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, 1, bf16=cuda, on_gpu=cuda),
                                      dist_init_required=False)
    device = engine.device
    with tempfile.TemporaryDirectory() as tmp:
        samples = _samples(Path(tmp), args.batch, args.frames, args.frame_size, args.text_words, args.images)
        batch = DiftCollator(processor, ids, max_frames=args.frames, max_pixels=cfg.max_pixels)(samples)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    tokens = int(batch["attention_mask"].sum())
    patches = int(batch["pixel_values_videos"].shape[0]) + int(batch["pixel_values_latent"].shape[0])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def optimizer_step(split: dict[str, float] | None = None):
        """grad_accum micro-batches then the optimizer step. With `split`, timed by phase: the host
        waits for the device between phases, so each phase is its own, but the waits cost the
        device its queue, so the timed steps run without them."""
        mark = sync if split is not None else (lambda: None)
        for _ in range(args.grad_accum):
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = dift_forward(engine.module, batch, ids)
            mark()
            t1 = time.perf_counter()
            engine.backward(out.loss)
            mark()
            t2 = time.perf_counter()
            engine.step()  # applies the optimizer on the last micro-batch only
            mark()
            if split is not None:
                split["forward"] += t1 - t0
                split["backward"] += t2 - t1
                split["step"] += time.perf_counter() - t2
        return out

    times = []
    for step in range(args.steps + 1):
        sync()
        t0 = time.perf_counter()
        out = optimizer_step()
        sync()
        if step > 0:  # the first step includes allocator and kernel warm-up (and compilation)
            times.append(time.perf_counter() - t0)
    phases = {"forward": 0.0, "backward": 0.0, "step": 0.0}
    optimizer_step(phases)  # one more step, split by phase
    top = _profile(optimizer_step, {k: 0.0 for k in phases}, cuda) if args.profile else None
    seconds = sum(times) / len(times)
    flops = args.grad_accum * (6 * n_train * tokens + 2 * n_vision * patches)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = _peak(name) if cuda else None
    result = {
        "benchmark": "dift_step", "date": time.strftime("%Y-%m-%d"), "device": name, "args": vars(args),
        "tokens_per_micro_batch": tokens, "vision_patches": patches, "grad_accum": args.grad_accum,
        "attn_implementation": engine.module.config._attn_implementation,
        "vision_attn_implementation": engine.module.config.vision_config._attn_implementation,
        "gradient_checkpointing": engine.module.is_gradient_checkpointing,
        "compiled_blocks": args.compile,
        "phase_seconds": phases, "profile_top": top, "trainable_params": n_train,
        "vision_params": n_vision, "seconds_per_step": seconds, "tokens_per_s": args.grad_accum * tokens / seconds,
        "tflops": flops / seconds / 1e12, "mfu": (flops / seconds / 1e12 / peak) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": out.loss.item(),
    }
    print(f"\nDIFT step on {name}: {tokens} tokens ({patches} vision patches), batch {args.batch} "
          f"x {args.grad_accum} micro-batches, ZeRO-{args.zero}, grad ckpt {cfg.gradient_checkpointing}, "
          f"attention {result['attn_implementation']} / vision {result['vision_attn_implementation']}")
    print(f"{'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9}")
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "-"
    mem = f"{result['peak_memory_gib']:.1f}" if result["peak_memory_gib"] is not None else "-"
    print(f"{seconds:>8.3f} {result['tokens_per_s']:>10.0f} {result['tflops']:>9.1f} {mfu:>7} {mem:>9}")
    print("phases (s/step): " + "  ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    write_result("dift_step", name, result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
