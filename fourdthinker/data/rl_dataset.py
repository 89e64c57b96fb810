"""4DRL prompts in the reference's JSONL format, and the resumable order they are drawn in.

One JSON object per line (REFERENCE-SPEC §9.1): {"Question", "A", "B", "C", "D", "Correct",
"video_path"} or, instead of video_path, "frame_paths": [...]; "id" and "Type" are optional. The
user text is the question, a blank line, the "A. …" option lines (empty options omitted) and the
shared format suffix (`prompts.question_prompt`): the same prompt DIFT trained on, not the
reference RL's drifted suffix.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fourdthinker.data.dift_dataset import PATH_OUTSIDE_ROOT
from fourdthinker.data.video import MAX_FRAMES, MAX_PIXELS, VIDEO_FPS, decode_video, load_frames
from fourdthinker.paths import PathOutsideRoot, media_path
from fourdthinker.prompts import OPTION_LETTERS, question_prompt

logger = logging.getLogger(__name__)

# Reasons a line is skipped (keys of the returned Counter).
INVALID_JSON = "invalid_json"
BAD_SCHEMA = "bad_schema"
NO_ANSWER = "no_correct_letter"
MISSING_VIDEO = "missing_video"


@dataclass(frozen=True)
class RlPrompt:
    id: str
    text: str  # the full user text: question + options + format suffix
    solution: str  # gold option letter
    frame_paths: tuple[str, ...] = ()
    video_path: str | None = None
    task_type: str | None = None

    def load_frames(self, max_frames: int = MAX_FRAMES, max_pixels: int = MAX_PIXELS) -> list[Image.Image]:
        """The clip under the one video policy (frame files take precedence over the video)."""
        if self.frame_paths:
            return load_frames(list(self.frame_paths), max_frames, max_pixels)
        return decode_video(self.video_path, VIDEO_FPS, max_frames, max_pixels)


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail

    def __reduce__(self):
        return type(self), (self.reason, self.detail)


def _media(raw: str, base_dir: Path) -> str:
    try:
        return media_path(raw, base_dir)
    except PathOutsideRoot as err:
        raise _Skip(PATH_OUTSIDE_ROOT, str(err)) from None


def _parse(line: str, line_no: int, base_dir: Path) -> RlPrompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise _Skip(INVALID_JSON, err.msg) from None
    if not isinstance(record, dict):
        raise _Skip(BAD_SCHEMA, "a line must be a JSON object")
    question = record.get("Question")
    if not isinstance(question, str) or not question.strip():
        raise _Skip(BAD_SCHEMA, "'Question' is missing or empty")
    options = {k: str(record[k]).strip() for k in OPTION_LETTERS if str(record.get(k) or "").strip()}
    if len(options) < 2:
        raise _Skip(BAD_SCHEMA, f"needs at least two non-empty options of {list(OPTION_LETTERS)}")
    solution = str(record.get("Correct") or "").strip().upper()[:1]
    if not solution:
        raise _Skip(NO_ANSWER, "'Correct' is empty")
    if solution not in options:
        raise _Skip(BAD_SCHEMA, f"'Correct' is {solution!r}, not one of the options {sorted(options)}")

    frame_paths = record.get("frame_paths")
    video_path = record.get("video_path")
    if frame_paths is not None:
        if not isinstance(frame_paths, list) or not frame_paths or not all(isinstance(p, str) for p in frame_paths):
            raise _Skip(BAD_SCHEMA, "'frame_paths' must be a non-empty list of path strings")
        frame_paths = [_media(p, base_dir) for p in frame_paths]
        missing = [p for p in frame_paths if not os.path.isfile(p)]
        if missing:
            raise _Skip(MISSING_VIDEO, f"{len(missing)} frame files missing, e.g. {missing[0]}")
        video_path = None
    elif isinstance(video_path, str) and video_path:
        video_path = _media(video_path, base_dir)
        if not os.path.isfile(video_path):
            raise _Skip(MISSING_VIDEO, f"no such video file {video_path}")
    else:
        raise _Skip(BAD_SCHEMA, "needs 'video_path' or 'frame_paths'")
    task_type = record.get("Type")
    return RlPrompt(id=str(record.get("id", line_no)), text=question_prompt(question.strip(), options),
                    solution=solution, frame_paths=tuple(frame_paths or ()), video_path=video_path,
                    task_type=str(task_type) if task_type is not None else None)


def read_rl_jsonl(path: str | Path) -> tuple[list[RlPrompt], collections.Counter]:
    """Prompts of a 4DRL JSONL file and a Counter of why lines were skipped (each one logged).

    Media paths are relative to the file's folder and must stay inside it (fourdthinker.paths).
    Blank lines are ignored.
    """
    path = Path(path)
    base_dir = path.resolve().parent
    prompts: list[RlPrompt] = []
    skipped: collections.Counter = collections.Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                prompts.append(_parse(line, line_no, base_dir))
            except _Skip as skip:
                skipped[skip.reason] += 1
                logger.warning("%s:%d skipped (%s): %s", path, line_no, skip.reason, skip.detail)
    return prompts, skipped


class PromptOrder:
    """Which prompts step k draws: a fresh seeded permutation per pass over the data.

    A pure function of (seed, step), so a resumed run continues exactly where it stopped.
    """

    def __init__(self, num_prompts: int, seed: int):
        if num_prompts < 1:
            raise ValueError("PromptOrder: no prompts to draw from")
        self.num_prompts, self.seed = num_prompts, seed

    def _pass(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def indices(self, step: int, batch_size: int) -> list[int]:
        start = step * batch_size
        positions = np.arange(start, start + batch_size)
        epochs = positions // self.num_prompts
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):  # one or two passes per step
            sel = epochs == epoch
            out[sel] = self._pass(int(epoch))[positions[sel] % self.num_prompts]
        return out.tolist()
