"""Questions/s of the evaluate stage (Ray Data: decode once per video, vLLM actor with latent decoding)
vs a per-sample HF `generate_latent` loop (what the reference evaluation does: decode the question's
video, then generate, one question at a time) on the same model and questions, greedy.

Runs alternate stage, loop, stage, loop, ... each in its own process; the medians are reported.
Two rates each: end to end (the stage's engine start and the loop's model load included; Ray's own
start is not) and steady state (the stage: from its first result batch stored to its last; the loop:
its questions after model load).

    python benchmarks/evaluate.py --repeats 3                     # CPU: tiny model, synthetic world
    python benchmarks/evaluate.py --model DIR --benchmark B.parquet --samples 64 num_gpus_per_actor=1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_result  # benchmarks/report.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]


def _cfg(args, out: Path):
    from fourdthinker.config import load_config
    from fourdthinker.eval_config import EvaluateConfig

    return load_config(EvaluateConfig, ROOT / "configs" / "tiny" / "evaluate.yaml", [
        f"benchmark={args.benchmark}", f"output_dir={out}", f"models=[bench={args.model}]", "engine=vllm",
        f"limit={args.samples}", f"max_new_tokens={args.max_new_tokens}", f"batch_size={args.batch_size}",
        *args.overrides])


def stage_once(args) -> dict:
    import importlib.util

    import ray

    spec = importlib.util.spec_from_file_location("evaluate_stage", ROOT / "pipelines" / "evaluate.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(args, Path(tmp) / "run")
        start = time.perf_counter()
        info = stage.run(cfg)
        seconds = time.perf_counter() - start
        shards = sorted((Path(tmp) / "run" / "bench" / "shards").glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
        sizes = [len(p.read_text().splitlines()) for p in shards]
        span = shards[-1].stat().st_mtime - shards[0].stat().st_mtime if len(shards) > 1 else 0.0
        tokens = sum(json.loads(line)["num_tokens"] for p in shards for line in p.read_text().splitlines())
    ray.shutdown()
    n = info["models"]["bench"]["answered_this_run"]
    return {"samples": n, "seconds": seconds, "samples_per_s": n / seconds, "tokens": tokens,
            "steady_samples_per_s": (n - sizes[0]) / span if span else None,
            "accuracy": info["summaries"]["bench"]["accuracy"]}


def loop_once(args) -> dict:
    from fourdthinker.data.video import VIDEO_FPS, decode_video
    from fourdthinker.dsr import item_prompt
    from fourdthinker.eval_engines import HFAnswerer
    from fourdthinker.evaluation import Benchmark
    from fourdthinker.generation import SamplingConfig

    cfg = _cfg(args, Path(tempfile.gettempdir()) / "unused")
    items = [item for _, item in Benchmark(cfg).evaluable()]
    start = time.perf_counter()
    answerer = HFAnswerer(args.model, SamplingConfig(max_tokens=cfg.max_new_tokens, temperature=0.0))
    loaded = time.perf_counter()
    tokens = 0
    for item in items:
        frames = decode_video(cfg.videos / f"{item.video_id}.mp4", VIDEO_FPS, cfg.max_frames, cfg.max_pixels)
        tokens += answerer.answer_one(item_prompt(item), frames).num_tokens
    end = time.perf_counter()
    return {"samples": len(items), "seconds": end - start, "samples_per_s": len(items) / (end - start),
            "tokens": tokens, "steady_samples_per_s": len(items) / (end - loaded)}


def _prepare(args) -> None:
    """The tiny model and a synthetic world, built once for all runs when not given."""
    work = Path(args.work)
    if not args.model:
        from fourdthinker.tiny_model import build_tiny_model

        args.model = str(build_tiny_model(work / "tiny-model", seed=0, overwrite=True))
    if not args.benchmark:
        from fourdthinker.data.synth import SynthConfig, build_world

        build_world(work / "world", SynthConfig(videos=3, seed=0, width=112, height=84, seconds=4, fps=5),
                    overwrite=True)
        args.benchmark = str(work / "world" / "dsr" / "benchmark.parquet")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="checkpoint dir (default: a tiny random model)")
    parser.add_argument("--benchmark", default="", help="DSR parquet (default: a synthetic world's)")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="", help="where the default model and world are built")
    parser.add_argument("--device", default="cpu-tiny", help="names the result file")
    parser.add_argument("--one", choices=["stage", "loop"], help=argparse.SUPPRESS)  # a child run
    parser.add_argument("overrides", nargs="*", help="evaluate config overrides, e.g. num_gpus_per_actor=1")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(stage_once(args) if args.one == "stage" else loop_once(args)))
        return 0

    with tempfile.TemporaryDirectory() as work:
        args.work = args.work or work
        _prepare(args)
        runs = {"stage": [], "loop": []}
        for repeat in range(args.repeats):
            for kind in ("stage", "loop"):
                cmd = [sys.executable, __file__, "--one", kind, "--model", args.model, "--benchmark", args.benchmark,
                       "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens),
                       "--batch-size", str(args.batch_size), "--cpus", str(args.cpus), *args.overrides]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)  # noqa: E741
                if line is None:
                    print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{kind} run {repeat} failed")
                runs[kind].append(json.loads(line[len("RESULT "):]))
                print(f"run {repeat} {kind}: {runs[kind][-1]}")

    def median(kind, key):
        values = [r[key] for r in runs[kind] if r[key] is not None]
        return statistics.median(values) if values else None

    result = {"samples": args.samples, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "repeats": args.repeats, "runs": runs}
    rows = []
    for key in ("samples_per_s", "steady_samples_per_s"):
        stage, loop = median("stage", key), median("loop", key)
        ratio = stage / loop if stage and loop else None
        result[key] = {"stage": stage, "hf_loop": loop, "ratio": ratio}
        spread = {k: (min(r[key] for r in runs[k]), max(r[key] for r in runs[k]))
                  for k in runs if all(r[key] is not None for r in runs[k])}
        rows.append((key, stage, loop, ratio, spread))
    print(f"\n{'rate (questions/s, median)':<28} {'stage':>8} {'HF loop':>8} {'ratio':>6}   spread (min-max)")
    for key, stage, loop, ratio, spread in rows:
        print(f"{key:<28} {stage or 0:>8.3f} {loop or 0:>8.3f} {ratio or 0:>6.2f}   "
              + ", ".join(f"{k} {a:.3f}-{b:.3f}" for k, (a, b) in spread.items()))
    write_result("evaluate", args.device, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
