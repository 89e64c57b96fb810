"""The one prompt policy for training, RL, evaluation and serving.

The reference appends a format suffix to every question; DIFT, 4DRL and DSR evaluation differed in
its wording (REFERENCE-SPEC §12). We keep the DIFT wording everywhere so released checkpoints see
the prompt they were trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PROMPT_SUFFIX = (
    "\nFirst, think about the reasoning process with mental imagery of the relevant object or "
    "region, then provide the user with the answer. Put the reasoning in <think>...</think> and "
    "only the final answer in <answer>...</answer>, e.g. <think> reasoning process (with mental "
    "imagery as needed) </think><answer> answer here </answer>."
)

OPTION_LETTERS = ("A", "B", "C", "D")


def options_block(options: Mapping[str, str] | Sequence[str]) -> str:
    """"A. …\\nB. …" lines. A mapping gives letter → text; a sequence is taken verbatim (DSR
    options already carry their "A. " prefixes)."""
    if isinstance(options, Mapping):
        return "\n".join(f"{k}. {v}" for k, v in options.items() if str(v).strip())
    return "\n".join(str(o) for o in options)


def question_prompt(question: str, options: Mapping[str, str] | Sequence[str] | None = None) -> str:
    """Question (+ blank line + options) + the format suffix: the user text of every stage."""
    text = question if options is None else f"{question}\n\n{options_block(options)}"
    return text + PROMPT_SUFFIX
