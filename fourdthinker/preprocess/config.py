"""The preprocess stage's config: one typed object loaded from `configs/*/preprocess.yaml`.

Defaults are the production ones (real SpatialVID clips, SAM3 on GPU); the tiny preset overrides
what CPU tests and the demo need. Unknown keys and bad values fail at load (see `fourdthinker.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from fourdthinker.config import ConfigError, check_named_resources
from fourdthinker.data.video import MAX_FRAMES, MAX_PIXELS, VIDEO_FPS

SegmenterBackend = Literal["sam3", "transformers", "ground_truth"]

# An offline concept vocabulary for real footage: things that commonly move or anchor a scene.
DEFAULT_CONCEPTS = ["person", "car", "bicycle", "motorcycle", "bus", "truck", "dog", "cat", "horse",
                    "bird", "boat", "train", "building", "tree", "traffic light", "bench"]


@dataclass
class SegmenterConfig:
    """Which segmenter backend runs in the actor pool, and its settings."""

    backend: SegmenterBackend = "sam3"
    # sam3: a local checkpoint file ("" = random weights at real size, for benchmarks only).
    checkpoint: str = ""
    # sam3: CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz), which the PyPI wheel does not ship.
    # "" = the package's own copy (source checkouts) with a checkpoint; a byte-level stand-in without.
    bpe_path: str = ""
    # transformers: a local dir holding a saved `Sam3Model` and `Sam3Processor` ("" = build a
    # random model of `transformers_size`, for tests and the demo).
    model_dir: str = ""
    transformers_size: Literal["tiny"] = "tiny"
    # ground_truth: a synthetic world root ("" = the stage's input_root).
    world_root: str = ""
    score_threshold: float = 0.5  # detections below this score are not the prompted object
    device: str = ""  # "" = cuda for sam3, cpu for transformers
    num_gpus_per_actor: float = 1.0
    num_cpus_per_actor: float = 1.0
    # Named Ray resources each actor also asks for, e.g. {"accelerator_type:L40S": 0.001} to run on
    # one cluster worker type (cluster.yaml declares the names its node types offer).
    resources: dict[str, float] = field(default_factory=dict)
    min_actors: int = 1
    max_actors: int = 4
    batch_size: int = 1  # clips per segmenter call


@dataclass
class LlmConfig:
    """An OpenAI-compatible endpoint for object naming, overlay checks and QA writing.

    base_url "" = offline: every clip is segmented with the `concepts` vocabulary, overlays are not
    checked, and the template writer writes the questions. The flags below act only with a base_url.
    """

    base_url: str = ""
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    max_retries: int = 3
    timeout_s: float = 60.0
    # Name each clip's dynamic and static object from its frames and segment with those names
    # (the `concepts` vocabulary stays the fallback for clips whose naming reply is unusable).
    name_objects: bool = True
    # Ask, per question, whether every mental-image overlay shows the same object; NO drops it.
    check_overlays: bool = True

    @property
    def names_objects(self) -> bool:
        """Whether the preprocess plan runs the object-naming stage."""
        return bool(self.base_url) and self.name_objects


@dataclass
class PreprocessConfig:
    # Made absolute before Ray starts; refused when relative under a Ray job (fourdthinker.paths).
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("input_root", "output_dir", "segmenter.checkpoint", "segmenter.bpe_path",
                                            "segmenter.model_dir", "segmenter.world_root")

    input_root: str = ""  # a SpatialVID-style root: videos/, annotations/, SpatialVID_metadata.csv
    output_dir: str = "runs/preprocess"
    fps: float = VIDEO_FPS  # frames extracted per second of video
    max_frames: int = MAX_FRAMES  # clips are sampled evenly down to this many frames
    min_frames: int = 4  # clips yielding fewer frames are dropped (too short to label motion)
    max_pixels: int = MAX_PIXELS
    min_duration_s: float = 0.0
    max_duration_s: float = 0.0  # 0 = no upper bound
    groups: list[str] = field(default_factory=list)  # [] = every group
    max_clips: int = 0  # 0 = all clips (after filters); useful for smoke runs
    duration_edges_s: list[float] = field(default_factory=lambda: [5.0, 10.0, 20.0, 40.0])
    resolution_edges_px: list[int] = field(default_factory=lambda: [640 * 360, 1280 * 720, 1920 * 1080])
    fps_tolerance: float = 0.01  # relative mismatch between CSV fps and the stream's before a drop
    concepts: list[str] = field(default_factory=lambda: list(DEFAULT_CONCEPTS))
    min_visible_fraction: float = 0.5  # a track must be found in this share of frames to be an object
    max_objects: int = 6  # most objects kept per clip (highest scores first)
    object_size_m: float = 1.0  # prior object size (sqrt of cross-section) for depth from mask area
    camera_rule: Literal["geometric", "spatialvid"] = "geometric"  # when instructions.json is absent
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    decode_cpus: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if not self.input_root:
            raise ConfigError("input_root: required (a SpatialVID-style root with SpatialVID_metadata.csv)")
        if self.fps <= 0:
            raise ConfigError(f"fps: must be positive, got {self.fps}")
        for name in ("max_frames", "min_frames", "max_objects"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.min_frames > self.max_frames:
            raise ConfigError(f"min_frames ({self.min_frames}) exceeds max_frames ({self.max_frames})")
        if self.max_duration_s and self.max_duration_s < self.min_duration_s:
            raise ConfigError(f"max_duration_s ({self.max_duration_s}) is below min_duration_s "
                              f"({self.min_duration_s}); use 0 for no upper bound")
        for name in ("duration_edges_s", "resolution_edges_px"):
            edges = getattr(self, name)
            if any(b <= a for a, b in zip(edges, edges[1:])):
                raise ConfigError(f"{name}: must be strictly increasing, got {edges}")
        if not self.concepts and not self.llm.names_objects:
            raise ConfigError("concepts: empty; list the object concepts to segment, or configure llm.base_url "
                              "with llm.name_objects: true")
        if not 0.0 < self.min_visible_fraction <= 1.0:
            raise ConfigError(f"min_visible_fraction: must be in (0, 1], got {self.min_visible_fraction}")
        if self.object_size_m <= 0:
            raise ConfigError(f"object_size_m: must be positive, got {self.object_size_m}")
        seg = self.segmenter
        if not 1 <= seg.min_actors <= seg.max_actors:
            raise ConfigError(f"segmenter.min_actors/max_actors: need 1 <= min <= max, got "
                              f"{seg.min_actors}/{seg.max_actors}")
        if seg.batch_size < 1:
            raise ConfigError(f"segmenter.batch_size: must be >= 1, got {seg.batch_size}")
        if seg.num_gpus_per_actor < 0 or seg.num_cpus_per_actor < 0:
            raise ConfigError("segmenter.num_gpus_per_actor/num_cpus_per_actor: must be >= 0")
        check_named_resources("segmenter.resources", seg.resources)
        if seg.backend == "sam3" and seg.num_gpus_per_actor <= 0:
            raise ConfigError("segmenter.backend=sam3 runs on GPU only: set num_gpus_per_actor > 0 "
                              "or use backend=transformers on CPU")

    def check_inputs(self) -> None:
        """The input root exists (on the driver, before Ray starts)."""
        from fourdthinker.data.spatialvid import METADATA_CSV

        if not (Path(self.input_root) / METADATA_CSV).is_file():
            what = "does not exist" if not Path(self.input_root).exists() else f"has no {METADATA_CSV}"
            raise ConfigError(f"input_root={self.input_root}: {what}; point it at a SpatialVID-style root, or "
                              "build the synthetic one first: fourdthinker synth --out runs/world")
