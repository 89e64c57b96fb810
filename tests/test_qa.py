"""Question + chain-of-thought writing and validation (REFERENCE-SPEC §3.3, §4, §5, §6; fixes of §13.2)."""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fourdthinker.data.video import fit_to_pixel_budget
from fourdthinker.data.vocab import DISTANCE_SAME
from fourdthinker.preprocess.qa import (
    DYNAMIC_KIND_WEIGHTS,
    MentalImage,
    QuestionDropped,
    TemplateWriter,
    available_dynamic_kinds,
    draw_dynamic_kinds,
    format_seconds,
    validate_sample,
    write_clip_questions,
)
from fourdthinker.preprocess.records import ClipAnnotation, ObjectTrack, QaSample
from fourdthinker.tokens import OUTPUT_IMAGE

WIDTH, HEIGHT, FRAMES = 560, 420, 10  # over the pixel budget: the model sees 504x364
# Real timestamps that are not frame numbers: the questions must quote these.
TIMES = [round(0.25 + 0.4 * i, 2) for i in range(FRAMES)]
DYNAMIC_X = [400 - 30 * i for i in range(FRAMES)]  # the ball moves left


def _write_mask(path: Path, box: tuple[int, int, int, int]) -> str:
    x1, y1, x2, y2 = box
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[y1 : y2 + 1, x1 : x2 + 1] = True
    Image.fromarray(mask).save(path)
    return str(path)


def build_clip(root: Path, segments=None, tiny_static_frames=(), **dynamic_labels) -> ClipAnnotation:
    (root / "frames").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    frames, static_masks, dynamic_masks, boxes = [], [], [], []
    for i in range(FRAMES):
        path = root / "frames" / f"frame_{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)
        frames.append(str(path))
        static_box = (50, 100, 50, 100) if i in tiny_static_frames else (50, 100, 89, 199)
        static_masks.append(_write_mask(root / "masks" / f"static_{i:04d}.png", static_box))
        box = (DYNAMIC_X[i], 250, DYNAMIC_X[i] + 39, 299)
        dynamic_masks.append(_write_mask(root / "masks" / f"dynamic_{i:04d}.png", box))
        boxes.append(list(box))
    labels = {"direction": "Moving Left", "speed": "Maintaining a Constant Speed", "distance": DISTANCE_SAME}
    labels.update(dynamic_labels)
    return ClipAnnotation(
        clip_id="clip0", group="g0", video_path="videos/g0/clip0.mp4", frame_paths=frames, frame_times=TIMES,
        width=WIDTH, height=HEIGHT,
        camera_segments=segments if segments is not None else [
            (0, 3, ["Pan Right"]), (3, 7, ["Dolly In", "Roll CW"]), (7, 9, ["Stay"])],
        objects=[ObjectTrack("blue pillar", False, static_masks, [None] * FRAMES, [4000.0] * FRAMES),
                 ObjectTrack("red ball", True, dynamic_masks, boxes, [2000.0] * FRAMES, **labels)],
    )


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> ClipAnnotation:
    return build_clip(tmp_path_factory.mktemp("clip"))


def _write(clip, seed, tmp_path, writer=None):
    return write_clip_questions(clip, writer or TemplateWriter(), random.Random(seed), tmp_path / "overlays")


@pytest.mark.parametrize("seed", range(4))
def test_template_samples_are_valid_and_answer_the_labels(clip, tmp_path, seed):
    samples, drops = _write(clip, seed, tmp_path)
    assert drops == []
    by_id = {s.id: s for s in samples}
    # One question per moving segment ("Stay" has none) and two about the dynamic object.
    assert {"clip0_0->3", "clip0_3->7"} <= set(by_id) and "clip0_7->9" not in by_id
    assert sum(s.kind.startswith("dynamic_") for s in samples) == 2
    gold = {"camera": None, "dynamic_direct": "Moving Left", "dynamic_bbox": "Moving Left",
            "dynamic_distance": DISTANCE_SAME, "dynamic_speed": "Maintaining a Constant Speed"}
    for sample in samples:
        assert validate_sample(sample) is None
        assert sample.text_output.count(OUTPUT_IMAGE) == len(sample.image_output)
        assert all(Path(p).is_file() for p in sample.image_output)
        assert sample.image_input == clip.frame_paths
        assert len(set(sample.options.values())) == 4
        answer = sample.options[sample.answer]
        assert sample.text_output.endswith(f"<answer>\n{sample.answer}. {answer}\n</answer>")
        if sample.kind != "camera":
            assert answer == gold[sample.kind]
    assert by_id["clip0_0->3"].options[by_id["clip0_0->3"].answer] == "Pan Right"
    # SpatialVID's abbreviation is expanded to the vocabulary name.
    assert by_id["clip0_3->7"].options[by_id["clip0_3->7"].answer] == "Dolly In and Roll Clockwise"


def _frames_of(sample: QaSample) -> list[int]:
    return [int(re.search(r"_f(\d+)\.jpg$", p)[1]) for p in sample.image_output]


def test_mental_images_per_question_kind(clip, tmp_path):
    samples, _ = _write(clip, 0, tmp_path)
    by_id = {s.id: s for s in samples}
    assert _frames_of(by_id["clip0_0->3"]) == [0, 3]  # one movement: start and end frames
    two_movements = _frames_of(by_id["clip0_3->7"])
    assert len(two_movements) == 3 and two_movements[0] == 3 and two_movements[-1] == 7
    assert 3 < two_movements[1] < 7
    for sample in samples:
        if sample.kind.startswith("dynamic_"):
            frames = _frames_of(sample)
            assert 4 <= len(frames) <= 8 and frames[0] == 0 and frames[-1] == FRAMES - 1
            assert frames == sorted(set(frames))
            assert "_obj1_" in sample.image_output[0]  # the dynamic object's masks
        else:
            assert all("_obj0_" in p for p in sample.image_output)  # the static object's masks


def test_questions_quote_real_seconds(clip, tmp_path):
    samples, _ = _write(clip, 0, tmp_path)
    camera = next(s for s in samples if s.id == "clip0_0->3")
    assert format_seconds(TIMES[0]) in camera.question and format_seconds(TIMES[3]) in camera.question
    assert format_seconds(TIMES[3]) == "1.45s"


def test_same_seed_same_samples_and_seeds_vary(clip, tmp_path):
    first = [s.to_dift() for s in _write(clip, 7, tmp_path)[0]]
    again = [s.to_dift() for s in _write(clip, 7, tmp_path)[0]]
    assert first == again
    variants = {tuple((s.id, s.answer, tuple(s.options.values())) for s in _write(clip, seed, tmp_path)[0])
                for seed in range(6)}
    assert len(variants) > 1


def test_bbox_question_uses_model_input_coordinates(clip, tmp_path):
    for seed in range(30):
        samples, _ = _write(clip, seed, tmp_path)
        bbox = next((s for s in samples if s.kind == "dynamic_bbox"), None)
        if bbox is not None:
            break
    assert bbox is not None
    quoted = [int(v) for v in re.search(r"\[(\d+),(\d+),(\d+),(\d+)\]", bbox.question).groups()]
    with Image.open(clip.frame_paths[0]) as frame:
        model_width, model_height = fit_to_pixel_budget(frame).size
    sx, sy = model_width / WIDTH, model_height / HEIGHT
    x1, y1, x2, y2 = DYNAMIC_X[0], 250, DYNAMIC_X[0] + 39, 299
    expected = [int(np.floor(v * s + 0.5)) for v, s in ((x1, sx), (y1, sy), (x2, sx), (y2, sy))]
    assert (model_width, model_height) == (504, 364)
    assert quoted == expected
    assert quoted != [x1, y1, x2, y2]  # not the stored frame's coordinates


def test_dynamic_kind_draw_follows_reference_weights():
    kinds = list(DYNAMIC_KIND_WEIGHTS)
    rng = random.Random(0)
    trials = 4000
    draws = [draw_dynamic_kinds(kinds, rng, 2) for _ in range(trials)]
    assert all(len(d) == 2 and d[0] != d[1] for d in draws)
    firsts = Counter(d[0] for d in draws)
    total = sum(DYNAMIC_KIND_WEIGHTS.values())
    for kind, weight in DYNAMIC_KIND_WEIGHTS.items():
        assert abs(firsts[kind] / trials - weight / total) < 0.03
    assert draw_dynamic_kinds(["direct"], rng, 2) == ["direct"]


def test_kinds_follow_the_labels(tmp_path):
    clip = build_clip(tmp_path)
    images = [MentalImage("o.jpg", "red ball", 0, TIMES[0])]
    moving = clip.objects[1]
    assert available_dynamic_kinds(clip, moving, images) == ["direct", "bbox", "distance", "speed"]
    stationary = dataclasses.replace(moving, direction="Stationary")
    assert "speed" not in available_dynamic_kinds(clip, stationary, images)
    unlabelled = dataclasses.replace(moving, boxes=[None] * FRAMES, distance=None, speed=None)
    assert available_dynamic_kinds(clip, unlabelled, images) == ["direct"]
    # The box is the one on the first mental image's frame.
    late_box = dataclasses.replace(moving, boxes=[None] + moving.boxes[1:])
    assert "bbox" not in available_dynamic_kinds(clip, late_box, images)
    clip.objects[1] = unlabelled
    kinds = {s.kind for seed in range(6) for s in _write(clip, seed, tmp_path)[0]}
    assert kinds == {"camera", "dynamic_direct"}


def test_unusable_items_are_dropped_with_reasons(tmp_path):
    clip = build_clip(tmp_path, segments=[(0, 3, ["Pan Right"]), (3, 5, ["Zoom In"]), (5, 9, ["Tilt Up"])],
                      tiny_static_frames=(3,))
    samples, drops = _write(clip, 0, tmp_path)
    assert "clip0_5->9" in {s.id for s in samples}
    reasons = dict(d.split(": ", 1) for d in drops)
    assert "0.1%" in reasons["clip0_0->3"]  # the end frame's static mask is too small
    assert "Zoom In" in reasons["clip0_3->5"]  # not a camera-vocabulary label

    clip.objects = clip.objects[:1]
    samples, drops = _write(clip, 0, tmp_path)
    assert all(s.kind == "camera" for s in samples)
    assert any(d.startswith("clip0_dynamic: no dynamic object") for d in drops)


class _BrokenWriter(TemplateWriter):
    """Camera items: no text; dynamic items: a chain of thought without its answer, or a refusal."""

    def camera_item(self, *args):
        return None

    def dynamic_item(self, clip, track, kind, images, options, letter):
        if kind == "direct":
            raise QuestionDropped("endpoint refused")
        question, cot = super().dynamic_item(clip, track, kind, images, options, letter)
        return question, cot.replace(f"{letter}. {options[letter]}", "")


def test_writer_failures_become_drop_reasons(clip, tmp_path):
    samples, drops = _write(clip, 0, tmp_path, writer=_BrokenWriter())
    assert samples == []
    reasons = dict(d.split(": ", 1) for d in drops)
    assert reasons["clip0_0->3"] == "the writer returned no text"
    for sample_id, reason in reasons.items():
        if sample_id.endswith("_direct"):
            assert reason == "endpoint refused"
        elif "_dynamic_" in sample_id:
            assert "differs from the gold option" in reason


# --- validate_sample: each defect --------------------------------------------------------------

THINK = ("The camera is studied between 0s and 2s using the fixed pillar as a reference for motion. "
         "Picturing it at 0s and 2s, I imagine it going from <output_image> to <output_image>. It drifts left.")


def _valid_sample(**changes) -> QaSample:
    sample = QaSample(
        id="c_0->2", kind="camera", question="How does the camera move?",
        options={"A": "Pan Left", "B": "Pan Right", "C": "Tilt Up", "D": "Dolly In"}, answer="B",
        text_output=f"<think>\n{THINK}\n</think>\n<answer>\nB. Pan Right\n</answer>",
        image_input=["f0.jpg", "f1.jpg"], image_output=["o0.jpg", "o1.jpg"])
    return dataclasses.replace(sample, **changes)


def test_valid_reference_sample_passes():
    assert validate_sample(_valid_sample()) is None


@pytest.mark.parametrize(("changes", "reason"), [
    ({"image_output": ["o0.jpg"]}, "2 <output_image> tags for 1 mental images"),
    ({"text_output": f"<think>\n{THINK}\n</think>\n<answer>\nB. Pan Right <output_image>\n</answer>",
      "image_output": ["o0.jpg", "o1.jpg", "o2.jpg"]}, "outside the think block"),
    ({"text_output": f"{THINK}\n<answer>\nB. Pan Right\n</answer>"}, "0 <think> tags"),
    ({"text_output": f"<answer>\nB. Pan Right\n</answer>\n<think>\n{THINK}\n</think>"}, "followed by <answer>"),
    ({"text_output": f"<think>\n{THINK}\n</think>\n<answer>\nB. Pan Right\n</answer> trailing"},
     "and nothing else"),
    ({"text_output": f"<think>\n{THINK}\n</think>\n<answer>\nA. Pan Left\n</answer>"}, "gold option"),
    ({"text_output": f"<think>\n{THINK}\n</think>\n<answer>\nB\n</answer>"}, "gold option"),
    ({"text_output": "<think>\nfrom <output_image> to <output_image>\n</think>\n<answer>\nB. Pan Right\n</answer>"},
     "characters (needs >= 100)"),
    ({"text_output": f"<think>\n{THINK.replace('> to <', '>. Then <')}\n</think>\n<answer>\nB. Pan Right\n</answer>"},
     "not together in one sentence"),
    ({"options": {"A": "Pan Left", "B": "Pan Right", "C": "Pan Left", "D": "Dolly In"}}, "distinct"),
    ({"options": {"A": "Pan Left", "B": "Pan Right", "C": "Tilt Up"}}, "lettered"),
    ({"answer": "E"}, "answer letter"),
    ({"image_output": [], "text_output": f"<think>\n{THINK.replace('<output_image>', 'it')}\n</think>\n"
                                         "<answer>\nB. Pan Right\n</answer>"}, "image_output is empty"),
    ({"image_input": []}, "image_input is empty"),
])
def test_validate_sample_names_each_defect(changes, reason):
    assert reason in (validate_sample(_valid_sample(**changes)) or "")
