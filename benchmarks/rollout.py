"""Rollout throughput: HF reference latent generation vs vLLM with the latent plugin vs plain vLLM.

Same model, same prompts (random token ids of a fixed length), same batch, fixed output length
(greedy, eos ignored). The latent engines enter a latent block every `--latent-every` output steps,
so a fair share of the decode steps feed hidden states back. Each engine runs in its own process
(GPU memory is returned between them). Prints a table and writes JSON.

    python benchmarks/rollout.py --model runs/tiny-model                       # CPU, tiny model
    python benchmarks/rollout.py --model /tmp/qwen3b --prompts 64 --prompt-tokens 256 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from report import write_result  # benchmarks/report.py (scripts run from benchmarks/)

ENGINES = ("hf", "plugin", "plain")
# plain vLLM and the plugin on the V1 model runner (the one a custom logits processor selects; the
# plugin's runner on CPU): the runner's share of a plugin-vs-plain gap
EXTRA_ENGINES = ("plain_v1", "plugin_v1")


def _prompts(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    """Random ordinary (non-special) token ids."""
    import numpy as np

    special = set(tokenizer.all_special_ids)
    ordinary = np.array([i for i in range(len(tokenizer)) if i not in special])
    return np.random.default_rng(seed).choice(ordinary, size=(n, length)).tolist()


def _force_steps(new_tokens: int, every: int, latent_size: int) -> list[int]:
    # Enter a block every `every` steps; a block spans latent_size + 2 tokens.
    return list(range(every // 2, new_tokens - latent_size - 2, every)) if every > 0 else []


def run_engine(engine: str, args) -> dict:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from fourdthinker.tokens import LatentIds

    ids = LatentIds.from_config(AutoConfig.from_pretrained(args.model, local_files_only=True))
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    prompts = _prompts(tokenizer, args.prompts, args.prompt_tokens, args.seed)
    latent = engine.startswith("plugin")
    force = _force_steps(args.new_tokens, args.latent_every, ids.latent_size) if latent or engine == "hf" else []
    cuda = torch.cuda.is_available()

    if engine == "hf":
        from fourdthinker.model import generate_latent, load_model

        model = load_model(args.model, torch.bfloat16 if cuda else torch.float32,
                           attn_implementation="sdpa").to("cuda" if cuda else "cpu").eval()
        device = next(model.parameters()).device
        inputs = {"input_ids": torch.tensor(prompts, device=device),
                  "attention_mask": torch.ones(len(prompts), args.prompt_tokens, dtype=torch.long, device=device)}
        generate_latent(model, {k: v[:2] for k, v in inputs.items()}, ids, 4)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate_latent(model, inputs, ids, args.new_tokens, eos_token_ids=[],
                              forced_latent_steps=[force] * len(prompts))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tokens = sum(len(s) for s in out.sequences)
        latents = sum(int(x.shape[0]) for x in out.latents)
        repeats = [seconds]
    else:
        from vllm import SamplingParams

        from fourdthinker.vllm_plugin.engine import make_llm

        if engine == "plain_v1":
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        profiler = {}
        if args.profile_dir:  # torch profiler traces of the engine's worker (vLLM's own profiler)
            profiler = {"profiler_config": {"profiler": "torch", "torch_profiler_with_stack": False, "ignore_frontend": True,
                                            "torch_profiler_dir": os.path.abspath(os.path.join(args.profile_dir, engine))}}
        llm = make_llm(args.model, latent=latent, max_model_len=args.prompt_tokens + args.new_tokens + 64,
                       max_num_seqs=args.prompts, enforce_eager=not cuda, runner="v1" if engine == "plugin_v1" else None,
                       **profiler)
        def params(i: int) -> SamplingParams:
            extra = {"latent_key": f"b{i}", "latent_force_steps": force} if latent else None
            return SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                                  extra_args=extra)
        batch = [{"prompt_token_ids": p} for p in prompts]
        llm.generate(batch[:2], [params(i) for i in range(2)], use_tqdm=False)  # warm-up
        if latent:
            llm.collective_rpc("latent_pop", args=([f"b{i}" for i in range(2)],))
        runs = []  # (seconds, pop seconds) of each repeat; the median one is reported
        for _ in range(args.repeats):
            llm.reset_prefix_cache()  # every repeat prefills its prompts, as the first does
            t0 = time.perf_counter()
            outs = llm.generate(batch, [params(i) for i in range(len(batch))], use_tqdm=False)
            generated = time.perf_counter()
            latents = 0
            if latent:  # handing the vectors out is part of a rollout's cost
                popped = llm.collective_rpc("latent_pop", args=([f"b{i}" for i in range(len(batch))],))[0]
                latents = sum(popped["counts"])
            runs.append((time.perf_counter() - t0, time.perf_counter() - generated))
        seconds, pop_s = sorted(runs)[len(runs) // 2]
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        if args.profile_dir:  # a shorter run of the same batch under the profiler, after the timed one
            short = [params(i) for i in range(len(batch))]
            for p in short:
                p.max_tokens = min(args.new_tokens, args.profile_tokens)
            llm.start_profile()
            llm.generate(batch, short, use_tqdm=False)
            llm.stop_profile()
        repeats = [r[0] for r in runs]
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    return {"engine": engine, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "latent_slots": latents, "pop_s": pop_s if latent else 0.0, "device": device_name,
            "seconds_of_repeats": repeats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--latent-every", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per vLLM engine; the median is reported")
    parser.add_argument("--engines", nargs="+", default=[",".join(ENGINES)],
                        help="engines, comma- or space-separated (figures.sh turns commas into spaces)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/rollout-<device>.json)")
    parser.add_argument("--profile-dir", help="also profile a short run of each vLLM engine (torch traces here)")
    parser.add_argument("--profile-tokens", type=int, default=64, help="new tokens of the profiled run")
    parser.add_argument("--engine", choices=ENGINES + EXTRA_ENGINES, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()

    if args.engine:
        print("RESULT " + json.dumps(run_engine(args.engine, args)), flush=True)
        return 0

    rows = []
    for engine in [e for item in args.engines for e in item.split(",") if e]:
        if engine not in ENGINES + EXTRA_ENGINES:
            raise SystemExit(f"--engines: {engine!r} is none of {ENGINES + EXTRA_ENGINES}")
        cmd = [sys.executable, __file__, "--engine", engine] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"engine {engine} failed (exit {proc.returncode})")
        rows.append(json.loads(line[-1][7:]))
    by = {r["engine"]: r for r in rows}
    print(f"\nrollout throughput: {args.prompts} prompts x ({args.prompt_tokens} prompt + {args.new_tokens} new) "
          f"tokens, greedy, latent block every {args.latent_every} steps; device {rows[0]['device']}")
    print(f"{'engine':<9} {'tokens/s':>12} {'seconds':>9} {'of which pop':>13} {'latent slots':>13}")
    for r in rows:
        print(f"{r['engine']:<9} {r['tokens_per_s']:>12.1f} {r['seconds']:>9.2f} {r['pop_s']:>13.3f} "
              f"{r['latent_slots']:>13}")
    summary = {}
    if "hf" in by and "plugin" in by:
        summary["plugin_vs_hf"] = by["plugin"]["tokens_per_s"] / by["hf"]["tokens_per_s"]
    if "plain" in by and "plugin" in by:
        summary["plugin_vs_plain"] = by["plugin"]["tokens_per_s"] / by["plain"]["tokens_per_s"]
    for k, v in summary.items():
        print(f"{k}: {v:.2f}x")
    write_result("rollout", rows[0]["device"], {"args": {k: v for k, v in vars(args).items() if k != "engine"},
                                                "results": rows, "summary": summary}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
