"""Questions whose chains of thought insert mental images (REFERENCE-SPEC §3-§6, fixes of §13.2).

Per clip, `write_clip_questions` plans every question from the labels (camera segments, tracked
objects), renders the mental images (red mask overlays, `overlays.py`), builds the options, and asks a
`QaWriter` to phrase the question and write the chain of thought for the known answer. Every sample is
checked by `validate_sample` before it is kept; what cannot be written is returned as a drop reason.

The text_output format is the reference's final training text (after its <thinking> -> <think>
conversion): "<think>\\n... from <output_image> to <output_image> ...\\n</think>\\n<answer>\\nB. Pan
Right\\n</answer>", one `<output_image>` per mental image, all of them in one sentence, in time order.

Differences from the reference, on purpose: "Stay" segments get no question; times are real seconds
(`clip.frame_times`) instead of frame numbers; the bbox question quotes the box in the model's input
coordinates (the one video policy's frame size); the answer inside the chain of thought must equal the
gold option; the mental images are chronological by construction.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from fourdthinker.data.video import MAX_PIXELS, PATCH_FACTOR, spread_indices
from fourdthinker.data.vocab import CAMERA_STAY, DISTANCE_CLOSER, DISTANCE_FARTHER, DISTANCE_SAME, STATIONARY
from fourdthinker.preprocess.camera_motion import normalize_camera_label
from fourdthinker.preprocess.options import (
    camera_distractors,
    direction_distractors,
    distance_distractors,
    format_movement,
    multiple_choice,
    speed_distractors,
)
from fourdthinker.preprocess.overlays import OverlayRejected, write_overlay
from fourdthinker.preprocess.records import ClipAnnotation, ObjectTrack, QaSample
from fourdthinker.prompts import OPTION_LETTERS
from fourdthinker.tokens import OUTPUT_IMAGE

Segment = tuple[int, int, list[str]]

# Dynamic-object question kinds and the reference's draw weights (REFERENCE-SPEC §5.2 step 8).
DYNAMIC_KIND_WEIGHTS = {"direct": 0.32, "bbox": 0.45, "distance": 0.2, "speed": 0.03}
DYNAMIC_QUESTIONS_PER_CLIP = 2
# Mental images of a dynamic object: up to MAX_KEY_FRAMES spread over the frames where it is found.
MAX_KEY_FRAMES = 8
MIN_DYNAMIC_IMAGES = 2
# A multi-movement camera segment gets up to this many images between its start and end frames.
MAX_INTERMEDIATE_FRAMES = 2

MIN_THINK_CHARS = 100
# All tags of a chain of thought sit in one sentence; the reference also bounded the span they cover.
MAX_TAG_SPAN_PER_IMAGE = 150

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_STRUCTURE = re.compile(r"<think>(?P<think>.*)</think>\s*<answer>(?P<answer>.*)</answer>", re.DOTALL)
_SENTENCE_BREAK = re.compile(r"[.!?](?:\s|$)|\n")


@dataclass(frozen=True)
class MentalImage:
    """One overlay, the object it highlights and the clip frame it was rendered from."""

    path: str
    subject: str  # the highlighted object's name (ObjectTrack.name)
    frame: int  # index into clip.frame_paths
    time_s: float  # clip.frame_times[frame]


class QuestionDropped(Exception):
    """A writer could not produce a valid item; the message is the reason."""


@runtime_checkable
class QaWriter(Protocol):
    """Phrases a question and writes the chain of thought that reaches the given answer.

    Each method returns (question stem, text_output) or None; it may instead raise
    `QuestionDropped` with a reason. `overlay_paths` are the mental images in time order.
    """

    def camera_item(self, clip: ClipAnnotation, segment: Segment, overlay_paths: Sequence[MentalImage],
                    options: dict[str, str], answer_letter: str) -> tuple[str, str] | None: ...

    def dynamic_item(self, clip: ClipAnnotation, track: ObjectTrack, kind: str,
                     overlay_paths: Sequence[MentalImage], options: dict[str, str],
                     answer_letter: str) -> tuple[str, str] | None: ...


@dataclass(frozen=True)
class QuestionJob:
    """Everything a writer needs for one question (a planned, not yet written, sample)."""

    sample_id: str
    clip: ClipAnnotation
    images: tuple[MentalImage, ...]
    options: dict[str, str]
    answer: str
    segment: Segment | None = None  # camera questions
    track: ObjectTrack | None = None  # dynamic questions
    dynamic_kind: str | None = None  # a DYNAMIC_KIND_WEIGHTS key

    @property
    def kind(self) -> str:
        """`QaSample.kind`: "camera" or "dynamic_<kind>"."""
        return "camera" if self.dynamic_kind is None else f"dynamic_{self.dynamic_kind}"

    def run(self, writer: QaWriter) -> tuple[str, str] | None:
        if self.dynamic_kind is None:
            return writer.camera_item(self.clip, self.segment, self.images, self.options, self.answer)
        return writer.dynamic_item(self.clip, self.track, self.dynamic_kind, self.images, self.options,
                                   self.answer)


# --- text helpers shared by the writers ----------------------------------------------------------


def format_seconds(seconds: float) -> str:
    """"3s", "2.5s", "0.33s": at most two decimals, no trailing zeros."""
    return f"{round(seconds, 2):g}s"


def answer_option(options: dict[str, str], letter: str) -> str:
    """The gold option as it must appear in <answer>: "B. Pan Right"."""
    return f"{letter}. {options[letter]}"


def assemble_cot(think: str, answer: str) -> str:
    """The final text_output from a reasoning text and the answer option."""
    return f"{THINK_OPEN}\n{think.strip()}\n{THINK_CLOSE}\n{ANSWER_OPEN}\n{answer.strip()}\n{ANSWER_CLOSE}"


def imagery_sentence(subject: str, images: Sequence[MentalImage]) -> str:
    """The one sentence holding every <output_image> tag, in time order."""
    times = _join([format_seconds(image.time_s) for image in images])
    if len(images) == 1:
        return f"Picturing {subject} highlighted at {times}, I imagine it as {OUTPUT_IMAGE}."
    tags = " to ".join([OUTPUT_IMAGE] * len(images))
    return f"Picturing {subject} highlighted at {times}, I imagine it going from {tags}."


def model_input_box(box: Sequence[float], frame_size: tuple[int, int]) -> list[int]:
    """An inclusive pixel box [x1, y1, x2, y2] of a frame of `frame_size` = (width, height), in the
    coordinates of that frame as the model sees it (the one video policy's resize)."""
    width, height = frame_size
    new_height, new_width = smart_resize(height, width, factor=PATCH_FACTOR,
                                         min_pixels=PATCH_FACTOR * PATCH_FACTOR, max_pixels=MAX_PIXELS)
    scales = (new_width / width, new_height / height) * 2
    limits = (new_width - 1, new_height - 1) * 2
    return [min(max(math.floor(v * s + 0.5), 0), limit) for v, s, limit in zip(box, scales, limits)]


def initial_box_text(clip: ClipAnnotation, track: ObjectTrack, images: Sequence[MentalImage]) -> str | None:
    """"[x1,y1,x2,y2]" of the object at the first mental image, in model input coordinates (None if
    the track has no box there)."""
    frame = images[0].frame
    box = track.boxes[frame] if frame < len(track.boxes) else None
    if box is None:
        return None
    with Image.open(clip.frame_paths[frame]) as image:  # reads the header only
        size = image.size
    return "[" + ",".join(str(v) for v in model_input_box(box, size)) + "]"


# --- validation ----------------------------------------------------------------------------------


def validate_text_output(text: str, num_images: int, expected_answer: str) -> str | None:
    """None if `text` is a well-formed chain of thought for `num_images` mental images ending in
    `expected_answer`, else the reason."""
    for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
        if text.count(tag) != 1:
            return f"text_output has {text.count(tag)} {tag} tags (needs exactly 1)"
    match = _STRUCTURE.fullmatch(text.strip())
    if match is None:
        return "text_output is not <think>...</think> followed by <answer>...</answer> (and nothing else)"
    think, answer = match["think"], match["answer"].strip()
    total, inside = text.count(OUTPUT_IMAGE), think.count(OUTPUT_IMAGE)
    if total != num_images:
        return f"text_output has {total} {OUTPUT_IMAGE} tags for {num_images} mental images"
    if inside != total:
        return f"{total - inside} {OUTPUT_IMAGE} tag(s) outside the think block"
    if len(think.strip()) < MIN_THINK_CHARS:
        return f"think block has {len(think.strip())} characters (needs >= {MIN_THINK_CHARS})"
    if num_images:
        first, last = think.index(OUTPUT_IMAGE), think.rindex(OUTPUT_IMAGE)
        between = think[first:last]
        if _SENTENCE_BREAK.search(between):
            return f"the {OUTPUT_IMAGE} tags are not together in one sentence"
        if len(between) > MAX_TAG_SPAN_PER_IMAGE * num_images:
            return (f"the {OUTPUT_IMAGE} tags span {len(between)} characters "
                    f"(> {MAX_TAG_SPAN_PER_IMAGE} per image)")
    if answer != expected_answer:
        return f"answer {answer!r} differs from the gold option {expected_answer!r}"
    return None


def validate_sample(sample: QaSample) -> str | None:
    """None if the sample is valid training data, else the reason (REFERENCE-SPEC §3.3, §6.2 and the
    checks the reference lacked: gold answer, distinct options)."""
    if list(sample.options) != list(OPTION_LETTERS):
        return f"options are lettered {list(sample.options)}; expected {list(OPTION_LETTERS)}"
    texts = [str(text).strip() for text in sample.options.values()]
    if not all(texts) or len(set(texts)) != len(texts):
        return f"options are not 4 distinct non-empty texts: {texts}"
    if sample.answer not in OPTION_LETTERS:
        return f"answer letter {sample.answer!r} is not one of {OPTION_LETTERS}"
    if not sample.question.strip():
        return "question is empty"
    if not sample.image_input:
        return "image_input is empty (the clip's frames are the video input)"
    if not sample.image_output:
        return "image_output is empty (a chain of thought needs at least one mental image)"
    return validate_text_output(sample.text_output, len(sample.image_output),
                                answer_option(sample.options, sample.answer))


# --- planning and writing a clip's questions -------------------------------------------------------


def write_clip_questions(clip: ClipAnnotation, writer: QaWriter, rng: random.Random,
                         overlay_dir: Path | None = None) -> tuple[list[QaSample], list[str]]:
    """The clip's valid samples and a reason for each question that could not be written.

    Overlays go to `overlay_dir` (default: an `overlays` directory beside the frames' directory).
    Deterministic for a given `rng` state and writer. A writer with a `write_many(jobs)` method
    (e.g. the LLM writer, which then works concurrently) gets all the clip's questions at once.
    """
    if not clip.frame_paths or len(clip.frame_times) != len(clip.frame_paths):
        return [], [f"{clip.clip_id}: {len(clip.frame_paths)} frames and {len(clip.frame_times)} "
                    "frame times; a clip needs frames, each with its time"]
    if overlay_dir is None:
        overlay_dir = Path(clip.frame_paths[0]).parent.parent / "overlays"
    overlays = _OverlayCache(clip, Path(overlay_dir))
    jobs, drops = _plan_camera_questions(clip, overlays, rng)
    dynamic_jobs, dynamic_drops = _plan_dynamic_questions(clip, overlays, rng)
    jobs += dynamic_jobs
    drops += dynamic_drops

    write_many = getattr(writer, "write_many", None)
    if callable(write_many):
        results = list(write_many(jobs))
    else:
        results = []
        for job in jobs:
            try:
                results.append(job.run(writer))
            except QuestionDropped as dropped:
                results.append(dropped)

    samples = []
    for job, result in zip(jobs, results, strict=True):
        if isinstance(result, QuestionDropped) or result is None:
            drops.append(f"{job.sample_id}: {result or 'the writer returned no text'}")
            continue
        question, text_output = result
        sample = QaSample(id=job.sample_id, kind=job.kind, question=question.strip(), options=job.options,
                          answer=job.answer, text_output=text_output,
                          image_input=list(clip.frame_paths), image_output=[i.path for i in job.images])
        reason = validate_sample(sample)
        if reason is None:
            samples.append(sample)
        else:
            drops.append(f"{job.sample_id}: {reason}")
    return samples, drops


def _plan_camera_questions(clip: ClipAnnotation, overlays: "_OverlayCache",
                           rng: random.Random) -> tuple[list[QuestionJob], list[str]]:
    """One question per camera segment with motion; mental images of a static object on the
    segment's start frame, 1-2 intermediate frames for multi-movement segments, and its end frame."""
    statics = _by_coverage(clip, dynamic=False)
    jobs: list[QuestionJob] = []
    drops: list[str] = []
    for start, end, raw_labels in clip.camera_segments:
        sample_id = f"{clip.clip_id}_{start}->{end}"
        try:
            labels = list(dict.fromkeys(normalize_camera_label(label) for label in raw_labels))
        except ValueError as err:
            drops.append(f"{sample_id}: {err}")
            continue
        labels = [label for label in labels if label != CAMERA_STAY]
        if not labels:
            continue  # a still camera has no camera-motion question
        if not 0 <= start < end < len(clip.frame_paths):
            drops.append(f"{sample_id}: segment frames {start}->{end} are outside the clip's "
                         f"{len(clip.frame_paths)} frames or not increasing")
            continue
        chosen = None
        reasons = []
        for index, track in statics:
            try:
                chosen = (index, track, [overlays.get(index, start), overlays.get(index, end)])
                break
            except OverlayRejected as err:
                reasons.append(str(err))
        if chosen is None:
            why = "; ".join(reasons) or "the clip has no static object"
            drops.append(f"{sample_id}: no static object highlight on frames {start} and {end} ({why})")
            continue
        index, track, (first, last) = chosen
        middle: list[MentalImage] = []
        if len(labels) > 1:
            candidates = [f for f in range(start + 1, end) if _has_mask(track, f)]
            wanted = min(len(labels) - 1, MAX_INTERMEDIATE_FRAMES, len(candidates))
            for frame in sorted(rng.sample(candidates, wanted)):
                try:
                    middle.append(overlays.get(index, frame))
                except OverlayRejected:
                    pass  # the start and end images alone still show the motion
        try:
            distractors = camera_distractors(labels, rng)
            distractor_texts = [format_movement(d) for d in distractors]
            options, letter = multiple_choice(format_movement(labels), distractor_texts, rng)
        except ValueError as err:
            drops.append(f"{sample_id}: {err}")
            continue
        jobs.append(QuestionJob(sample_id, clip, (first, *middle, last), options, letter,
                                segment=(start, end, labels)))
    return jobs, drops


def _plan_dynamic_questions(clip: ClipAnnotation, overlays: "_OverlayCache",
                            rng: random.Random) -> tuple[list[QuestionJob], list[str]]:
    """Up to two questions about the best-covered dynamic object (kinds drawn with the reference
    weights); mental images on up to 8 key frames spread over the frames where it is found."""
    sample_id = f"{clip.clip_id}_dynamic"
    candidates = [(i, t) for i, t in _by_coverage(clip, dynamic=True) if t.direction is not None]
    if not candidates:
        return [], [f"{sample_id}: no dynamic object with a direction label"]
    index, track = candidates[0]
    found = [f for f in range(len(clip.frame_paths)) if _has_mask(track, f)]
    images, reasons = [], []
    for position in spread_indices(len(found), MAX_KEY_FRAMES):
        try:
            images.append(overlays.get(index, found[position]))
        except OverlayRejected as err:
            reasons.append(str(err))
    if len(images) < MIN_DYNAMIC_IMAGES:
        why = "".join(f"; {reason}" for reason in reasons)
        return [], [f"{sample_id}: {len(images)} usable highlight(s) of the {track.name} "
                    f"(needs {MIN_DYNAMIC_IMAGES}){why}"]

    kinds = available_dynamic_kinds(clip, track, images)
    jobs, drops = [], []
    for kind in draw_dynamic_kinds(kinds, rng, DYNAMIC_QUESTIONS_PER_CLIP):
        kind_id = f"{sample_id}_{kind}"
        try:
            correct, distractors = _dynamic_answer(track, kind, rng)
            options, letter = multiple_choice(correct, distractors, rng)
        except ValueError as err:
            drops.append(f"{kind_id}: {err}")
            continue
        jobs.append(QuestionJob(kind_id, clip, tuple(images), options, letter, track=track, dynamic_kind=kind))
    return jobs, drops


def available_dynamic_kinds(clip: ClipAnnotation, track: ObjectTrack,
                            images: Sequence[MentalImage]) -> list[str]:
    """The question kinds the track's labels support: bbox needs a box on the first mental image's
    frame, distance and speed their labels, and speed a moving object."""
    kinds = ["direct"]
    if initial_box_text(clip, track, images) is not None:
        kinds.append("bbox")
    if track.distance is not None:
        kinds.append("distance")
    if track.speed is not None and track.direction != STATIONARY:
        kinds.append("speed")
    return kinds


def draw_dynamic_kinds(kinds: Sequence[str], rng: random.Random, count: int) -> list[str]:
    """`count` distinct kinds by sequential weighted draws without replacement."""
    remaining, drawn = list(kinds), []
    while remaining and len(drawn) < count:
        kind = rng.choices(remaining, weights=[DYNAMIC_KIND_WEIGHTS[k] for k in remaining])[0]
        remaining.remove(kind)
        drawn.append(kind)
    return drawn


def _dynamic_answer(track: ObjectTrack, kind: str, rng: random.Random) -> tuple[str, list[str]]:
    if kind in ("direct", "bbox"):
        return track.direction, direction_distractors(track.direction, rng)
    if kind == "distance":
        return track.distance, distance_distractors(track.distance, rng)
    return track.speed, speed_distractors(track.speed, rng)


def _has_mask(track: ObjectTrack, frame: int) -> bool:
    return frame < len(track.mask_paths) and track.mask_paths[frame] is not None


def _by_coverage(clip: ClipAnnotation, dynamic: bool) -> list[tuple[int, ObjectTrack]]:
    """(index in clip.objects, track) of the static or dynamic objects, most frames found first."""
    tracks = [(i, t) for i, t in enumerate(clip.objects) if t.dynamic == dynamic]
    return sorted(tracks, key=lambda it: -sum(p is not None for p in it[1].mask_paths))


class _OverlayCache:
    """Renders each (object, frame) overlay once per clip; a camera segment's end frame is the next
    segment's start frame."""

    def __init__(self, clip: ClipAnnotation, overlay_dir: Path):
        self.clip, self.overlay_dir = clip, overlay_dir
        self._done: dict[tuple[int, int], MentalImage | OverlayRejected] = {}

    def get(self, object_index: int, frame: int) -> MentalImage:
        key = (object_index, frame)
        if key not in self._done:
            self._done[key] = self._render(object_index, frame)
        result = self._done[key]
        if isinstance(result, OverlayRejected):
            raise result
        return result

    def _render(self, object_index: int, frame: int) -> MentalImage | OverlayRejected:
        track = self.clip.objects[object_index]
        if not _has_mask(track, frame):
            return OverlayRejected(f"the {track.name} is not found on frame {frame}")
        out = self.overlay_dir / f"{self.clip.clip_id}_obj{object_index}_f{frame:04d}.jpg"
        try:
            write_overlay(self.clip.frame_paths[frame], track.mask_paths[frame], out)
        except OverlayRejected as err:
            return err
        return MentalImage(str(out), track.name, frame, float(self.clip.frame_times[frame]))


# --- the offline template writer -----------------------------------------------------------------

# How a static object moves in the image when the camera performs each movement, and the cause.
_CAMERA_EVIDENCE = {
    "Pan Right": ("drifts toward the left edge of the frame while keeping its size",
                  "the camera rotating to the right"),
    "Pan Left": ("drifts toward the right edge of the frame while keeping its size",
                 "the camera rotating to the left"),
    "Tilt Up": ("slides down the frame while keeping its size", "the camera pointing further upward"),
    "Tilt Down": ("slides up the frame while keeping its size", "the camera pointing further downward"),
    "Dolly In": ("grows larger and spreads away from the centre of the view",
                 "the camera moving forward into the scene"),
    "Dolly Out": ("shrinks toward the centre of the view", "the camera moving backward away from the scene"),
    "Truck Right": ("shifts to the left, its nearer parts shifting more than distant ones",
                    "the camera sliding sideways to the right"),
    "Truck Left": ("shifts to the right, its nearer parts shifting more than distant ones",
                   "the camera sliding sideways to the left"),
    "Pedestal Up": ("moves down the frame, with parallax between near and far parts", "the camera rising"),
    "Pedestal Down": ("moves up the frame, with parallax between near and far parts", "the camera lowering"),
    "Roll Clockwise": ("turns counter-clockwise around the image centre", "the camera rolling clockwise"),
    "Roll Counter-Clockwise": ("turns clockwise around the image centre",
                               "the camera rolling counter-clockwise"),
}

_DIRECTION_EVIDENCE = {
    "Moving Left": "its highlighted region travels toward the left side of the frame",
    "Moving Right": "its highlighted region travels toward the right side of the frame",
    "Moving Up": "its highlighted region rises toward the top of the frame",
    "Moving Down": "its highlighted region sinks toward the bottom of the frame",
    "Moving Left-Up": "its highlighted region travels up and to the left",
    "Moving Left-Down": "its highlighted region travels down and to the left",
    "Moving Right-Up": "its highlighted region travels up and to the right",
    "Moving Right-Down": "its highlighted region travels down and to the right",
    "Moving Toward Camera": "its highlighted region grows steadily larger, so it approaches the camera",
    "Moving Away from Camera": "its highlighted region grows steadily smaller, so it recedes from the camera",
    STATIONARY: "its highlighted region keeps the same place and size in the scene",
}

_DISTANCE_EVIDENCE = {
    DISTANCE_CLOSER: "its highlighted region grows larger from view to view, so the gap to the camera shrinks",
    DISTANCE_FARTHER: "its highlighted region becomes smaller from view to view, so the gap to the camera "
                      "grows",
    DISTANCE_SAME: "its highlighted region keeps roughly the same size, so the gap to the camera hardly "
                   "changes",
}

_SPEED_EVIDENCE = {
    "Speeding Up": "the distance it covers between consecutive views keeps increasing",
    "Slowing Down": "the distance it covers between consecutive views keeps decreasing",
    "Maintaining a Constant Speed": "it covers about the same distance between consecutive views",
    "First Speeding Up, Then Slowing Down": "the distance it covers between views first grows and then shrinks",
    "First Slowing Down, Then Speeding Up": "the distance it covers between views first shrinks and then grows",
    "Moving at Varying Speeds": "the distance it covers between views changes irregularly",
}

_CAMERA_QUESTIONS = (
    "What is the camera movement from {start} to {end}?",
    "Between {start} and {end}, how does the camera move?",
    "Watching the video from {start} to {end}, which camera motion is performed?",
    "Which camera technique is used in the video between {start} and {end}?",
)

_DYNAMIC_QUESTIONS = {
    "direct": (
        "From the camera's viewpoint, in which direction does the {obj} move between {start} and {end}?",
        "Seen from the camera, what is the main direction of the {obj}'s motion from {start} to {end}?",
        "How does the {obj} move relative to the camera between {start} and {end}?",
    ),
    "bbox": (
        "At {start} the {obj} is inside the box {bbox} of the frame. From the camera's viewpoint, in which "
        "direction does it move until {end}?",
        "The {obj} starts in the region {bbox} at {start}. As seen by the camera, which way does it move "
        "by {end}?",
    ),
    "distance": (
        "How does the distance between the {obj} and the camera change from {start} to {end}?",
        "Between {start} and {end}, how does the {obj}'s distance to the camera change?",
    ),
    "speed": (
        "How does the speed of the {obj} change between {start} and {end}?",
        "From {start} to {end}, how does the {obj}'s speed vary?",
    ),
}


class TemplateWriter:
    """Offline, deterministic questions and chains of thought written from the labels.

    The wording variant of each item is a stable hash of (seed, sample id), so it does not depend on
    the order items are written in. Every item it returns passes `validate_sample`.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def camera_item(self, clip: ClipAnnotation, segment: Segment, overlay_paths: Sequence[MentalImage],
                    options: dict[str, str], answer_letter: str) -> tuple[str, str]:
        start, end, labels = segment
        times = {"start": format_seconds(clip.frame_times[start]), "end": format_seconds(clip.frame_times[end])}
        question = self._pick(_CAMERA_QUESTIONS, f"{clip.clip_id}_{start}->{end}").format(**times)
        static = overlay_paths[0].subject
        motions = [_CAMERA_EVIDENCE[label][0] for label in labels]
        causes = [_CAMERA_EVIDENCE[label][1] for label in labels]
        think = " ".join([
            f"The question is about the camera between {times['start']} and {times['end']}, so I narrow the "
            "video down to that interval.",
            f"To separate the camera's own motion from motion in the scene I need a fixed reference, and the "
            f"{static} stays still, so any change in how it appears comes from the camera.",
            imagery_sentence(f"the {static}", overlay_paths),
            f"Comparing the first view with the final one, the {static} {_join(motions)}.",
            f"That is what {_join(causes)} {'produces' if len(causes) == 1 else 'produce'}, so the camera "
            f"performs {format_movement(labels)}, which is option {answer_letter}.",
        ])
        return question, assemble_cot(think, answer_option(options, answer_letter))

    def dynamic_item(self, clip: ClipAnnotation, track: ObjectTrack, kind: str,
                     overlay_paths: Sequence[MentalImage], options: dict[str, str],
                     answer_letter: str) -> tuple[str, str]:
        first, last = overlay_paths[0], overlay_paths[-1]
        fields = {"obj": track.name, "start": format_seconds(first.time_s), "end": format_seconds(last.time_s),
                  "bbox": initial_box_text(clip, track, overlay_paths) if kind == "bbox" else ""}
        question = self._pick(_DYNAMIC_QUESTIONS[kind], f"{clip.clip_id}_dynamic_{kind}").format(**fields)
        answer = options[answer_letter]
        if kind in ("direct", "bbox"):
            evidence = _DIRECTION_EVIDENCE[answer]
        elif kind == "distance":
            evidence = _DISTANCE_EVIDENCE[answer]
        else:
            evidence = _SPEED_EVIDENCE[answer]
        start_hint = f" (it starts inside {fields['bbox']})" if kind == "bbox" else ""
        think = " ".join([
            f"The question is about the {track.name} between {fields['start']} and {fields['end']}, so I "
            f"locate it in the video{start_hint} and follow it through that interval.",
            imagery_sentence(f"the {track.name}", overlay_paths),
            f"Comparing these views, {_camera_note(clip, first.frame, last.frame)}, {evidence}.",
            f"So the answer is {answer}, option {answer_letter}.",
        ])
        return question, assemble_cot(think, answer_option(options, answer_letter))

    def _pick(self, variants: Sequence[str], key: str) -> str:
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        return variants[int.from_bytes(digest, "big") % len(variants)]


def _camera_note(clip: ClipAnnotation, first: int, last: int) -> str:
    """How the camera moves over frames first..last, as the clause that discounts it."""
    if not clip.camera_segments:
        return "after discounting any motion of the camera itself"
    names: list[str] = []
    for start, end, segment_labels in clip.camera_segments:
        if start < last and end > first:
            for label in segment_labels:
                try:
                    names.append(normalize_camera_label(label))
                except ValueError:
                    continue  # an unknown label is reported by the camera question of its segment
    names = [name for name in dict.fromkeys(names) if name != CAMERA_STAY]
    if not names:
        return "with the camera holding still over this interval"
    return f"after discounting the camera's own motion ({format_movement(names)})"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return f"{', '.join(items[:-1])} and {items[-1]}"
