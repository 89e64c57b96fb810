"""Preprocess stage: SpatialVID-style videos -> DIFT / 4DRL JSONL, a parquet manifest and a summary.

    python pipelines/preprocess.py --config configs/tiny/preprocess.yaml [key=value ...]
    ray job submit --working-dir . -- python pipelines/preprocess.py --config configs/3b/preprocess.yaml

One Ray Data job: index rows (bucketed) -> frame decode (CPU tasks) -> segmenter actor pool
(autoscaling, GPUs per actor from the config) -> labels + QA (CPU actors) -> per-clip results on disk.
Re-running resumes: finished clips are skipped and the final files are rebuilt from all results.
"""

from __future__ import annotations

from fourdthinker.actors.segmenter import SegmentClips
from fourdthinker.cluster import run_stage
from fourdthinker.preprocess.annotate import ClipAnnotator
from fourdthinker.preprocess.config import PreprocessConfig
from fourdthinker.preprocess.frames import extract_frames
from fourdthinker.preprocess.index import build_index
from fourdthinker.preprocess.manifest import summary_table, write_outputs


def build_dataset(cfg: PreprocessConfig, rows: list[dict]):
    """The lazy Ray Data plan over the index rows; consuming it processes and records every clip."""
    import ray.data

    seg = cfg.segmenter
    return (
        ray.data.from_items(rows)
        .map(extract_frames, fn_kwargs={"cfg": cfg}, num_cpus=cfg.decode_cpus)
        .map_batches(SegmentClips, fn_constructor_kwargs={"cfg": cfg}, batch_size=seg.batch_size,
                     batch_format="pandas", num_gpus=seg.num_gpus_per_actor, num_cpus=seg.num_cpus_per_actor,
                     compute=ray.data.ActorPoolStrategy(min_size=seg.min_actors, max_size=seg.max_actors))
        .map(ClipAnnotator, fn_constructor_kwargs={"cfg": cfg}, num_cpus=1,
             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.llm.max_concurrency if cfg.llm.base_url else 1))
    )


def run(cfg: PreprocessConfig) -> dict:
    """Process every unfinished clip, then write the outputs; returns the summary."""
    rows, counts = build_index(cfg)
    print(f"preprocess: {counts['listed']} clips listed, {counts['filtered']} filtered out, "
          f"{counts['finished']} already finished, {len(rows)} to process")
    if rows:
        for _ in build_dataset(cfg, rows).iter_rows():
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
