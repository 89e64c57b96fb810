"""Answer extraction follows the DSR evaluation rules exactly; rewards and their registry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fourdthinker.errors import UsageError
from fourdthinker.rewards import (
    ANSWER_PREFIXES,
    REWARDS,
    RewardSpec,
    accuracy_reward,
    default_reward_specs,
    extract_choice,
    extract_option_letter,
    format_reward,
    score_completions,
    strip_latent_tokens,
)
from fourdthinker.tokens import LATENT_END, LATENT_PAD, LATENT_START

LATENT_IMAGE = LATENT_START + LATENT_PAD * 4 + LATENT_END

EXTRACTION_CASES = [
    # (model output, expected letter)
    ("<answer>B</answer>", "B"),
    # The tag content wins over capitals in the reasoning ("As" would give A).
    ("<think>As the car turns</think><answer>C. left</answer>", "C"),
    ("<ANSWER> D </Answer>", "D"),
    ("<answer>\n  The answer is\n B. toward the camera\n</answer>", "B"),
    # Only the first answer tag counts.
    ("<answer>A</answer> wait, no: <answer>B</answer>", "A"),
    # No tag: the whole output is searched.
    ("C. The object moves left", "C"),
    # Prefix removal is case-sensitive: "BEST ANSWER:" stays and its B is taken.
    ("BEST ANSWER: C", "B"),
    ("best answer: C", "C"),
    # The reference's defect we keep for comparability: the first capital A-D anywhere counts.
    ("Based on the video, the object moves left, so the choice is C", "B"),
    ("<answer>Dolly in</answer>", "D"),
    # A tag without a letter falls back to the whole output.
    ("<think>Option C fits the motion</think><answer>left</answer>", "C"),
    # More than 10 words and no option letter: no answer.
    ("<answer>the object moves to the left of the frame at a steady pace</answer>", ""),
    # ...and a long answer with a letter still gives the letter.
    ("<answer>the object moves to the left of the frame at a steady pace, option C</answer>", "C"),
    ("<answer>left</answer>", ""),
    ("", ""),
    # Latent tokens (lower-case) never contribute a letter.
    (f"<think>{LATENT_IMAGE} it moves away</think><answer>{LATENT_IMAGE}</answer>", ""),
    (f"<think>{LATENT_IMAGE}</think><answer>{LATENT_PAD}B{LATENT_END}</answer>", "B"),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION_CASES, ids=[repr(t[:40]) for t, _ in EXTRACTION_CASES])
def test_extract_choice_follows_the_dsr_rules(text, expected):
    assert extract_choice(text) == expected


@pytest.mark.parametrize("prefix", ANSWER_PREFIXES)
def test_each_answer_prefix_is_removed_before_the_letter_search(prefix):
    # "Answer:", "Best answer:" and "Best option:" carry a capital A/B: only removal hides it.
    assert extract_option_letter(prefix) == ""
    assert extract_option_letter(f"{prefix} C") == "C"
    assert extract_choice(f"<answer>{prefix} D. farther</answer>") == "D"


def test_prefixes_are_removed_in_the_reference_order():
    # "The answer is" is listed before "The answer": the longer phrase goes, leaving no stray "is".
    assert ANSWER_PREFIXES.index("The answer is") < ANSWER_PREFIXES.index("The answer")
    assert ANSWER_PREFIXES[0] == "The best answer is" and ANSWER_PREFIXES[-1] == "Option:"
    assert len(ANSWER_PREFIXES) == 10


def test_rl_letter_set_is_a_parameter():
    # The reference reward searched A-F; evaluation (and our reward) A-D.
    assert extract_option_letter("From the video it moves left") == ""
    assert extract_option_letter("From the video it moves left", letters="ABCDEF") == "F"


def test_strip_latent_tokens_replaces_them_with_single_spaces():
    assert strip_latent_tokens(f"a{LATENT_START}{LATENT_PAD}b \n {LATENT_END}c") == "a b c"


def test_latent_token_fallback_never_finds_a_letter_the_whole_output_missed():
    # REFERENCE-SPEC 13.4 item 45 says the last fallback cannot change the result. Check it over
    # every concatenation of up to three fragments chosen to interact with the prefixes: pieces of
    # each prefix, latent tokens and whitespace (which the fallback rewrites), and bare letters.
    fragments = {LATENT_PAD, LATENT_START, LATENT_END, " ", "  ", "\n", "B", "A", ":", "is"}
    for prefix in ANSWER_PREFIXES:
        fragments.add(prefix)
        fragments.update(prefix.split(" "))
    fragments = sorted(fragments)
    checked = 0
    for size in (1, 2, 3):
        for parts in itertools.product(fragments, repeat=size):
            text = "".join(parts)
            if extract_option_letter(text) == "":
                assert extract_option_letter(strip_latent_tokens(text)) == "", repr(text)
                checked += 1
    assert checked > 1000  # the property was exercised on many letter-free outputs


def test_accuracy_reward_compares_with_the_normalised_gold_letter():
    completion = "<think>it moves away</think><answer>B. farther</answer>"
    assert accuracy_reward(completion, "B") == 1.0
    assert accuracy_reward(completion, " b ") == 1.0
    assert accuracy_reward(completion, "B. farther") == 1.0
    assert accuracy_reward(completion, "C") == 0.0
    assert accuracy_reward("<answer>no idea at all</answer>", "A") == 0.0
    with pytest.raises(ValueError, match="gold option letter"):
        accuracy_reward(completion, "  ")


@pytest.mark.parametrize(("completion", "expected"), [
    ("<think>r</think><answer>A</answer>", 1.0),
    (f"prefix <think>\n{LATENT_IMAGE} moving\n</think>\n  <answer>\nB\n</answer> trailing", 1.0),
    ("<answer>A</answer>", 0.0),
    ("<think>r</think>", 0.0),
    ("<answer>A</answer><think>r</think>", 0.0),
    ("<think>r</think> so <answer>A</answer>", 0.0),  # only whitespace may separate them
    ("</think>r</think><answer>A</answer>", 0.0),  # the reference RL suffix's typo is not accepted
])
def test_format_reward(completion, expected):
    assert format_reward(completion, "A") == expected


def test_default_specs_are_the_reference_weights():
    assert default_reward_specs() == [RewardSpec("accuracy", 1.0), RewardSpec("format", 0.2)]


def test_score_completions_weights_each_reward():
    completions = [
        "<think>r</think><answer>B</answer>",  # right, formatted
        "<answer>B</answer>",  # right, no think
        "<think>r</think><answer>C</answer>",  # wrong, formatted
        "no idea",  # neither
    ]
    solutions = ["B", "B", "B", "A"]
    scores = score_completions(completions, solutions)
    accuracy = np.array([accuracy_reward(c, s) for c, s in zip(completions, solutions)])
    fmt = np.array([format_reward(c, s) for c, s in zip(completions, solutions)])
    np.testing.assert_array_equal(scores.per_reward["accuracy"], [1, 1, 0, 0])
    np.testing.assert_array_equal(scores.per_reward["format"], [1, 0, 1, 0])
    np.testing.assert_allclose(scores.total, 1.0 * accuracy + 0.2 * fmt)
    assert scores.errors == {"accuracy": 0, "format": 0}

    custom = score_completions(completions, solutions, [RewardSpec("format", 0.5)])
    assert list(custom.per_reward) == ["format"]
    np.testing.assert_allclose(custom.total, 0.5 * fmt)


def test_a_failing_reward_scores_zero_for_that_sample_and_is_counted(monkeypatch):
    def picky(completion: str, solution: str) -> float:
        if "boom" in completion:
            raise RuntimeError("cannot parse")
        return 2.0

    monkeypatch.setitem(REWARDS, "picky", picky)
    scores = score_completions(["ok", "boom", "<answer>A</answer>"], ["A", "A", "A"],
                               [RewardSpec("picky", 1.0), RewardSpec("accuracy", 1.0)])
    np.testing.assert_array_equal(scores.per_reward["picky"], [2.0, 0.0, 2.0])
    np.testing.assert_array_equal(scores.total, [2.0, 0.0, 3.0])
    assert scores.errors == {"picky": 1, "accuracy": 0}


def test_empty_gold_letter_is_counted_as_an_accuracy_error():
    scores = score_completions(["<answer>A</answer>", "<answer>A</answer>"], ["A", ""])
    np.testing.assert_array_equal(scores.per_reward["accuracy"], [1.0, 0.0])
    assert scores.errors["accuracy"] == 1


def test_unknown_reward_name_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"'accurcy'.*accuracy.*format"):
        RewardSpec("accurcy", 1.0)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "1.0"])
def test_reward_weight_must_be_a_finite_number(weight):
    with pytest.raises(UsageError, match="weight"):
        RewardSpec("format", weight)


def test_score_completions_rejects_mismatched_lengths_and_repeated_names():
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        score_completions(["a", "b"], ["A"])
    with pytest.raises(UsageError, match="repeat"):
        score_completions(["a"], ["A"], [RewardSpec("format", 0.1), RewardSpec("format", 0.2)])
