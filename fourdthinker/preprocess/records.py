"""What the preprocess stage knows about a clip, and the QA samples it writes from it.

The pipeline fills `ClipAnnotation` (frames, camera-motion segments, tracked objects with their
motion labels); the QA writers turn one into `QaSample`s; `QaSample` serialises to the reference
4DThinker DIFT and 4DRL JSONL formats unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ObjectTrack:
    name: str  # the concept prompted to the segmenter, e.g. "red box"
    dynamic: bool
    mask_paths: list[str | None]  # per frame: a PNG mask, or None where the object is not found
    boxes: list[list[float] | None]  # per frame: [x1, y1, x2, y2] in pixels (inclusive), or None
    areas: list[float]  # per frame: mask pixels (0 where not found)
    direction: str | None = None  # object-direction vocabulary label (dynamic objects)
    speed: str | None = None  # speed vocabulary label
    distance: str | None = None  # distance vocabulary label


@dataclass
class ClipAnnotation:
    clip_id: str
    group: str
    video_path: str
    frame_paths: list[str]  # extracted frames, in time order
    frame_times: list[float]  # seconds from the clip start, one per frame
    width: int
    height: int
    # (first frame index, last frame index, labels with full camera names), e.g. (0, 6, ["Pan Left"])
    camera_segments: list[tuple[int, int, list[str]]] = field(default_factory=list)
    objects: list[ObjectTrack] = field(default_factory=list)
    caption: str = ""


@dataclass
class QaSample:
    id: str
    kind: str  # "camera", "dynamic_direct", "dynamic_bbox", "dynamic_distance", "dynamic_speed"
    question: str  # stem without options
    options: dict[str, str]  # letter -> text, 4 entries
    answer: str  # gold letter
    text_output: str  # "<think>... <output_image> ...</think>\n<answer>X. text</answer>"
    image_input: list[str]  # all frames of the clip
    image_output: list[str]  # one mental image per <output_image>, in order

    def text_input(self) -> str:
        from fourdthinker.prompts import options_block

        return f"{self.question}\n\n{options_block(self.options)}"

    def to_dift(self) -> dict:
        """The reference DIFT JSONL record."""
        return {"id": self.id, "text_input": self.text_input(), "text_output": self.text_output,
                "image_input": list(self.image_input), "image_output": list(self.image_output)}

    def to_rl(self) -> dict:
        """The reference 4DRL JSONL record (options without letter prefixes, frames by path)."""
        return {"Question": self.question, **{k: self.options[k] for k in "ABCD"}, "Correct": self.answer,
                "frame_paths": list(self.image_input), "Type": self.kind}
