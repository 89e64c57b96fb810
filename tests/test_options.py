"""QA option vocabularies and distractor strategies (REFERENCE-SPEC §4.1, §4.3 step 7, §5.1, §5.2)."""

from __future__ import annotations

import itertools
import random

import pytest

from fourdthinker.data import vocab
from fourdthinker.preprocess.options import (
    camera_distractors,
    direction_distractors,
    distance_distractors,
    format_movement,
    multiple_choice,
    speed_distractors,
)

SEEDS = range(40)
# One movement per axis, as a SpatialVID segment carries them.
CAMERA_AXES = [vocab.CAMERA_LABELS[i : i + 2] for i in range(0, 12, 2)]
CAMERA_ANSWERS = [
    list(labels)
    for size in (1, 2, 3)
    for axes in itertools.combinations(CAMERA_AXES, size)
    for labels in itertools.product(*axes)
]


# --- vocabularies --------------------------------------------------------------------------------


def test_vocabulary_sizes_and_uniqueness():
    for labels, size in [
        (vocab.CAMERA_LABELS, 12),
        (vocab.OBJECT_DIRECTIONS, 11),
        (vocab.SPEED_LABELS, 6),
        (vocab.DISTANCE_LABELS, 3),
        (vocab.DISTANCE_EXTRA_DISTRACTORS, 2),
    ]:
        assert len(labels) == len(set(labels)) == size
    assert set(vocab.DISTANCE_EXTRA_DISTRACTORS).isdisjoint(vocab.DISTANCE_LABELS)


@pytest.mark.parametrize(
    ("opposites", "labels"),
    [(vocab.CAMERA_OPPOSITES, vocab.CAMERA_LABELS), (vocab.DIRECTION_OPPOSITES, vocab.OBJECT_DIRECTIONS)],
)
def test_opposites_are_an_involution_without_fixed_points(opposites, labels):
    assert set(opposites) <= set(labels) and set(opposites.values()) <= set(labels)
    for label, opposite in opposites.items():
        assert opposite != label and opposites[opposite] == label


def test_every_camera_label_has_an_opposite_and_stationary_has_none():
    assert set(vocab.CAMERA_OPPOSITES) == set(vocab.CAMERA_LABELS)
    assert set(vocab.DIRECTION_OPPOSITES) == set(vocab.OBJECT_DIRECTIONS) - {vocab.STATIONARY}


def test_related_directions_and_abbreviations_stay_in_the_vocabulary():
    assert set(vocab.DIRECTION_RELATED) == set(vocab.OBJECT_DIRECTIONS)
    for direction, related in vocab.DIRECTION_RELATED.items():
        assert direction not in related and set(related) <= set(vocab.OBJECT_DIRECTIONS)
        assert vocab.DIRECTION_OPPOSITES.get(direction) not in related
    assert set(vocab.CAMERA_LABEL_ABBREVIATIONS.values()) <= set(vocab.CAMERA_LABELS)
    assert vocab.CAMERA_STAY not in vocab.CAMERA_LABELS


# --- format_movement ---------------------------------------------------------------------------


def test_format_movement_joins_with_commas_and_a_final_and():
    assert format_movement(["Pan Left"]) == "Pan Left"
    assert format_movement(["Dolly In", "Pan Left"]) == "Dolly In and Pan Left"
    assert format_movement(["Dolly In", "Truck Left", "Pan Left"]) == "Dolly In, Truck Left and Pan Left"
    with pytest.raises(ValueError):
        format_movement([])


# --- camera distractors --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_camera_distractors_are_distinct_sets_from_the_vocabulary(seed):
    rng = random.Random(seed)
    for correct in CAMERA_ANSWERS:
        distractors = camera_distractors(correct, rng)
        sets = [frozenset(correct)] + [frozenset(d) for d in distractors]
        assert len(distractors) == 3 and len(set(sets)) == 4
        for distractor in distractors:
            assert distractor and len(set(distractor)) == len(distractor)
            assert set(distractor) <= set(vocab.CAMERA_LABELS)


def test_camera_distractors_start_with_all_reversed_then_one_reversed_at_a_time():
    correct = ["Dolly In", "Truck Left", "Pan Right"]
    distractors = camera_distractors(correct, random.Random(0))
    assert distractors == [
        ["Dolly Out", "Truck Right", "Pan Left"],
        ["Dolly Out", "Truck Left", "Pan Right"],
        ["Dolly In", "Truck Right", "Pan Right"],
    ]
    single = camera_distractors(["Tilt Up"], random.Random(0))
    assert single[0] == ["Tilt Down"]
    assert all(len(d) == 1 for d in single)  # combos only for multi-movement answers


def test_camera_distractors_after_the_flips_are_random_singles_or_same_length_combos():
    # With every camera label paired, three flips always exist for two movements; the random
    # strategy shows from the fourth distractor on.
    correct = ["Dolly In", "Pan Right"]
    lengths = set()
    for seed in SEEDS:
        distractors = camera_distractors(correct, random.Random(seed), n=6)
        flips = [["Dolly Out", "Pan Left"], ["Dolly Out", "Pan Right"], ["Dolly In", "Pan Left"]]
        assert distractors[:3] == flips
        for extra in distractors[3:]:
            lengths.add(len(extra))
            assert not set(extra) & set(correct)
    assert lengths == {1, 2}


def test_camera_distractors_are_deterministic_per_seed():
    correct = ["Pedestal Up"]
    runs = [[camera_distractors(correct, random.Random(seed)) for seed in SEEDS] for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({tuple(map(tuple, d)) for d in runs[0]}) > 1  # the seed does matter


@pytest.mark.parametrize("bad", [["Stay"], ["Roll CW"], [], ["Pan Left", "Pan Left"]])
def test_camera_distractors_reject_answers_outside_the_vocabulary(bad):
    with pytest.raises(ValueError):
        camera_distractors(bad, random.Random(0))


# --- object-motion distractors -------------------------------------------------------------------


@pytest.mark.parametrize("direction", vocab.OBJECT_DIRECTIONS)
def test_direction_distractors_prefer_opposite_then_related(direction):
    opposite = vocab.DIRECTION_OPPOSITES.get(direction)
    related = list(vocab.DIRECTION_RELATED[direction])
    expected_prefix = ([opposite] if opposite else []) + related
    for seed in SEEDS:
        distractors = direction_distractors(direction, random.Random(seed))
        assert len(set(distractors)) == 3 and direction not in distractors
        assert set(distractors) <= set(vocab.OBJECT_DIRECTIONS)
        assert distractors[: min(3, len(expected_prefix))] == expected_prefix[:3]


def test_stationary_gets_a_random_third_direction():
    thirds = {direction_distractors(vocab.STATIONARY, random.Random(seed))[2] for seed in SEEDS}
    assert len(thirds) > 1
    assert not thirds & {vocab.STATIONARY, "Moving Left", "Moving Right"}


@pytest.mark.parametrize("speed", vocab.SPEED_LABELS)
def test_speed_distractors_are_three_other_speeds(speed):
    picks = [speed_distractors(speed, random.Random(seed)) for seed in SEEDS]
    for distractors in picks:
        assert len(set(distractors)) == 3 and speed not in distractors
        assert set(distractors) <= set(vocab.SPEED_LABELS)
    assert set().union(*picks) == set(vocab.SPEED_LABELS) - {speed}


@pytest.mark.parametrize("distance", vocab.DISTANCE_LABELS)
def test_distance_distractors_are_the_other_two_then_an_extra(distance):
    extras = set()
    for seed in SEEDS:
        distractors = distance_distractors(distance, random.Random(seed))
        assert distractors[:2] == [d for d in vocab.DISTANCE_LABELS if d != distance]
        extras.add(distractors[2])
    assert extras == set(vocab.DISTANCE_EXTRA_DISTRACTORS)


@pytest.mark.parametrize(
    ("strategy", "label"),
    [
        (direction_distractors, "moving left"),
        (speed_distractors, "Accelerating"),
        (distance_distractors, "First Getting Closer, Then Farther"),  # an extra, never an answer
    ],
)
def test_object_distractors_reject_labels_outside_the_vocabulary(strategy, label):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        strategy(label, random.Random(0))


# --- multiple choice -----------------------------------------------------------------------------


def test_multiple_choice_letters_and_answer_are_consistent():
    correct = format_movement(["Dolly In", "Pan Right"])
    answers = set()
    for seed in SEEDS:
        rng = random.Random(seed)
        distractors = [format_movement(d) for d in camera_distractors(["Dolly In", "Pan Right"], rng)]
        options, answer = multiple_choice(correct, distractors, rng)
        assert list(options) == ["A", "B", "C", "D"]
        assert options[answer] == correct
        assert sorted(options.values()) == sorted([correct, *distractors])
        answers.add(answer)
    assert answers == {"A", "B", "C", "D"}  # the answer's position is shuffled


def test_multiple_choice_is_deterministic_per_seed():
    distractors = ["Moving Right", "Moving Left-Up", "Moving Left-Down"]
    first = [multiple_choice("Moving Left", distractors, random.Random(seed)) for seed in SEEDS]
    second = [multiple_choice("Moving Left", distractors, random.Random(seed)) for seed in SEEDS]
    assert first == second


def test_multiple_choice_skips_duplicates_and_needs_four_distinct_options():
    options, answer = multiple_choice("A", ["B", "A", "B", "C", "D", "E"], random.Random(0))
    assert sorted(options.values()) == ["A", "B", "C", "D"] and options[answer] == "A"
    with pytest.raises(ValueError, match="2 distinct distractor"):
        multiple_choice("A", ["B", "A", "B", "C"], random.Random(0))
