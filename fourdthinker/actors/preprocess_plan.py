"""The preprocess stage as a lazy Ray Data plan: decode (CPU tasks) -> object naming (CPU actors, only
with an LLM) -> segment (autoscaling actor pool, GPUs on a cluster) -> label + QA (CPU actors).

Segmenter batches never mix buckets (clips of one duration x resolution bucket batch well on a GPU):
the plan's input blocks are the index rows cut into runs of one bucket and at most
`segmenter.batch_size` rows, the per-row stages before segmentation map block to block, and the
segment stage takes each block as one batch. No shuffle is needed, so decode and segmentation stream.
"""

from __future__ import annotations

from itertools import groupby

from fourdthinker.actors.segmenter import SegmentClips
from fourdthinker.preprocess.annotate import ClipAnnotator, make_llm_writer
from fourdthinker.preprocess.config import PreprocessConfig
from fourdthinker.preprocess.frames import extract_frames
from fourdthinker.preprocess.index import STATUS_OK

CONCEPTS_FROM_LLM = "llm"
CONCEPTS_FROM_VOCABULARY = "vocabulary"


def segment_batches(rows: list[dict], batch_size: int) -> list[list[dict]]:
    """Consecutive rows cut into batches of at most `batch_size` rows of a single bucket (the index
    orders rows by bucket, so each bucket is one run)."""
    batches = []
    for _, run in groupby(rows, key=lambda row: row["bucket"]):
        run = list(run)
        batches += [run[start:start + batch_size] for start in range(0, len(run), batch_size)]
    return batches


class NameObjects:
    """Ray Data callable class for `map`: an LLM names each decoded clip's dynamic and static object
    (one request with frames spread over the clip) and those names prompt the clip's segmentation.

    Adds `concepts` (the prompts), `concepts_source` ("llm" or "vocabulary") and `concepts_note` (why
    the vocabulary was used: the reply was unusable, the endpoint failed, or it named no object).
    Holds one writer per actor: its client, connection pool and reply cache serve every row.
    """

    def __init__(self, cfg: PreprocessConfig):
        self.vocabulary = list(cfg.concepts)
        self.writer = make_llm_writer(cfg)

    def __call__(self, row: dict) -> dict:
        if row["status"] != STATUS_OK:
            return {**row, "concepts": [], "concepts_source": "", "concepts_note": ""}
        try:
            names = self.writer.name_objects(list(row["frame_paths"]))
        except Exception as err:  # one clip's naming failure falls back to the vocabulary, never stops the job
            return {**row, "concepts": self.vocabulary, "concepts_source": CONCEPTS_FROM_VOCABULARY,
                    "concepts_note": f"object naming failed: {type(err).__name__}: {err}"}
        if names.concepts:
            return {**row, "concepts": names.concepts, "concepts_source": CONCEPTS_FROM_LLM, "concepts_note": ""}
        return {**row, "concepts": self.vocabulary, "concepts_source": CONCEPTS_FROM_VOCABULARY,
                "concepts_note": f"object naming: {names.reason or 'the LLM named no object'}"}


def _llm_pool_size(cfg: PreprocessConfig) -> int:
    """Actors of the LLM-bound stages: one per request slot online, a single one offline."""
    return cfg.llm.max_concurrency if cfg.llm.base_url else 1


def segmented_clips(cfg: PreprocessConfig, rows: list[dict]):
    """Index rows -> frames on disk -> [names per clip] -> masks per concept (the GPU-heavy part,
    benchmarked alone)."""
    import pyarrow as pa
    import ray.data

    seg = cfg.segmenter
    # One block per segmenter batch, cut at bucket boundaries; Ray Data may still fill a batch from
    # two blocks (it requires a row count per batch on GPUs), so SegmentClips splits by bucket too.
    blocks = [pa.Table.from_pylist(batch) for batch in segment_batches(rows, seg.batch_size)]
    clips = ray.data.from_arrow(blocks).map(extract_frames, fn_kwargs={"cfg": cfg}, num_cpus=cfg.decode_cpus)
    if cfg.llm.names_objects:
        clips = clips.map(NameObjects, fn_constructor_kwargs={"cfg": cfg}, num_cpus=1,
                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_llm_pool_size(cfg)))
    return clips.map_batches(SegmentClips, fn_constructor_kwargs={"cfg": cfg}, batch_size=seg.batch_size,
                             batch_format="pandas", num_gpus=seg.num_gpus_per_actor,
                             num_cpus=seg.num_cpus_per_actor, resources=dict(seg.resources),
                             compute=ray.data.ActorPoolStrategy(min_size=seg.min_actors, max_size=seg.max_actors))


def annotated_clips(cfg: PreprocessConfig, rows: list[dict]):
    """The whole plan; consuming it processes and records every clip (results written as they finish)."""
    import ray.data

    return segmented_clips(cfg, rows).map(
        ClipAnnotator, fn_constructor_kwargs={"cfg": cfg}, num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_llm_pool_size(cfg)))
