"""The whole product end to end on the embedded default: tiny model, synthetic videos, a local Ray.

  1. tiny model     an offline random Qwen2.5-VL with the latent tokens
  2. worlds         a synthetic 4D training world and a held-out one (SpatialVID layout + DSR benchmark)
  3. preprocess     Ray Data: frames, masks, camera/object labels, QA with mental images -> JSONL
  4. dift           Ray Train + DeepSpeed ZeRO-2 -> HF checkpoint
  5. 4drl           GRPO: vLLM rollout actors + DeepSpeed learners -> HF checkpoint
  6. evaluate       base vs DIFT vs 4DRL on the held-out world's DSR benchmark: table + chart
  7. serve          the 4DRL model behind Ray Serve; one OpenAI chat request with a video; latent PNG

    python pipelines/demo.py --out runs/demo [--videos 8] [--seed 0] [--fresh]

One run directory; a second run reuses every finished stage (`--fresh` starts over). The screen shows
a line, a bar and a summary per stage; what Ray, vLLM and DeepSpeed print goes to `<out>/logs/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(ROOT))  # serve/ (the Serve app) lives at the repository root

CONFIGS = ROOT / "configs" / "tiny"
DIFT_STEPS, GRPO_STEPS = 6, 2
QUESTION = "How does the camera move in this clip?"
OPTIONS = ["Pan Left", "Pan Right", "Dolly In", "Dolly Out"]


@dataclass
class RunDirs:
    """Where each stage of one demo run reads and writes (every stage reads the previous one's files)."""

    out: Path

    def __post_init__(self):
        o = self.out
        self.model, self.world, self.heldout = o / "tiny-model", o / "world", o / "world-heldout"
        self.prep, self.dift, self.grpo, self.eval = o / "preprocess", o / "dift", o / "grpo", o / "evaluate"
        self.grpo_run = self.grpo / "grpo-tiny"


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(rc: int, stage: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{stage} exited with code {rc}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run directory (reused: finished stages are kept)")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete the run directory first")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    from fourdthinker.console import StageFailed, StageScreen

    screen = StageScreen(out / "logs", stages=7)
    screen.say(f"fourdthinker demo -> {out}")
    # Engines of this demo log warnings and errors only; Ray's workers keep their output in its logs.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        artifacts = run(args, out, screen)
    except StageFailed as err:
        screen.say(f"\ndemo stopped: {err}")
        return 1
    screen.say("\ndemo finished. Artifacts:")
    width = max(len(k) for k in artifacts)
    for name, path in artifacts.items():
        screen.say(f"  {name:<{width}}  {path}")
    screen.say(f"  {'logs':<{width}}  {out / 'logs'}")
    return 0


def run(args, out: Path, screen) -> dict[str, Path]:
    import ray

    d = RunDirs(out)
    name = "tiny model"
    with screen.stage(name):
        from fourdthinker.tiny_model import build_tiny_model

        if not (d.model / "config.json").exists():
            build_tiny_model(d.model, seed=args.seed)
    screen.done(name, f"random Qwen2.5-VL with latent tokens: {d.model}")

    name = "synthetic 4D worlds (training + held-out)"
    with screen.stage(name):
        from fourdthinker.data.synth import SynthConfig, build_world

        for path, videos, seed in ((d.world, args.videos, args.seed),
                                   (d.heldout, max(2, args.videos // 2), args.seed + 1000)):
            if not (path / "dsr" / "benchmark.parquet").exists():
                build_world(path, SynthConfig(videos=videos, seed=seed), overwrite=True)
    screen.done(name, f"{args.videos} training clips in {d.world}; held-out: {_benchmark_size(d.heldout)} DSR "
                      f"questions in {d.heldout}")

    # One local Ray for every stage; workers' output stays in Ray's logs (not forwarded here), and the
    # Serve replica imports serve/ from the repository root.
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "VLLM_LOGGING_LEVEL": "WARNING",
                                       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}})
    try:
        train(args, d, screen)
        evaluate(d, screen)
        return serve_and_ask(d, screen)
    finally:
        ray.shutdown()


def _benchmark_size(world: Path) -> int:
    import pandas as pd

    return len(pd.read_parquet(world / "dsr" / "benchmark.parquet"))


def train(args, d: RunDirs, screen) -> None:
    import dift as dift_stage
    import grpo as grpo_stage
    import preprocess as preprocess_stage

    name = "preprocess (Ray Data)"
    with screen.stage(name, total=args.videos, count=lambda: len(list((d.prep / "clips").glob("*.json"))),
                      unit="clip"):
        if not (d.prep / "summary.json").exists():
            _check(preprocess_stage.main(["--config", str(CONFIGS / "preprocess.yaml"), f"input_root={d.world}",
                                          f"output_dir={d.prep}", f"seed={args.seed}"]), name)
    screen.done(name, f"{_lines(d.prep / 'dift.jsonl')} DIFT samples, {_lines(d.prep / 'rl.jsonl')} 4DRL prompts "
                      f"-> {d.prep}")

    name = "DIFT (Ray Train + DeepSpeed ZeRO-2)"
    metrics = d.dift / "dift-tiny" / "metrics.jsonl"
    with screen.stage(name, total=DIFT_STEPS, count=lambda: _lines(metrics), unit="step"):
        if not (d.dift / "final" / "config.json").exists():
            _check(dift_stage.main(["--config", str(CONFIGS / "dift.yaml"), f"model_dir={d.model}",
                                    f"train_jsonl={d.prep / 'dift.jsonl'}", f"output_dir={d.dift}",
                                    f"max_steps={DIFT_STEPS}", "cpus_per_worker=0.5", "progress_bar=false"]), name)
    log = [json.loads(line) for line in metrics.read_text().splitlines()]
    screen.done(name, f"{len(log)} steps: loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}, latent cosine "
                      f"{log[0]['cos']:.3f} -> {log[-1]['cos']:.3f}; model {d.dift / 'final'}")

    name = "4DRL (GRPO: vLLM rollout actors + DeepSpeed learners)"
    metrics = d.grpo_run / "metrics.jsonl"
    with screen.stage(name, total=GRPO_STEPS, count=lambda: _lines(metrics), unit="step"):
        if not (d.grpo_run / "final" / "config.json").exists():
            _check(grpo_stage.main(["--config", str(CONFIGS / "grpo.yaml"), f"model_dir={d.dift / 'final'}",
                                    f"train_jsonl={d.prep / 'rl.jsonl'}", f"output_dir={d.grpo}",
                                    f"max_steps={GRPO_STEPS}"]), name)
    log = [json.loads(line) for line in metrics.read_text().splitlines()]
    screen.done(name, f"{len(log)} steps: reward {log[-1]['reward/total/mean']:.3f}, rollout-vs-learner log-prob "
                      f"gap {max(m['logprob_gap/max'] for m in log):.1e}; model {d.grpo_run / 'final'}")


def evaluate(d: RunDirs, screen) -> None:
    import evaluate as evaluate_stage

    name = "evaluate (DSR on the held-out world: base vs DIFT vs 4DRL)"
    models = {"base": d.model, "dift": d.dift / "final", "4drl": d.grpo_run / "final"}

    def answered() -> int:
        return sum(_lines(p) for p in d.eval.glob("*/shards/*.jsonl"))

    with screen.stage(name, total=_benchmark_size(d.heldout) * len(models), count=answered, unit="answer"):
        argv = ["--config", str(CONFIGS / "evaluate.yaml"), f"benchmark={d.heldout / 'dsr' / 'benchmark.parquet'}",
                f"output_dir={d.eval}", "compare_published=false"]
        for key, path in models.items():
            argv += ["--model", f"{key}={path}"]
        _check(evaluate_stage.main(argv), name)
    accuracy = {key: json.loads((d.eval / key / "dsr_eval_summary.json").read_text())["accuracy"] for key in models}
    screen.done(name, "accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items())
                + f"; chart {d.eval / 'comparison.png'}")
    screen.say("\n" + (d.eval / "comparison.md").read_text().strip())


def serve_and_ask(d: RunDirs, screen) -> dict[str, Path]:
    name = "serve (Ray Serve, OpenAI chat API, latent decoding on)"
    sheet = d.out / "latents.png"
    with screen.stage(name):
        reply, note = _ask_served_model(d.grpo_run / "final", d.heldout, sheet)
    screen.done(name, f"answered over HTTP in {reply.seconds:.2f} s")
    screen.say(f"\n   Q: {QUESTION} ({', '.join(OPTIONS)})\n   A: " + reply.reply.strip().replace("\n", "\n      "))
    screen.say(f"   answer letter: {reply.answer or '(none)'}; {len(reply.latents)} latent block(s)"
               + (f"; {note}" if note else ""))
    return {"model (4DRL)": d.grpo_run / "final", "model (DIFT)": d.dift / "final", "training data": d.prep,
            "evaluation table": d.eval / "comparison.md", "evaluation chart": d.eval / "comparison.png",
            "latent viewer": sheet}


def _ask_served_model(model_dir: Path, world: Path, sheet: Path):
    """Start the Serve app on a free local port, ask one question about a held-out clip through the
    `openai` client, draw the latent blocks' nearest patches, stop the app."""
    from ray import serve

    from fourdthinker.config import load_config
    from fourdthinker.infer import infer_remote
    from fourdthinker.serve_config import ServeConfig
    from serve.app import build

    port = _free_port()
    cfg = load_config(ServeConfig, CONFIGS / "serve.yaml", [f"model_dir={model_dir}", f"port={port}"])
    video = sorted((world / "dsr" / "videos").glob("*.mp4"))[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build(cfg), name="fourdthinker", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        reply = infer_remote(url, video, QUESTION, OPTIONS, max_tokens=64)
        note = ""
        if not reply.latents:
            # A model trained for seconds seldom opens a latent block by itself: ask again with one
            # forced at the second step (the probe hook), so the viewer has a block to draw.
            note = "the model opened no latent block itself: this reply has one forced at step 1"
        return infer_remote(url, video, QUESTION, OPTIONS, max_tokens=64, show_latents=sheet,
                            force_latent_steps=[] if reply.latents else [1]), note
    finally:
        serve.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
