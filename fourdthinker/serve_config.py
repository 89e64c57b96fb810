"""The Serve stage's config: what the HTTP app hosts, how it scales and what requests may do.

Loaded like every stage's config (`config.load_config`: YAML + `key=value` overrides, validated at
load), from `configs/*/serve.yaml`, `serve run serve.app:app config=... key=value` or
`python -m serve --config ...`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from fourdthinker.config import ConfigError, check_named_resources


@dataclasses.dataclass
class ServeConfig:
    # Made absolute where the app is built (a relative one under a Ray job is refused: it would point
    # into the job's temporary copy of --working-dir).
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("model_dir", "media_root")

    model_dir: str = ""  # a checkpoint dir with the latent tokens (DIFT/GRPO output, build_tiny_model)
    model_name: str = ""  # the id clients send as "model"; "" = the model dir's name
    # Engine
    max_model_len: int = 4096
    max_num_seqs: int = 64  # the engine's batch: concurrent requests decode together up to this
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)  # more vLLM engine args
    # Requests
    default_max_tokens: int = 512  # when a request gives no max_tokens (capped by the context left)
    max_n: int = 8
    add_format_suffix: bool = True  # append the training prompt's <think>/<answer> instruction
    nearest_patches: int = 5  # k of the latent viewer
    request_timeout_s: float = 300.0
    # Security
    auth_token_env: str = ""  # name of the env var holding the bearer token; "" = no auth
    max_body_bytes: int = 64 << 20
    media_root: str = ""  # local media paths must resolve inside it; "" = no local paths at all
    allowed_media_hosts: list[str] = dataclasses.field(default_factory=list)  # remote media hosts; [] = none
    max_media_bytes: int = 64 << 20  # per fetched/decoded media item
    # Scaling (Ray Serve autoscaling on ongoing requests)
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    max_ongoing_requests: int = 64  # per replica; above max_num_seqs requests queue in the engine
    num_gpus: float = 0.0  # per replica (the 3B config: one replica per GPU)
    num_cpus: float = 1.0
    # Named Ray resources each replica also asks for, e.g. {"accelerator_type:L40S": 0.001} to land on
    # one cluster worker type (cluster.yaml declares the names its node types offer).
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    # `python -m serve` only (`serve run`/`serve deploy` take these from their own options)
    host: str = "127.0.0.1"
    port: int = 8000

    def validate(self) -> None:
        if not self.model_dir:
            raise ConfigError("model_dir: required (a checkpoint directory with the latent tokens)")
        for name in ("max_model_len", "max_num_seqs", "default_max_tokens", "max_n", "nearest_patches",
                     "max_body_bytes", "max_media_bytes", "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"request_timeout_s: must be positive, got {self.request_timeout_s}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"min_replicas/max_replicas: need 0 <= min <= max and max >= 1, got "
                              f"{self.min_replicas}/{self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"target_ongoing_requests: must be positive, got {self.target_ongoing_requests}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ConfigError("num_gpus/num_cpus: must be >= 0")
        check_named_resources("resources", self.resources)
        if self.media_root and not Path(self.media_root).is_dir():
            raise ConfigError(f"media_root: {self.media_root} is not a directory")

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name
