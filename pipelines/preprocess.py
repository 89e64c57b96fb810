"""Preprocess stage: SpatialVID-style videos -> DIFT / 4DRL JSONL, a parquet manifest and a summary.

    python pipelines/preprocess.py --config configs/tiny/preprocess.yaml [key=value ...]
    ray job submit --working-dir . -- python pipelines/preprocess.py --config configs/3b/preprocess.yaml

One Ray Data job: index rows (bucketed; segmenter batches never mix buckets) -> frame decode (CPU
tasks) -> [with an LLM: it names each clip's dynamic and static object, the segmentation prompts] ->
segmenter actor pool (autoscaling, GPUs per actor from the config) -> labels + QA (CPU actors; with an
LLM each question's overlays are checked to show one object, YES/NO) -> per-clip results on disk.
Re-running resumes: finished clips are skipped and the final files are rebuilt from all results.
"""

from __future__ import annotations

from fourdthinker.actors.preprocess_plan import annotated_clips
from fourdthinker.cluster import run_stage
from fourdthinker.preprocess.config import PreprocessConfig
from fourdthinker.preprocess.index import build_index
from fourdthinker.preprocess.manifest import summary_table, write_outputs


def run(cfg: PreprocessConfig) -> dict:
    """Process every unfinished clip, then write the outputs; returns the summary."""
    rows, counts = build_index(cfg)
    print(f"preprocess: {counts['listed']} clips listed, {counts['filtered']} filtered out, "
          f"{counts['finished']} already finished, {len(rows)} to process")
    if rows:
        for _ in annotated_clips(cfg, rows).iter_rows():
            pass  # each clip's result is written by the annotate stage as it finishes
    return write_outputs(cfg.output_dir)


def main(argv: list[str] | None = None) -> int:
    return run_stage("preprocess", PreprocessConfig, __doc__, argv, _run)


def _run(cfg: PreprocessConfig) -> int:
    summary = run(cfg)
    print(summary_table(summary))
    print(f"preprocess: outputs in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
