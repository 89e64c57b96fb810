"""DIFT samples in the reference's JSONL format: read (skipping bad lines, with reasons) and write.

One JSON object per line: {"id", "text_input", "text_output", "image_input", "image_output"}, where
text_output holds one `<output_image>` per entry of image_output (REFERENCE.md, "DIFT JSONL").
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fourdthinker.atomic import atomic_write_jsonl
from fourdthinker.errors import UsageError
from fourdthinker.paths import PathOutsideRoot, media_path
from fourdthinker.tokens import OUTPUT_IMAGE

logger = logging.getLogger(__name__)

# Chat and latent special tokens (`<|im_start|>`, `<|latent_pad|>`, ...) written literally in a
# sample's text would be tokenized as the special tokens themselves and corrupt the turn/latent
# structure, so such lines are rejected.
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")

# Reasons a line is skipped (keys of the returned Counter).
NOT_UTF8 = "not_utf8"
INVALID_JSON = "invalid_json"
BAD_SCHEMA = "bad_schema"
EMPTY_TEXT = "empty_text"
SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"
OUTPUT_IMAGE_MISMATCH = "output_image_count_mismatch"
MISSING_IMAGE = "missing_image"
PATH_OUTSIDE_ROOT = "path_outside_root"
# What to change for a skip reason, in the error raised when no line is usable.
_FIXES = {
    MISSING_IMAGE: "media paths are read relative to the JSONL file's folder {root}: write them relative to it "
                   "(pipelines/preprocess.py does) or move the files there",
    "missing_video": "media paths are read relative to the JSONL file's folder {root}: write them relative to it "
                     "(pipelines/preprocess.py does) or move the files there",
    PATH_OUTSIDE_ROOT: "keep every media file under the JSONL file's folder {root}",
}


@dataclass
class DiftSample:
    id: str
    text_input: str
    text_output: str
    image_input: list[str] = field(default_factory=list)
    image_output: list[str] = field(default_factory=list)


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        return type(self), (self.reason, self.detail)


def _string_list(record: dict, key: str) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Skip(BAD_SCHEMA, f"{key!r} must be a list of path strings")
    return value


def _parse(raw: bytes, base_dir: Path) -> DiftSample:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Skip(NOT_UTF8, f"not UTF-8 at byte {err.start}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise _Skip(INVALID_JSON, err.msg) from None
    if not isinstance(record, dict):
        raise _Skip(BAD_SCHEMA, "a line must be a JSON object")
    sample_id = record.get("id")
    if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
        raise _Skip(BAD_SCHEMA, "'id' is missing or not a string")
    for key in ("text_input", "text_output"):
        if not isinstance(record.get(key), str):
            raise _Skip(BAD_SCHEMA, f"{key!r} is missing or not a string")
    text_input, text_output = record["text_input"], record["text_output"]
    if not text_input.strip() or not text_output.strip():
        raise _Skip(EMPTY_TEXT, "text_input or text_output is empty")
    for key, value in (("text_input", text_input), ("text_output", text_output)):
        if match := _SPECIAL_TOKEN.search(value):
            raise _Skip(SPECIAL_TOKEN_IN_TEXT, f"{key} contains the special token {match.group()}")
    image_input = _string_list(record, "image_input")
    image_output = _string_list(record, "image_output")
    if not image_input:
        raise _Skip(BAD_SCHEMA, "image_input is empty: a sample needs its clip's frames")
    placeholders = text_output.count(OUTPUT_IMAGE)
    if placeholders != len(image_output):
        raise _Skip(OUTPUT_IMAGE_MISMATCH,
                    f"{placeholders} {OUTPUT_IMAGE} in text_output but {len(image_output)} image_output")
    # Paths are relative to the JSONL's folder (fourdthinker.paths), so a dataset directory can move.
    try:
        image_input = [media_path(p, base_dir) for p in image_input]
        image_output = [media_path(p, base_dir) for p in image_output]
    except PathOutsideRoot as err:
        raise _Skip(PATH_OUTSIDE_ROOT, str(err)) from None
    for path in image_input + image_output:
        if not os.path.isfile(path):
            raise _Skip(MISSING_IMAGE, f"no such image file {path}")
    return DiftSample(id=str(sample_id), text_input=text_input, text_output=text_output,
                      image_input=image_input, image_output=image_output)


def read_dift_jsonl(path: str | Path) -> tuple[list[DiftSample], collections.Counter]:
    """Samples of a DIFT JSONL file and a Counter of why lines were skipped.

    A bad line (not UTF-8, invalid JSON, wrong schema, empty text, a special token in the text,
    `<output_image>` count != len(image_output), a missing image file, a path outside the file's
    folder) is logged and counted, never returned. Blank lines are ignored.
    """
    path = Path(path)
    base_dir = path.resolve().parent
    samples: list[DiftSample] = []
    skipped: collections.Counter = collections.Counter()
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                samples.append(_parse(raw.rstrip(b"\r\n"), base_dir))
            except _Skip as skip:
                skipped[skip.reason] += 1
                logger.warning("%s:%d skipped (%s): %s", path, line_no, skip.reason, skip.detail)
    if skipped:
        logger.warning("%s: kept %d samples, skipped %d lines %s", path, len(samples),
                       sum(skipped.values()), dict(skipped))
    return samples, skipped


def require_usable(path: str | Path, kept: int, skipped: collections.Counter, what: str = "samples") -> None:
    """A UsageError naming the file, the count per skip reason and the fix when no line of it is
    usable: raised on the driver, before any training worker starts."""
    if kept:
        return
    root = Path(path).resolve().parent
    if not skipped:
        raise UsageError(f"{path}: no {what} (the file is empty); point the config at a non-empty JSONL")
    counts = ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common())
    fixes = [_FIXES[r].format(root=root) for r in skipped if r in _FIXES]
    fix = "; ".join(fixes) if fixes else "the warnings above give each line's cause"
    raise UsageError(f"{path}: no usable {what}, every line was skipped ({counts}). Fix: {fix}")


def write_dift_jsonl(samples: Iterable[DiftSample], path: str | Path) -> None:
    """Write samples in the reference format (UTF-8, one object per line), atomically."""
    atomic_write_jsonl(path, (asdict(sample) for sample in samples))
