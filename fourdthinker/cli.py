"""The `fourdthinker` command line: one subcommand per tool; stages live in `pipelines/`.

Bad arguments exit with code 2 and a message that names the argument and the fix.
"""

from __future__ import annotations

import argparse
import sys

from fourdthinker.errors import UsageError


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {value}")
        return value

    return parse


def _cmd_tiny_model(args) -> int:
    import torch

    from fourdthinker.tiny_model import SHAPES, build_tiny_model, weights_digest

    big = args.shape != "tiny"
    out = build_tiny_model(args.out, seed=args.seed, latent_size=args.latent_size, overwrite=args.overwrite,
                           shape=SHAPES[args.shape], dtype=torch.bfloat16 if big else torch.float32,
                           device="cuda" if big and torch.cuda.is_available() else "cpu")
    digest = "" if big else f" (weights sha256 {weights_digest(out)[:16]})"
    print(f"random Qwen2.5-VL ({args.shape} shape) written to {out}{digest}")
    return 0


def _cmd_synth(args) -> int:
    from fourdthinker.data.synth import SynthConfig, build_world

    cfg = SynthConfig(videos=args.videos, seed=args.seed, width=args.width, height=args.height,
                      seconds=args.seconds, fps=args.fps)
    summary = build_world(args.out, cfg, overwrite=args.overwrite)
    print(summary)
    return 0


def _cmd_infer(args) -> int:
    import json
    import os

    if args.json:  # vLLM logs to stdout unless told not to configure logging
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    from fourdthinker.infer import format_result, infer_local, infer_remote

    common = dict(video=args.video, question=args.question, options=args.options, max_tokens=args.max_tokens,
                  show_latents=args.show_latents, force_latent_steps=args.force_latent_steps)
    if args.url:
        result = infer_remote(args.url, model=args.served_model,
                              api_key=os.environ.get(args.api_key_env) if args.api_key_env else None, **common)
    else:
        if not args.model:
            raise UsageError("--model DIR is required (or --url URL of a running server)")
        result = infer_local(args.model, max_model_len=args.max_model_len, **common)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_result(result))
    return 0


def _cmd_eval_report(args) -> int:
    from fourdthinker.eval_report import rebuild_report

    table, table_path, chart_path = rebuild_report(args.run_dirs, args.out, not args.no_published)
    print(table)
    print(f"written: {table_path}, {chart_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourdthinker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="build a tiny random Qwen2.5-VL with latent tokens, offline")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-size", type=_positive("--latent-size"), default=4)
    p.add_argument("--shape", choices=["tiny", "3b"], default="tiny",
                   help="tiny (fp32, tests) or the Qwen2.5-VL-3B shape (bf16, random weights, benchmarks)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_tiny_model)

    p = sub.add_parser("synth", help="render a synthetic 4D world in the SpatialVID layout")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--videos", type=_positive("--videos"), default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=_positive("--width"), default=224)
    p.add_argument("--height", type=_positive("--height"), default=168)
    p.add_argument("--seconds", type=_positive("--seconds"), default=6)
    p.add_argument("--fps", type=_positive("--fps"), default=5)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("infer", help="ask a checkpoint one question about one video (in-process or --url)")
    p.add_argument("--model", help="checkpoint directory (in-process engine, latent decoding on)")
    p.add_argument("--url", help="a running `serve` app instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--served-model", help="with --url: the model id (default: the server's first)")
    p.add_argument("--api-key-env", default="FOURDTHINKER_API_TOKEN",
                   help="with --url: env var holding the bearer token, if the server wants one")
    p.add_argument("--video", required=True, help="a video file (sampled at 1 fps like training)")
    p.add_argument("--question", required=True)
    p.add_argument("--options", nargs="+", help="answer options (lettered A, B, ... unless they carry letters)")
    p.add_argument("--max-tokens", type=_positive("--max-tokens"), default=512)
    p.add_argument("--max-model-len", type=_positive("--max-model-len"), default=4096)
    p.add_argument("--show-latents", metavar="PNG", help="write a contact sheet of each latent block's nearest patches")
    p.add_argument("--force-latent-steps", type=int, nargs="+", default=[],
                   help="probe: output steps at which a latent block is forced to start")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser("eval-report", help="rebuild the DSR comparison table and chart from evaluation runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="output_dir of pipelines/evaluate.py (or one model's directory in it)")
    p.add_argument("--out", help="where comparison.md/.png go (default: the first RUN_DIR)")
    p.add_argument("--no-published", action="store_true", help="leave out the published DIFT/4DRL rows")
    p.set_defaults(func=_cmd_eval_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"fourdthinker {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
