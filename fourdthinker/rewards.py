"""Answer extraction by the DSR evaluation rules, and the GRPO rewards built on it.

`extract_choice` reproduces the letter extraction of the reference DSR evaluation
(REFERENCE-SPEC §10.4) on purpose, defects included, so that our benchmark numbers are comparable
with the published ones. The rule is lenient to the point of being wrong (§13.4 item 45): without
an `<answer>` tag it returns the first capital A-D *anywhere*, so "Based on ..." answers "B"; its
">10 words" guard never changes the outcome; and its last fallback (latent tokens removed) can never
find a letter the previous step missed. A stricter parser would score a different benchmark.

The RL accuracy reward uses the same rule with the evaluation's letters A-D (the reference reward
searched A-F, so "From ..." was rewarded as "F" while evaluation read a different letter): what
the policy is rewarded for is exactly what it is scored on.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fourdthinker.errors import UsageError
from fourdthinker.tokens import LATENT_TOKENS

logger = logging.getLogger(__name__)

# Removed verbatim (case-sensitive, every occurrence) in this order; longer phrases come before
# their own prefixes ("The answer is" before "The answer") so the longer one wins.
ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
    "Answer:",
    "Option:",
)

EVAL_LETTERS = "ABCD"
# Text longer than this many words with no option letter is "no answer" (a rambling reply).
_MAX_WORDS_WITHOUT_LETTER = 10

_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)
_THINK_THEN_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def extract_option_letter(text: str, letters: str = EVAL_LETTERS) -> str:
    """The reference's raw letter rule: drop the answer prefixes, then the first of `letters`
    anywhere in what is left ('' when none)."""
    for prefix in ANSWER_PREFIXES:
        text = text.replace(prefix, "")
    letter = re.search(f"[{re.escape(letters)}]", text)
    if len(text.split()) > _MAX_WORDS_WITHOUT_LETTER and letter is None:
        return ""
    return letter.group(0) if letter else ""


def answer_span(text: str) -> str:
    """The content of the first `<answer>...</answer>` (tags in any case, across lines), or the
    whole text when there is none."""
    match = _ANSWER_TAG.search(text)
    return match.group(1) if match else text


def strip_latent_tokens(text: str) -> str:
    """The text with the latent tokens replaced by spaces and whitespace runs collapsed."""
    for token in LATENT_TOKENS:
        text = text.replace(token, " ")
    return " ".join(text.split())


def extract_choice(text: str) -> str:
    """The option letter ('A'-'D') a model output answers, or '' when none, by the DSR rules:
    the `<answer>` content first, then the whole output, then the output without latent tokens.

    Reproduces the reference rule for comparability, including its defects (see the module
    docstring): the first capital A-D anywhere counts, even inside a word.
    """
    for candidate in (answer_span(text), text, strip_latent_tokens(text)):
        letter = extract_option_letter(candidate)
        if letter:
            return letter
    return ""


def gold_letter(solution: str) -> str:
    """The solution's option letter: stripped, upper-cased, first character."""
    letter = str(solution).strip().upper()[:1]
    if not letter:
        raise ValueError(f"solution {solution!r} is empty: every sample needs its gold option letter")
    return letter


RewardFn = Callable[[str, str], float]


def accuracy_reward(completion: str, solution: str) -> float:
    """1.0 iff the completion's extracted choice is the solution letter."""
    return float(extract_choice(completion) == gold_letter(solution))


def format_reward(completion: str, solution: str) -> float:
    """1.0 iff the completion has `<think>...</think>` followed by `<answer>...</answer>`."""
    del solution  # format does not depend on the answer; the argument keeps one RewardFn signature
    return float(_THINK_THEN_ANSWER.search(completion) is not None)


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
}


def get_reward(name: str) -> RewardFn:
    """The registered reward function called `name`."""
    try:
        return REWARDS[name]
    except KeyError:
        raise UsageError(
            f"unknown reward {name!r}: choose one of {sorted(REWARDS)} (or register it in "
            "fourdthinker.rewards.REWARDS)"
        ) from None


@dataclass(frozen=True)
class RewardSpec:
    """One term of the total reward: a registered reward function and its weight."""

    name: str
    weight: float

    def __post_init__(self) -> None:
        get_reward(self.name)  # fail when the config is read, not mid-training
        if not isinstance(self.weight, numbers.Real) or not math.isfinite(self.weight):
            raise UsageError(f"reward {self.name!r}: weight {self.weight!r} must be a finite number")


def default_reward_specs() -> list[RewardSpec]:
    """The reference's GRPO rewards: accuracy 1.0, format 0.2."""
    return [RewardSpec("accuracy", 1.0), RewardSpec("format", 0.2)]


@dataclass(frozen=True)
class RewardScores:
    """Per-reward scores, their weighted total (one value per completion) and error counts."""

    per_reward: dict[str, np.ndarray]
    total: np.ndarray
    errors: dict[str, int]


def score_completions(completions: Sequence[str], solutions: Sequence[str],
                      specs: Sequence[RewardSpec] | None = None) -> RewardScores:
    """Score every completion with every reward; total = sum of weight x reward.

    A reward function that raises on a sample scores that sample 0.0 and the failure is counted
    (and logged once per reward), so one malformed sample cannot stop a training step.
    """
    if len(completions) != len(solutions):
        raise ValueError(f"{len(completions)} completions but {len(solutions)} solutions: "
                         "pass one solution per completion (repeat each prompt's solution G times)")
    specs = default_reward_specs() if specs is None else list(specs)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"reward names {names} repeat: list each reward once with its total weight")

    per_reward: dict[str, np.ndarray] = {}
    errors: dict[str, int] = {}
    for spec in specs:
        fn = get_reward(spec.name)
        values = np.zeros(len(completions), dtype=np.float64)
        failures: list[Exception] = []
        for i, (completion, solution) in enumerate(zip(completions, solutions)):
            try:
                values[i] = fn(completion, solution)
            except Exception as err:  # noqa: BLE001 - any failure of a pluggable reward scores 0
                failures.append(err)
        if failures:
            logger.warning("reward %r failed on %d of %d samples (scored 0); first error: %r",
                           spec.name, len(failures), len(completions), failures[0])
        per_reward[spec.name] = values
        errors[spec.name] = len(failures)

    weights = np.array([spec.weight for spec in specs], dtype=np.float64)
    stacked = np.stack([per_reward[n] for n in names]) if names else np.zeros((0, len(completions)))
    return RewardScores(per_reward=per_reward, total=weights @ stacked, errors=errors)
