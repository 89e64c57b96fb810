"""The evaluate stage's typed config (`configs/*/evaluate.yaml`) and the models it compares."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, ClassVar

from fourdthinker.config import ConfigError, check_named_resources
from fourdthinker.data.video import MAX_FRAMES, MAX_PIXELS

# What answers the questions. `vllm`: the project's engine (vLLM + latent decoding, the rollout
# actor's `LatentGenerator`); `hf`: the HF reference decoding (`model.generate_latent`), one sample
# at a time as the reference evaluation did. The rest are stand-ins that load no model, for tests
# and for measuring the stage's own cost: `oracle` replies with the gold letter, `constant:X` always
# with letter X, `reply:TEXT` with TEXT verbatim (to see the DSR extraction rules at work).
MODEL_ENGINES = ("vllm", "hf")
STAND_IN_ENGINES = ("oracle", "constant:", "reply:")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One checkpoint to evaluate: its results go to `<output_dir>/<name>/`."""

    name: str
    path: str


def parse_model(entry: str) -> ModelSpec:
    """`name=path`, or a path whose directory name becomes the name."""
    name, sep, path = entry.partition("=")
    if not sep:
        name, path = Path(entry.rstrip("/")).name, entry
    if not path.strip():
        raise ConfigError(f"models: {entry!r} has no path; write name=path or a checkpoint directory")
    if not _NAME.match(name):
        raise ConfigError(f"models: name {name!r} of {entry!r} must be letters, digits, '.', '_' or '-' "
                          "(it names the model's results directory); write name=path")
    return ModelSpec(name, path)


def argv_with_models(argv: list[str]) -> list[str]:
    """`--model A --model B` (repeatable, anywhere) turned into the override `models=["A", "B"]`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", action="append", default=[])
    known, rest = parser.parse_known_args(argv)
    return [*rest, f"models={json.dumps(known.model)}"] if known.model else rest


@dataclasses.dataclass
class EvaluateConfig:
    """DSR evaluation of one or more checkpoints. Defaults follow the reference evaluation except
    decoding, which is greedy (a sampled single run has no variance estimate; REFERENCE-SPEC §13.4)."""

    # Made absolute before Ray starts; refused when relative under a Ray job (fourdthinker.paths).
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("benchmark", "video_root", "output_dir")

    benchmark: str = ""  # DSR-format .parquet/.json/.jsonl: videoID, question, options, answer, type
    video_root: str = ""  # <video_root>/<videoID>.mp4; "" = the `videos` dir beside the benchmark
    models: list[str] = dataclasses.field(default_factory=list)  # checkpoint dirs or name=dir
    output_dir: str = "runs/evaluate"  # <output_dir>/<name>/dsr_eval*.json[l], comparison.md/.png
    engine: str = "vllm"  # vllm | hf | oracle | constant:<A-D> | reply:<text> (see MODEL_ENGINES)
    max_new_tokens: int = 2048
    temperature: float = 0.0  # 0 = greedy; the reference sampled at 0.7, top_p 0.9
    top_p: float = 1.0
    seed: int = 42
    max_frames: int = MAX_FRAMES
    max_pixels: int = MAX_PIXELS
    max_model_len: int = 16384  # the engine's context: 50 frames at the pixel budget are ~6,400 tokens
    batch_size: int = 16  # questions per engine call (vLLM batches them continuously)
    min_actors: int = 1  # engine actors per model (an autoscaling pool between min and max)
    max_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    # Named Ray resources each engine actor also asks for, e.g. {"accelerator_type:L40S": 0.001} to land
    # on one cluster worker type (cluster.yaml declares the names its node types offer).
    actor_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    decode_cpus: float = 1.0  # per video decode task
    engine_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra vLLM engine kwargs
    compare_published: bool = True  # the published DIFT / 4DRL rows in the table and chart
    limit: int = 0  # evaluate only the first N questions (0: all)
    stand_in_delay_s: float = 0.0  # seconds each stand-in answer takes (kill/resume tests)
    # Probe hook of the model engines: output steps forced to <|latent_start|> (a random test model
    # rarely starts a latent block by itself). Leave empty to evaluate.
    force_latent_steps: list[int] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        if not self.benchmark:
            raise ConfigError("benchmark: required (a DSR-format .parquet/.json/.jsonl file)")
        if not self.models:
            raise ConfigError("models: required: a list of checkpoint dirs (or name=dir), "
                              "or --model DIR (repeatable)")
        specs = self.model_specs()
        names = [m.name for m in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"models: names {names} repeat; give each checkpoint its own name with name=path")
        if not (self.engine in MODEL_ENGINES or self.engine == "oracle"
                or self.engine.startswith(STAND_IN_ENGINES[1:])):
            raise ConfigError(f"engine: {self.engine!r}; use one of vllm, hf, oracle, constant:<A-D>, reply:<text>")
        if self.engine.startswith("constant:") and not re.fullmatch(r"constant:[A-D]", self.engine):
            raise ConfigError(f"engine: {self.engine!r}; constant takes one option letter, e.g. constant:A")
        for name in ("max_new_tokens", "max_frames", "batch_size", "min_actors", "max_model_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_actors < self.min_actors:
            raise ConfigError(f"max_actors: {self.max_actors} is below min_actors {self.min_actors}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if any(step < 0 for step in self.force_latent_steps):
            raise ConfigError(f"force_latent_steps: output step indices must be >= 0, got {self.force_latent_steps}")
        if self.limit < 0 or self.stand_in_delay_s < 0:
            raise ConfigError("limit and stand_in_delay_s: must be >= 0")
        check_named_resources("actor_resources", self.actor_resources)

    def model_specs(self) -> list[ModelSpec]:
        return [parse_model(entry) for entry in self.models]

    @property
    def videos(self) -> Path:
        return Path(self.video_root) if self.video_root else Path(self.benchmark).parent / "videos"

    @property
    def loads_model(self) -> bool:
        return self.engine in MODEL_ENGINES
