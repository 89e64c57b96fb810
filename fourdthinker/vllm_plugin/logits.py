"""The latent state machine of each request, as a vLLM v1 logits processor.

After a request samples `<|latent_start|>`, its next `latent_size` tokens are forced to
`<|latent_pad|>` and then `<|latent_end|>` is forced. The decision depends only on the tail of the
request's tokens, so it is recomputed from the live token lists every step: no counter can drift
across preemption or recompute. For each row forced to a pad, the hidden state of this step (the
input of that pad slot) is recorded in the shared `LatentState`.

Sampling params `extra_args`:
  latent_key          str: the caller's key to fetch this request's latent vectors afterwards
  latent_force_steps  list[int]: output steps at which `<|latent_start|>` is forced (tests, probes)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm import SamplingParams
from vllm.utils.torch_utils import async_tensor_h2d
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

FORCE_PAD, FORCE_END, FORCE_START = 1, 2, 3


@dataclass
class _Row:
    req_id: str
    key: str
    keep: bool  # a caller will pop the vectors (it gave a latent_key)
    prompt: list[int]
    output: list[int]  # vLLM's live list: grows as tokens are sampled
    force_steps: frozenset[int]


class LatentLogitsProcessor(LogitsProcessor):
    """Forces pad x K then end after each start, per request; records the fed hidden states."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.state = None  # a LatentState, attached by the worker extension after start-up
        self.rows: dict[int, _Row] = {}
        self._pending: list[tuple[int, SamplingParams, list[int] | None, list[int]]] = []

    @classmethod
    def validate_params(cls, params: SamplingParams):
        extra = params.extra_args or {}
        if "latent_key" in extra and params.n != 1:
            raise ValueError("latent_key needs n=1: submit one request per sample "
                             "(the prompt stays in the prefix cache)")
        steps = extra.get("latent_force_steps", [])
        if not all(isinstance(s, int) and s >= 0 for s in steps):
            raise ValueError(f"latent_force_steps must be non-negative ints, got {steps!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # it forces tokens

    def attach(self, state) -> None:
        self.state = state

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        state = self.state
        req_ids = state.runner.input_batch.req_ids if state is not None else None
        for index, params, prompt, output in batch_update.added:
            if state is None:
                continue
            req_id = req_ids[index]
            extra = params.extra_args or {}
            key = extra.get("latent_key") or f"req:{req_id}"
            state.bind(req_id, key)
            self.rows[index] = _Row(req_id, key, "latent_key" in extra, list(prompt or []), output,
                                    frozenset(extra.get("latent_force_steps", ())))
        for index in batch_update.removed:
            row = self.rows.pop(index, None)
            if row is not None and state is not None and row.req_id not in state.runner.requests:
                state.release(row.req_id, keep=row.keep)  # finished (not merely preempted)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = rb

    def _decide(self, row: _Row) -> int:
        k = self.state.latent_size
        out = row.output
        last = out[-1] if out else (row.prompt[-1] if row.prompt else None)
        if last != self.state.pad_id and last != self.state.start_id:  # the common case: plain text
            return FORCE_START if len(out) in row.force_steps else 0
        tail = out[-(k + 1):]
        if len(tail) < k + 1:
            tail = row.prompt[len(tail) - (k + 1):] + tail
        trailing_pads = 0
        for tok in reversed(tail):
            if tok != self.state.pad_id:
                break
            trailing_pads += 1
        before = tail[-trailing_pads - 1] if trailing_pads < len(tail) else None
        if before == self.state.start_id:
            return FORCE_PAD if trailing_pads < k else FORCE_END
        if len(out) in row.force_steps:
            return FORCE_START
        return 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        state = self.state
        hidden = state.take_hidden() if state is not None else None
        if state is None or not self.rows:
            return logits
        # O(requests) per step: each decision reads at most latent_size + 1 tokens of a row.
        decided = [(i, self._decide(r)) for i, r in self.rows.items() if i < logits.shape[0]]
        forced = [(i, d) for i, d in decided if d]
        if not forced:
            return logits
        index = np.fromiter((i for i, _ in forced), dtype=np.int64, count=len(forced))
        kind = np.fromiter((d for _, d in forced), dtype=np.int64, count=len(forced))
        token = np.choose(kind - 1, [state.pad_id, state.end_id, state.start_id])
        # Pinned, non-blocking copies, and fill values that never leave the device: any blocking
        # copy stalls the host on the GPU and undoes vLLM's overlap of scheduling with the forward
        # (async scheduling). `logits[rows] = -inf` is such a copy: its Python float becomes a
        # CPU tensor moved to the GPU with a stream synchronize (measured at ~3 ms a forced step).
        rows_t = async_tensor_h2d(index, logits.device, torch.long)
        logits.index_fill_(0, rows_t, float("-inf"))
        logits.index_put_((rows_t, async_tensor_h2d(token, logits.device, torch.long)),
                          torch.zeros((), dtype=logits.dtype, device=logits.device))
        pad_rows = index[kind == FORCE_PAD]
        if len(pad_rows) and hidden is not None:
            rows = [self.rows[i] for i in pad_rows.tolist()]
            # The pad sampled now sits at position len(prompt) + len(output); its input is the
            # hidden state this step produced for the position before it.
            state.record(hidden, pad_rows, [r.req_id for r in rows], [r.key for r in rows],
                         [len(r.prompt) + len(r.output) for r in rows])
        return logits
