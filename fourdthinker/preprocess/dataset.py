"""The preprocess stage as a lazy Ray Data plan: decode (CPU tasks) -> segment (autoscaling actor
pool, GPUs on a cluster) -> label + QA (CPU actors)."""

from __future__ import annotations

from fourdthinker.actors.segmenter import SegmentClips
from fourdthinker.preprocess.annotate import ClipAnnotator
from fourdthinker.preprocess.config import PreprocessConfig
from fourdthinker.preprocess.frames import extract_frames


def segmented_clips(cfg: PreprocessConfig, rows: list[dict]):
    """Index rows -> frames on disk -> masks per concept (the GPU-heavy part, benchmarked alone)."""
    import ray.data

    seg = cfg.segmenter
    return (
        ray.data.from_items(rows)
        .map(extract_frames, fn_kwargs={"cfg": cfg}, num_cpus=cfg.decode_cpus)
        .map_batches(SegmentClips, fn_constructor_kwargs={"cfg": cfg}, batch_size=seg.batch_size,
                     batch_format="pandas", num_gpus=seg.num_gpus_per_actor, num_cpus=seg.num_cpus_per_actor,
                     compute=ray.data.ActorPoolStrategy(min_size=seg.min_actors, max_size=seg.max_actors))
    )


def annotated_clips(cfg: PreprocessConfig, rows: list[dict]):
    """The whole plan; consuming it processes and records every clip (results written as they finish)."""
    import ray.data

    writers = cfg.llm.max_concurrency if cfg.llm.base_url else 1
    return segmented_clips(cfg, rows).map(ClipAnnotator, fn_constructor_kwargs={"cfg": cfg}, num_cpus=1,
                                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=writers))
