"""Serving throughput and latency: the Serve app over HTTP vs the same async engine called in-process.

The same video question (greedy, a fixed number of new tokens, eos ignored) is sent `--requests`
times at each concurrency level (at most that many in flight), `--repeats` times; the table shows
the median over repeats of requests/s and of the p50/p95 request latency. HTTP goes through the
`openai` client to a local Ray Serve app (one replica); in-process calls `AsyncLatentGenerator`
directly, so the difference is what HTTP, Serve's proxy and routing, and JSON cost. The two run
one after the other (each owns the machine while measured). Prints a table and writes JSON.

    python benchmarks/serving.py                             # CPU, a tiny random model built here
    python benchmarks/serving.py --model /ckpt --device H200 --new-tokens 128 --requests 128
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Which way does the camera pan?"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _level(call, requests: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one():
        async with gate:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*[one() for _ in range(requests)])
    wall = time.perf_counter() - start
    return {"rps": requests / wall, "p50_s": _percentile(latencies, 0.5), "p95_s": _percentile(latencies, 0.95)}


async def _measure(call, args) -> dict[int, dict]:
    await call()  # warm-up (prefix and encoder caches, allocator)
    out = {}
    for concurrency in args.concurrency:
        runs = [await _level(call, args.requests, concurrency) for _ in range(args.repeats)]
        out[concurrency] = {key: statistics.median(r[key] for r in runs) for key in runs[0]} | {
            "rps_runs": [r["rps"] for r in runs]}
    return out


def _clip(directory: Path) -> Path:
    import numpy as np

    from fourdthinker.data.synth.clip import encode_mp4

    path = directory / "clip.mp4"
    encode_mp4(path, np.random.default_rng(0).integers(0, 255, (12, 56, 84, 3), dtype=np.uint8), fps=4)
    return path


def run_http(args, media: Path) -> dict[int, dict]:
    import ray
    from openai import AsyncOpenAI
    from ray import serve

    from fourdthinker.config import load_config
    from fourdthinker.serve_config import ServeConfig
    from serve.app import build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}})
    cfg = load_config(ServeConfig, args.config, [f"model_dir={args.model}", f"media_root={media.parent}",
                                                 f"max_ongoing_requests={max(args.concurrency) * 2}", *args.overrides])
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(cfg), name="bench", route_prefix="/")
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": media.name}},
                                                 {"type": "text", "text": QUESTION}]}]

        async def main():
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

            async def call():
                reply = await client.chat.completions.create(
                    model=cfg.served_name, messages=messages, max_tokens=args.new_tokens, temperature=0.0,
                    extra_body={"ignore_eos": True})
                assert reply.usage.completion_tokens == args.new_tokens

            try:
                return await _measure(call, args)
            finally:
                await client.close()

        return asyncio.run(main())
    finally:
        serve.shutdown()
        ray.shutdown()


def run_inprocess(args, media: Path) -> dict[int, dict]:
    from fourdthinker.config import load_config
    from fourdthinker.generation import GenerationRequest, SamplingConfig
    from fourdthinker.prompts import question_prompt
    from fourdthinker.serve_config import ServeConfig
    from fourdthinker.vllm_plugin.async_generate import AsyncLatentGenerator

    cfg = load_config(ServeConfig, args.config, [f"model_dir={args.model}", *args.overrides])

    async def main():
        generator = await AsyncLatentGenerator.from_model_dir(
            args.model, max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs, **cfg.engine)
        try:
            sampling = SamplingConfig(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

            async def call():
                # what the server does per request: decode the clip, build the prompt, generate
                req = GenerationRequest(question_prompt(QUESTION), video_path=str(media))
                (c,) = await generator.generate(req, sampling)
                assert len(c.token_ids) == args.new_tokens, c.error

            return await _measure(call, args)
        finally:
            generator.shutdown()

    return asyncio.run(main())


def main() -> int:
    from report import write_result  # benchmarks/report.py (the script's own directory)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: a tiny random model built here)")
    parser.add_argument("--config", default=str(ROOT / "configs/tiny/serve.yaml"))
    parser.add_argument("--device", default="cpu-tiny", help="the results file's device tag")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32, help="requests per level and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/serve-<device>.json)")
    parser.add_argument("overrides", nargs="*", help="ServeConfig overrides for both paths, e.g. auth_token_env=")
    args = parser.parse_args()
    # The Serve app (serve/ at the repository root) is imported by Ray's workers from their working
    # directory, which they take from the driver's: run from the root, whoever started the script.
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from fourdthinker.tiny_model import build_tiny_model

            args.model = str(build_tiny_model(Path(tmp) / "tiny", seed=0))
        media = _clip(Path(tmp) / "media")
        results = {"http": run_http(args, media), "in_process": run_inprocess(args, media)}
    print(f"\n{'concurrency':>11} | {'path':>10} | {'req/s':>7} | {'p50 s':>7} | {'p95 s':>7}")
    for concurrency in args.concurrency:
        for path in ("http", "in_process"):
            r = results[path][concurrency]
            print(f"{concurrency:>11} | {path:>10} | {r['rps']:>7.2f} | {r['p50_s']:>7.3f} | {r['p95_s']:>7.3f}")
    write_result("serve", args.device, {
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "results": {path: {str(c): r for c, r in levels.items()} for path, levels in results.items()}}, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    raise SystemExit(main())
