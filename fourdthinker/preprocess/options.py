"""Multiple-choice options for the QA writers: distractor strategies and the A-D shuffle.

Strategies follow the reference (REFERENCE-SPEC §4.3 step 7, §5.2 step 10), with two deliberate
differences: labels outside the vocabulary are rejected instead of becoming answers (SpatialVID's
"Stay", free-form LLM text), and a strategy that cannot produce enough distinct distractors raises
instead of returning a short list. All randomness comes from the `random.Random` passed in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fourdthinker.data.vocab import (
    CAMERA_LABELS,
    CAMERA_OPPOSITES,
    DIRECTION_OPPOSITES,
    DIRECTION_RELATED,
    DISTANCE_EXTRA_DISTRACTORS,
    DISTANCE_LABELS,
    OBJECT_DIRECTIONS,
    SPEED_LABELS,
)
from fourdthinker.prompts import OPTION_LETTERS

# Chance that a random camera distractor is a combination (same length as a multi-movement answer).
COMBO_PROBABILITY = 0.4


def format_movement(labels: Sequence[str]) -> str:
    """Option text of a movement list: "A", "A and B", "A, B and C"."""
    if not labels:
        raise ValueError("format_movement needs at least one label")
    if len(labels) == 1:
        return labels[0]
    return f"{', '.join(labels[:-1])} and {labels[-1]}"


def camera_distractors(correct: Sequence[str], rng: random.Random, n: int = 3) -> list[list[str]]:
    """`n` wrong camera-movement lists for the answer `correct` (full vocabulary names).

    In order: every movement reversed; for multi-movement answers, one movement reversed at a time;
    then random single movements or, with probability 0.4, random combinations of the answer's length.
    No two lists (nor a list and the answer) hold the same set of movements.
    """
    correct = list(correct)
    _require_known(
        correct,
        CAMERA_LABELS,
        "camera movement",
        "normalize_camera_label first; segments labelled 'Stay' have no camera-motion question",
    )
    if len(set(correct)) != len(correct):
        raise ValueError(f"camera movements {correct} repeat a label")
    seen = {frozenset(correct)}
    distractors: list[list[str]] = []

    def offer(candidate: list[str]) -> None:
        if len(distractors) < n and frozenset(candidate) not in seen:
            seen.add(frozenset(candidate))
            distractors.append(candidate)

    offer([CAMERA_OPPOSITES[label] for label in correct])
    if len(correct) > 1:
        for i in range(len(correct)):
            offer(correct[:i] + [CAMERA_OPPOSITES[correct[i]]] + correct[i + 1 :])

    pool = [label for label in CAMERA_LABELS if label not in correct]
    rng.shuffle(pool)
    position = 0
    while len(distractors) < n and position < len(pool):
        combo_fits = len(correct) > 1 and position + len(correct) <= len(pool)
        if combo_fits and rng.random() < COMBO_PROBABILITY:
            offer(pool[position : position + len(correct)])
            position += len(correct)
        else:
            offer([pool[position]])
            position += 1
    _require_count(distractors, n, f"camera movements {correct}")
    return distractors


def direction_distractors(correct: str, rng: random.Random, n: int = 3) -> list[str]:
    """`n` wrong object directions: the opposite (if any), then the related directions, then random."""
    _require_known([correct], OBJECT_DIRECTIONS, "object direction", "use a vocabulary direction")
    ordered = [DIRECTION_OPPOSITES[correct]] if correct in DIRECTION_OPPOSITES else []
    ordered += [d for d in DIRECTION_RELATED[correct] if d not in ordered]
    rest = [d for d in OBJECT_DIRECTIONS if d != correct and d not in ordered]
    rng.shuffle(rest)
    distractors = (ordered + rest)[:n]
    _require_count(distractors, n, f"object direction {correct!r}")
    return distractors


def speed_distractors(correct: str, rng: random.Random, n: int = 3) -> list[str]:
    """`n` random speed labels other than `correct`."""
    _require_known([correct], SPEED_LABELS, "speed label", "use a vocabulary speed label")
    others = [label for label in SPEED_LABELS if label != correct]
    _require_count(others, n, f"speed label {correct!r}")
    return rng.sample(others, n)


def distance_distractors(correct: str, rng: random.Random, n: int = 3) -> list[str]:
    """The other distance labels, then random picks from the two-phase extras, `n` in all."""
    _require_known([correct], DISTANCE_LABELS, "distance label", "use a vocabulary distance label")
    extras = list(DISTANCE_EXTRA_DISTRACTORS)
    rng.shuffle(extras)
    distractors = ([label for label in DISTANCE_LABELS if label != correct] + extras)[:n]
    _require_count(distractors, n, f"distance label {correct!r}")
    return distractors


def multiple_choice(
    correct_text: str, distractor_texts: Sequence[str], rng: random.Random
) -> tuple[dict[str, str], str]:
    """Four distinct options in shuffled order under letters A-D, and the answer's letter.

    Uses the first three distractors that differ from the answer and from each other; raises
    ValueError when there are fewer than three.
    """
    distinct = list(dict.fromkeys(t for t in distractor_texts if t != correct_text))
    wanted = len(OPTION_LETTERS) - 1
    if len(distinct) < wanted:
        raise ValueError(
            f"{len(distinct)} distinct distractor(s) for {correct_text!r} (need {wanted}): "
            f"{list(distractor_texts)}"
        )
    texts = [correct_text, *distinct[:wanted]]
    rng.shuffle(texts)
    options = dict(zip(OPTION_LETTERS, texts))
    return options, OPTION_LETTERS[texts.index(correct_text)]


def _require_known(labels: Sequence[str], vocabulary: Sequence[str], kind: str, fix: str) -> None:
    if not labels:
        raise ValueError(f"no {kind} given; the answer needs at least one")
    unknown = [label for label in labels if label not in vocabulary]
    if unknown:
        raise ValueError(f"{kind} {unknown} not in the vocabulary {tuple(vocabulary)}; {fix}")


def _require_count(distractors: Sequence, n: int, what: str) -> None:
    if len(distractors) < n:
        raise ValueError(
            f"cannot build {n} distinct distractors for {what}: only {len(distractors)} exist"
        )
