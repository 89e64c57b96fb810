"""The V2 runner's latent state machine (`fourdthinker/vllm_plugin/runner_v2.py`).

The rule runs on the device, vectorised over a batch; here it must decide exactly what the V1 logits
processor decides from the same token lists. (The V2 runner itself needs Triton, so the engine-level
checks, tests/test_vllm_plugin.py on a GPU, run on the lent GPU machine, not in CI.)
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from fourdthinker.vllm_plugin.logits import FORCE_END, FORCE_PAD, FORCE_START, LatentLogitsProcessor, _Row
from fourdthinker.vllm_plugin.runner_v2 import forced_tokens

PAD, START, END, K = 7, 5, 6, 4


def _v1_decision(prompt: list[int], output: list[int], force_steps: frozenset[int]) -> int:
    lp = LatentLogitsProcessor.__new__(LatentLogitsProcessor)
    lp.state = SimpleNamespace(pad_id=PAD, start_id=START, end_id=END, latent_size=K)
    kind = lp._decide(_Row("r", "k", False, prompt, output, force_steps))
    return {0: -1, FORCE_PAD: PAD, FORCE_END: END, FORCE_START: START}[kind]


def _sequences(rng, n: int) -> list[tuple[list[int], list[int], frozenset[int]]]:
    """Prompts and outputs mostly of ordinary tokens, with latent blocks cut at every point,
    spontaneous starts, stray pads and forced steps."""
    out = []
    for _ in range(n):
        prompt = rng.integers(0, 5, rng.integers(1, 4)).tolist()
        output: list[int] = []
        while len(output) < rng.integers(0, 14):
            r = rng.random()
            if r < 0.25:
                output += [START] + [PAD] * int(rng.integers(0, K + 2))  # a block, cut or over-long
            elif r < 0.3:
                output.append(PAD)
            elif r < 0.35:
                output.append(END)
            else:
                output.append(int(rng.integers(0, 5)))
        force = frozenset(rng.integers(0, 16, rng.integers(0, 3)).tolist())
        out.append((prompt, output, force))
    return out


def test_the_device_rule_decides_what_the_v1_logits_processor_decides():
    rng = np.random.default_rng(0)
    seqs = _sequences(rng, 400)
    tails, steps, forces = [], [], []
    for prompt, output, force in seqs:
        seq = prompt + output
        tail = seq[-(K + 1):]
        tails.append([-1] * (K + 1 - len(tail)) + tail)
        steps.append(len(output))
        forces.append(sorted(force) + [-1] * (3 - len(force)))
    token, pad = forced_tokens(torch.tensor(tails), torch.tensor(steps), torch.tensor(forces), PAD, START, END)
    expected = [_v1_decision(p, o, f) for p, o, f in seqs]
    assert token.tolist() == expected
    assert pad.tolist() == [e == PAD for e in expected]
    kinds = set(expected)
    assert {PAD, END, START, -1} <= kinds  # every branch was taken
