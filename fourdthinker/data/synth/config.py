"""The synthetic world's config: every file of a world is a function of it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fourdthinker.data.render import Intrinsics
from fourdthinker.errors import UsageError

MAX_FRAMES = 50     # SpatialVID preprocessing skips clips with more extracted frames
MIN_FRAMES = 6      # two subsampled camera steps and three thirds for the speed questions
MAX_SIDE = 4096


class SynthConfigError(UsageError):
    """A `fourdthinker synth` argument outside what the world can be built with."""


@dataclass(frozen=True)
class SynthConfig:
    """What world to build. Field names mirror the CLI flags the errors name."""

    videos: int = 20
    seed: int = 0
    width: int = 224
    height: int = 168
    seconds: float = 6
    fps: int = 5
    videos_per_group: int = 8
    questions_per_clip: int = 6
    horizontal_fov_degrees: float = 70.0

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise SynthConfigError(message)

        need(self.videos > 0, f"--videos must be positive, got {self.videos}")
        need(self.videos <= 100_000, f"--videos {self.videos} is too many; use at most 100000")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        for name, side in (("--width", self.width), ("--height", self.height)):
            need(16 <= side <= MAX_SIDE, f"{name} must be between 16 and {MAX_SIDE} pixels, got {side}")
            need(side % 2 == 0, f"{name} must be even (H.264 with 4:2:0 chroma), got {side}")
        need(self.fps > 0, f"--fps must be positive, got {self.fps}")
        need(self.seconds > 0, f"--seconds must be positive, got {self.seconds}")
        need(MIN_FRAMES <= self.num_frames <= MAX_FRAMES,
             f"--seconds {self.seconds} x --fps {self.fps} gives {self.num_frames} frames per clip; "
             f"choose values giving {MIN_FRAMES} to {MAX_FRAMES} (SpatialVID preprocessing skips longer clips)")
        need(self.videos_per_group > 0, f"videos_per_group must be positive, got {self.videos_per_group}")
        need(self.questions_per_clip >= 0, f"questions_per_clip must be >= 0, got {self.questions_per_clip}")
        need(20.0 <= self.horizontal_fov_degrees <= 120.0,
             f"horizontal_fov_degrees must be within 20..120, got {self.horizontal_fov_degrees}")

    @property
    def num_frames(self) -> int:
        return int(round(self.seconds * self.fps))

    def intrinsics(self) -> Intrinsics:
        focal = 0.5 * self.width / math.tan(math.radians(self.horizontal_fov_degrees) / 2)
        return Intrinsics(focal, focal, self.width / 2, self.height / 2, self.width, self.height)
