"""The evaluate stage as Ray Data plans: decode each needed video once (CPU tasks), kept in the object
store for every model; then per model, its pending questions joined with their frames -> an actor
pool of the model's answerer (vLLM with latent decoding on GPUs) that stores each batch's results as
it finishes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from fourdthinker.eval_config import EvaluateConfig, ModelSpec
from fourdthinker.eval_engines import make_answerer
from fourdthinker.evaluation import decode_video_row, samples_of_video, shard_record, video_rows, write_shard
from fourdthinker.generation import SamplingConfig

# Columns of an answered row that come back to the driver (the frames stay behind).
RESULT_COLUMNS = ("key", "video_id", "decode_id", "pred", "error", "num_tokens")


def sampling_of(cfg: EvaluateConfig) -> SamplingConfig:
    return SamplingConfig(n=1, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          seed=cfg.seed)


class AnswerQuestions:
    """Ray Data callable class for `map_batches`: one answerer (one engine) per actor; each batch's
    results are written to the model's shards before they are returned, so a killed run loses at
    most the batches in flight."""

    def __init__(self, cfg: EvaluateConfig, model: ModelSpec):
        self.cfg, self.model = cfg, model
        engine_kwargs = {"max_model_len": cfg.max_model_len, "max_num_seqs": cfg.batch_size,
                         "seed": cfg.seed, **cfg.engine_kwargs}
        self.answerer = make_answerer(cfg.engine, model.path, sampling_of(cfg), max_frames=cfg.max_frames,
                                      max_pixels=cfg.max_pixels, delay_s=cfg.stand_in_delay_s,
                                      force_latent_steps=cfg.force_latent_steps, engine_kwargs=engine_kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        columns = list(batch)
        rows = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
        answers = self.answerer.answer(rows)
        records = [shard_record(row, answer, self.model, self.cfg.engine) for row, answer in zip(rows, answers)]
        write_shard(self.cfg.output_dir, self.model, records)
        return {c: [r[c] for r in records] for c in RESULT_COLUMNS}


def decoded_videos(cfg: EvaluateConfig, samples_by_video: Mapping[str, Sequence[dict]]):
    """The needed videos decoded once and materialized: every model's plan reads these blocks from
    the object store (spilled to disk when large) instead of decoding again."""
    import ray.data

    rows = video_rows(samples_by_video)
    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows))).map(
        decode_video_row, fn_kwargs={"max_frames": cfg.max_frames, "max_pixels": cfg.max_pixels},
        num_cpus=cfg.decode_cpus).materialize()


def answered_questions(cfg: EvaluateConfig, model: ModelSpec, videos,
                       samples_by_video: Mapping[str, Sequence[dict]]):
    """One model's plan over the decoded videos: its pending questions -> the answerer pool."""
    import ray.data

    return videos.flat_map(samples_of_video, fn_kwargs={"samples_by_video": dict(samples_by_video)}).map_batches(
        AnswerQuestions, fn_constructor_kwargs={"cfg": cfg, "model": model}, batch_size=cfg.batch_size,
        num_gpus=cfg.num_gpus_per_actor, num_cpus=cfg.num_cpus_per_actor, resources=dict(cfg.actor_resources),
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors))


def run_model(cfg: EvaluateConfig, model: ModelSpec, videos, samples_by_video) -> tuple[list[dict], float]:
    """Answer a model's pending questions; returns the answered rows (as the driver saw them) and
    the wall time."""
    start = time.perf_counter()
    rows = list(answered_questions(cfg, model, videos, samples_by_video).iter_rows())
    return rows, time.perf_counter() - start
