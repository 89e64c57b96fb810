"""The DSR benchmark of a synthetic world: the 13 sub-tasks' answers computed from tracks.json geometry."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from fourdthinker.data.synth.geometry import (
    DIRECTIONS,
    RESTING_SPEED,
    SPEEDS,
    STILL,
    classify_direction,
    distance_trend,
    facing_side,
    speed_profile,
    track_speeds,
)
from fourdthinker.dsr import SUBTASKS

DSR_KEYS = tuple(SUBTASKS)  # the benchmark's 13 sub-task keys, in the published order
class _Tracks:
    """Array views of a tracks.json document."""

    def __init__(self, doc: Mapping):
        self.doc = doc
        self.fps = float(doc["fps"])
        self.up = np.asarray(doc["up"], dtype=np.float64)
        self.camera_centres = np.asarray(doc["camera"]["centres"], dtype=np.float64)
        self.camera_c2w = np.asarray(doc["camera"]["rotation_c2w"], dtype=np.float64)
        self.objects = {o["id"]: o for o in doc["objects"]}

    def centres(self, object_id: int) -> np.ndarray:
        return np.asarray(self.objects[object_id]["centres"], dtype=np.float64)

    def name(self, object_id: int) -> str:
        return self.objects[object_id]["name"]

    def mean_speed(self, object_id: int) -> float:
        return float(track_speeds(self.centres(object_id), self.fps).mean())

    def final_velocity(self, object_id: int) -> np.ndarray:
        """Mean velocity (units per second) over the last quarter of the clip."""
        centres = self.centres(object_id)
        span = max(2, (len(centres) - 1) // 4)
        return (centres[-1] - centres[-1 - span]) * self.fps / span


_DISTANCE_TO_CAMERA = {"closer": "Getting Closer to Camera", "farther": "Getting Farther from Camera",
                       "same": "Maintaining Roughly the Same Distance",
                       "closer-then-farther": "First Getting Closer, Then Farther",
                       "farther-then-closer": "First Getting Farther, Then Closer"}
_DISTANCE_BETWEEN = {"closer": "They Get Closer to Each Other", "farther": "They Get Farther Apart",
                     "same": "Their Distance Stays Roughly the Same",
                     "closer-then-farther": "They First Get Closer, Then Farther Apart",
                     "farther-then-closer": "They First Get Farther Apart, Then Closer"}
_CAMERA_FACING = {"back": "Toward the camera", "front": "Away from the camera",
                  "right": "To the camera's right", "left": "To the camera's left"}
_RELATIVE_PLACE = {"front": "In front of it", "back": "Behind it", "right": "To its right", "left": "To its left"}
_HALVES = ("In the first half", "In the second half", "About equally fast in both halves",
           "It does not move at all")
_PREDICTED_GAP = ("They will get closer to each other", "They will get farther apart",
                  "Their distance will stay about the same", "They will first get closer, then farther apart")


def _abs_dis(t: _Tracks, a: int) -> str | None:
    trend = distance_trend(np.linalg.norm(t.centres(a) - t.camera_centres, axis=1))
    return _DISTANCE_TO_CAMERA.get(trend)


def _abs_dir(t: _Tracks, a: int) -> str | None:
    c = t.centres(a)
    return classify_direction(c[-1] - c[0], c[0], t.camera_centres[0], t.up)


def _abs_ori(t: _Tracks, a: int) -> str | None:
    forward = t.objects[a].get("forward")
    if forward is None:
        return None
    # Classify the front against the camera's line of sight: along it is facing away, against it toward.
    line_of_sight = t.centres(a)[0] - t.camera_centres[0]
    return _CAMERA_FACING.get(facing_side(line_of_sight, np.asarray(forward[0]), t.up))


def _abs_spd(t: _Tracks, a: int) -> str | None:
    return speed_profile(track_speeds(t.centres(a), t.fps))


def _abs_spd_comp(t: _Tracks, a: int) -> str | None:
    first, second = (float(h.mean()) for h in np.array_split(track_speeds(t.centres(a), t.fps), 2))
    if max(first, second) < RESTING_SPEED:
        return _HALVES[3]
    if first > 1.25 * second:
        return _HALVES[0]
    if second > 1.25 * first:
        return _HALVES[1]
    if max(first, second) < 1.1 * min(first, second):
        return _HALVES[2]
    return None


def _abs_dir_pred(t: _Tracks, a: int) -> str | None:
    # Extrapolated over one clip length, seen from where the camera ends.
    duration = (len(t.camera_centres) - 1) / t.fps
    return classify_direction(t.final_velocity(a) * duration, t.centres(a)[-1], t.camera_centres[-1], t.up)


def _rel_dis(t: _Tracks, a: int, b: int) -> str | None:
    return _DISTANCE_BETWEEN.get(distance_trend(np.linalg.norm(t.centres(a) - t.centres(b), axis=1)))


def _rel_dir(t: _Tracks, a: int, b: int) -> str | None:
    ca, cb = t.centres(a), t.centres(b)
    if np.linalg.norm(ca[-1] - ca[0]) < STILL:      # "a relative to b" is asked about a moving a
        return None
    return classify_direction((ca[-1] - cb[-1]) - (ca[0] - cb[0]), ca[0], t.camera_centres[0], t.up)


def _rel_ori(t: _Tracks, a: int, b: int) -> str | None:
    forward = t.objects[a].get("forward")
    if forward is None:
        return None
    side = facing_side(np.asarray(forward[0]), t.centres(b)[0] - t.centres(a)[0], t.up)
    return _RELATIVE_PLACE.get(side)


def _rel_spd(t: _Tracks, *candidates: int) -> str | None:
    speeds = sorted(((t.mean_speed(c), c) for c in candidates), reverse=True)
    if speeds[0][0] < 1.3 * speeds[1][0]:
        return None
    return f"The {t.name(speeds[0][1])}"


def _rel_spd_comp(t: _Tracks, a: int, b: int) -> str | None:
    sa, sb = t.mean_speed(a), t.mean_speed(b)
    options = _rel_spd_comp_options(t, a, b)
    if max(sa, sb) < RESTING_SPEED:
        return options[3]
    if min(sa, sb) < RESTING_SPEED or max(sa, sb) >= 1.3 * min(sa, sb):
        return options[0] if sa > sb else options[1]
    return options[2] if max(sa, sb) < 1.1 * min(sa, sb) else None


def _rel_spd_comp_options(t: _Tracks, a: int, b: int) -> tuple[str, ...]:
    na, nb = t.name(a), t.name(b)
    return (f"The {na} is faster than the {nb}", f"The {na} is slower than the {nb}",
            "They move at about the same speed", "Neither of them moves")


def _rel_dir_pred(t: _Tracks, a: int, b: int) -> str | None:
    gap = t.centres(a)[-1] - t.centres(b)[-1]
    relative_velocity = t.final_velocity(a) - t.final_velocity(b)
    if np.linalg.norm(relative_velocity) < RESTING_SPEED:
        return _PREDICTED_GAP[2]
    rate = float(gap @ relative_velocity / np.linalg.norm(gap))
    if rate < -0.1:
        return _PREDICTED_GAP[0]
    if rate > 0.1:
        return _PREDICTED_GAP[1]
    return None


def _non_temp(t: _Tracks, *candidates: int) -> str | None:
    """The candidate seen furthest left in the first frame (smallest x/z in camera coordinates)."""
    w2c = t.camera_c2w[0].T
    points = np.stack([w2c @ (t.centres(c)[0] - t.camera_centres[0]) for c in candidates])
    slopes = points[:, 0] / points[:, 2]
    order = np.argsort(slopes)
    if slopes[order[1]] - slopes[order[0]] < 0.05:
        return None
    return f"The {t.name(candidates[order[0]])}"


@dataclass(frozen=True)
class QuestionFamily:
    key: str
    arity: int                         # objects the question names (4: pick one among four)
    subject: str                       # what the first object must be: "any", "moving" or "box"
    template: str
    answer: Callable[..., str | None]
    options: tuple[str, ...] | Callable[..., tuple[str, ...]] | None = None   # None: the candidates


FAMILIES: dict[str, QuestionFamily] = {f.key: f for f in (
    QuestionFamily("abs_dis", 1, "any", "How does the distance between the camera and the {a} change "
                   "during the video?", _abs_dis, tuple(_DISTANCE_TO_CAMERA.values())),
    QuestionFamily("abs_dir", 1, "moving", "Seen from where the camera starts, in which direction does the "
                   "{a} move over the video?", _abs_dir, DIRECTIONS),
    QuestionFamily("abs_ori", 1, "box", "In the first frame, which way is the {a} facing? (Its lighter "
                   "face is its front.)", _abs_ori, tuple(_CAMERA_FACING.values())),
    QuestionFamily("abs_spd", 1, "moving", "How does the speed of the {a} change during the video?",
                   _abs_spd, SPEEDS),
    QuestionFamily("abs_spd_comp", 1, "any", "When does the {a} move faster: in the first half or in the "
                   "second half of the video?", _abs_spd_comp, _HALVES),
    QuestionFamily("abs_dir_pred", 1, "moving", "If the {a} keeps moving as it does at the end of the video, "
                   "in which direction will it move next, seen from where the camera ends?",
                   _abs_dir_pred, DIRECTIONS),
    QuestionFamily("rel_dis", 2, "any", "How does the distance between the {a} and the {b} change during "
                   "the video?", _rel_dis, tuple(_DISTANCE_BETWEEN.values())),
    QuestionFamily("rel_dir", 2, "moving", "Seen from where the camera starts, in which direction does the "
                   "{a} move relative to the {b}?", _rel_dir, DIRECTIONS),
    QuestionFamily("rel_ori", 2, "box", "In the first frame, where is the {b} from the point of view of the "
                   "{a}? (The {a}'s lighter face is its front.)", _rel_ori, tuple(_RELATIVE_PLACE.values())),
    QuestionFamily("rel_spd", 4, "any", "Which of these objects moves fastest on average during the video?",
                   _rel_spd),
    QuestionFamily("rel_spd_comp", 2, "any", "How does the average speed of the {a} compare with that of "
                   "the {b}?", _rel_spd_comp, _rel_spd_comp_options),
    QuestionFamily("rel_dir_pred", 2, "moving", "If the {a} and the {b} keep moving as they do at the end of "
                   "the video, what happens to the distance between them next?", _rel_dir_pred, _PREDICTED_GAP),
    QuestionFamily("non_temp", 4, "any", "In the first frame, which of these objects appears furthest to "
                   "the left?", _non_temp),
)}


def answer_from_tracks(kind: str, tracks: Mapping, subjects: Sequence[int]) -> str | None:
    """The correct option text of a `kind` question about object ids `subjects`; None if ambiguous."""
    if kind not in FAMILIES:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {DSR_KEYS}")
    return FAMILIES[kind].answer(_Tracks(tracks), *subjects)


def option_texts(kind: str, tracks: Mapping, subjects: Sequence[int]) -> tuple[str, ...]:
    """Every option a `kind` question about `subjects` may offer (the answer among them)."""
    family, t = FAMILIES[kind], _Tracks(tracks)
    if family.options is None:
        return tuple(f"The {t.name(s)}" for s in subjects)
    if callable(family.options):
        return family.options(t, *subjects)
    return family.options


@dataclass(frozen=True)
class Question:
    video_id: str
    kind: str
    question: str
    subjects: tuple[int, ...]
    answer: str
    distractors: tuple[str, ...]


def _subject_candidates(family: QuestionFamily, t: _Tracks, rng: np.random.Generator) -> list[tuple[int, ...]]:
    ids = list(t.objects)
    eligible = {"any": ids, "moving": [i for i in ids if t.objects[i]["dynamic"]],
                "box": [i for i in ids if t.objects[i]["shape"] == "box"]}[family.subject]
    if family.arity == 1:
        candidates = [(a,) for a in eligible]
    elif family.arity == 2:
        candidates = [(a, b) for a in eligible for b in ids if b != a]
    else:
        candidates = list(combinations(ids, family.arity))
    return [candidates[i] for i in rng.permutation(len(candidates))]


def clip_questions(tracks: Mapping, rng: np.random.Generator, count: int, first_key: int) -> list[Question]:
    """Up to `count` unambiguous questions, trying keys in DSR order from `first_key` (for balance)."""
    t = _Tracks(tracks)
    questions: list[Question] = []
    for offset in range(len(DSR_KEYS)):
        if len(questions) == count:
            break
        family = FAMILIES[DSR_KEYS[(first_key + offset) % len(DSR_KEYS)]]
        for subjects in _subject_candidates(family, t, rng):
            answer = family.answer(t, *subjects)
            if answer is None:
                continue
            pool = [o for o in option_texts(family.key, tracks, subjects) if o != answer]
            distractors = tuple(pool[i] for i in rng.permutation(len(pool))[:3])
            names = {"a": t.name(subjects[0]), "b": t.name(subjects[1]) if len(subjects) > 1 else ""}
            questions.append(Question(tracks["video_id"], family.key, family.template.format(**names),
                                      tuple(int(s) for s in subjects), answer, distractors))
            break
    return questions


def benchmark_rows(questions: Sequence[Question], rng: np.random.Generator) -> list[dict]:
    """DSR rows; gold letters are dealt from shuffled ABCD blocks so that each letter is as common."""
    letters = "ABCD"
    gold = np.concatenate([rng.permutation(4) for _ in range(-(-len(questions) // 4))])
    rows = []
    for q, slot in zip(questions, gold):
        texts = list(q.distractors)
        texts.insert(int(slot), q.answer)
        rows.append({"videoID": q.video_id, "question": q.question,
                     "options": [f"{letter}. {text}" for letter, text in zip(letters, texts)],
                     "answer": letters[slot], "type": q.kind})
    return rows
