"""Evaluate stage: DSR benchmark accuracy of one or more checkpoints, compared in one table and chart.

    python pipelines/evaluate.py --config configs/tiny/evaluate.yaml --model runs/demo/tiny-model
    python pipelines/evaluate.py --config configs/3b/evaluate.yaml --model dift=/ckpt/dift --model 4drl=/ckpt/4drl
    ray job submit --working-dir . -- python pipelines/evaluate.py --config configs/3b/evaluate.yaml models=[...]

One Ray Data job: the videos still needed by any model are decoded once (CPU tasks) and kept for all
models; per model, its pending questions go through an actor pool of its engine (vLLM with latent
decoding), each batch's results stored as it finishes. Re-running on the same output_dir resumes:
answered questions are not generated again. Then per model the summary (reference schema), per-sample
JSONL and skip reasons; for all models a Markdown table and a bar chart per sub-task.
"""

from __future__ import annotations

import time

from fourdthinker.actors.evaluator import decoded_videos, run_model
from fourdthinker.cluster import run_stage
from fourdthinker.eval_config import EvaluateConfig, argv_with_models
from fourdthinker.eval_report import write_comparison
from fourdthinker.evaluation import (
    Benchmark,
    check_models,
    finished_records,
    group_by_video,
    model_records,
    summary_line,
    write_model_results,
    write_run_info,
)


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate every model of `cfg`; returns the run's record (also written to run.json)."""
    started = time.perf_counter()
    models = check_models(cfg)
    bench = Benchmark(cfg)
    evaluable = bench.evaluable()
    pending = {}
    for model in models:
        done = finished_records(cfg.output_dir, model, cfg.engine)
        pending[model.name] = [bench.sample_row(key, item) for key, item in evaluable if key not in done]
        print(f"evaluate: {model.name}: {len(bench.items)} questions, {len(bench.skip_reasons)} skipped before "
              f"decoding, {len(evaluable) - len(pending[model.name])} already answered, "
              f"{len(pending[model.name])} to answer")
    needed = group_by_video(row for rows in pending.values() for row in rows)
    videos, decodes = None, []
    if needed:
        videos = decoded_videos(cfg, needed)
        decodes = videos.select_columns(["video_id", "decode_id", "decode_error"]).take_all()
    decode_errors = {d["video_id"]: d["decode_error"] for d in decodes if d["decode_error"]}

    info = {"benchmark": cfg.benchmark, "engine": cfg.engine, "questions": len(bench.items),
            "videos_decoded": len(decodes), "decode_errors": decode_errors, "models": {}}
    summaries = {}
    for model in models:
        answered, wall = run_model(cfg, model, videos, group_by_video(pending[model.name])) \
            if pending[model.name] else ([], 0.0)
        records = model_records(bench, finished_records(cfg.output_dir, model, cfg.engine), decode_errors)
        summaries[model.name] = write_model_results(cfg.output_dir, model, records)
        info["models"][model.name] = {
            "path": model.path, "answered_this_run": len(answered), "answer_wall_s": wall,
            "decode_ids": sorted({row["decode_id"] for row in answered}),
            "samples_per_s": len(answered) / wall if wall else None}
    table, _, chart = write_comparison(summaries, cfg.output_dir, cfg.compare_published)
    info["wall_s"] = time.perf_counter() - started
    write_run_info(cfg.output_dir, info)
    print(table)
    for model in models:
        print("evaluate: " + summary_line(model.name, summaries[model.name],
                                          info["models"][model.name]["answered_this_run"]))
    print(f"evaluate: outputs in {cfg.output_dir} (chart {chart.name})")
    return {**info, "summaries": summaries}


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = argv_with_models(sys.argv[1:] if argv is None else argv)  # --model A --model B: models=[A, B]
    return run_stage("evaluate", EvaluateConfig, __doc__, argv, lambda cfg: run(cfg) and 0)


if __name__ == "__main__":
    raise SystemExit(main())
