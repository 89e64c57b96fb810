"""Per-request latent vectors inside one vLLM worker: where they come from and where they go.

A request in latent mode must read, at the input of each `<|latent_pad|>` slot at token position P,
the final hidden state the model produced at position P-1. The logits processor decides which rows
are forced to a pad this step and records `h[row]` under (request, P); on the next step (or on any
later re-prefill after preemption) `embed_input_ids` writes the vector into the row that carries
position P. Keyed by token position, the state survives preemption, recompute and chunked prefill.

Rows of the flattened batch are found from the runner's own bookkeeping (request order,
`num_computed_tokens`, `query_start_loc`): a model alone cannot map rows to requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.utils.torch_utils import async_tensor_h2d


@dataclass
class RequestLatents:
    """The vectors of one request, by token position, in the order they were produced."""

    positions: dict[int, torch.Tensor] = field(default_factory=dict)

    def ordered(self) -> tuple[list[int], torch.Tensor | None]:
        pos = sorted(self.positions)
        if not pos:
            return [], None
        return pos, torch.stack([self.positions[p] for p in pos])


class LatentState:
    """Shared by the model (reads/writes embeddings and hidden states) and the logits processor."""

    def __init__(self, runner, pad_id: int, start_id: int, end_id: int, latent_size: int):
        self.runner = runner
        self.pad_id, self.start_id, self.end_id = pad_id, start_id, end_id
        self.latent_size = latent_size
        self.requests: dict[str, RequestLatents] = {}  # by latent key
        self.key_of_req_id: dict[str, str] = {}
        self._hidden: torch.Tensor | None = None  # this step's rows given to compute_logits
        self._pending: dict[str, set[int]] = {}  # by vLLM request id: recorded, not yet fed

    # -- the model's side ------------------------------------------------------------------
    def stash_hidden(self, hidden: torch.Tensor) -> None:
        self._hidden = hidden

    def take_hidden(self) -> torch.Tensor | None:
        hidden, self._hidden = self._hidden, None  # prompt-logprob calls reuse compute_logits
        return hidden

    def inject(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Write stored vectors into the rows of this step that hold their positions."""
        if not self.requests:
            return embeds
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        if num_reqs == 0:
            return embeds
        qsl = self.runner.query_start_loc.np[: num_reqs + 1]
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        if int(qsl[num_reqs]) == num_reqs:
            # A pure decode step (one token per request): only a vector recorded since the last
            # step can be due, so look at those alone, not at every request of the batch.
            if not self._pending:
                return embeds
            rows, vectors = self._due_pending(batch.req_id_to_index, computed)
        else:
            rows, vectors = self._due_in_spans(batch.req_ids[:num_reqs], qsl, computed)
        if not rows:
            return embeds
        index = async_tensor_h2d(rows, embeds.device, torch.long)  # no host stall (async scheduling)
        values = torch.stack(vectors).to(device=embeds.device, dtype=embeds.dtype)
        # Only rows that really carry the pad id take a vector: a wrong mapping must not
        # silently overwrite text.
        is_pad = input_ids.index_select(0, index) == self.pad_id
        current = embeds.index_select(0, index)
        embeds = embeds.index_copy(0, index, torch.where(is_pad.unsqueeze(-1), values, current))
        return embeds

    def _due_pending(self, index_of: dict[str, int], computed: np.ndarray) -> tuple[list[int], list[torch.Tensor]]:
        """Decode step: the rows whose one scheduled position holds a freshly recorded vector."""
        rows, vectors = [], []
        for req_id, positions in list(self._pending.items()):
            i = index_of.get(req_id)
            if i is None or i >= len(computed):
                continue  # not scheduled now (preempted): its re-prefill scans the spans
            pos = int(computed[i])
            if pos in positions:
                rows.append(i)
                vectors.append(self.requests[self.key_of_req_id[req_id]].positions[pos])
            positions.difference_update(p for p in list(positions) if p <= pos)
            if not positions:
                del self._pending[req_id]
        return rows, vectors

    def _due_in_spans(self, req_ids: list[str], qsl: np.ndarray,
                      computed: np.ndarray) -> tuple[list[int], list[torch.Tensor]]:
        """Prefill, chunked prefill or a recompute after preemption: each request's scheduled
        span [c, c + n) against its own stored positions (O(requests in the batch))."""
        rows, vectors = [], []
        for i, req_id in enumerate(req_ids):
            key = self.key_of_req_id.get(req_id)
            store = self.requests.get(key) if key is not None else None
            if not store or not store.positions:
                continue
            start, n = int(computed[i]), int(qsl[i + 1] - qsl[i])
            for pos, vec in store.positions.items():
                if start <= pos < start + n:
                    rows.append(int(qsl[i]) + pos - start)
                    vectors.append(vec)
            pending = self._pending.get(req_id)
            if pending is not None:
                pending.difference_update(p for p in list(pending) if p < start + n)
                if not pending:
                    del self._pending[req_id]
        return rows, vectors

    # -- the logits processor's side ------------------------------------------------------
    def record(self, hidden: torch.Tensor, rows: np.ndarray, req_ids: list[str], keys: list[str],
               positions: list[int]) -> None:
        """Keep `hidden[rows[j]]` as the input of token position `positions[j]` of request `keys[j]`
        (vLLM request `req_ids[j]`); it is due at that request's next step."""
        if len(rows) == 0:
            return
        taken = hidden.index_select(0, async_tensor_h2d(rows, hidden.device, torch.long)).detach().clone()
        for j, (req_id, key, pos) in enumerate(zip(req_ids, keys, positions)):
            self.requests.setdefault(key, RequestLatents()).positions[int(pos)] = taken[j]
            self._pending.setdefault(req_id, set()).add(int(pos))

    def bind(self, req_id: str, key: str) -> None:
        self.key_of_req_id[req_id] = key
        self.requests.setdefault(key, RequestLatents())

    def release(self, req_id: str, keep: bool) -> None:
        """A request left the batch for good; drop its vectors unless a caller will pop them."""
        key = self.key_of_req_id.pop(req_id, None)
        self._pending.pop(req_id, None)
        if key is not None and not keep:
            self.requests.pop(key, None)

    def pop(self, keys: list[str]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        out = {}
        for key in keys:
            store = self.requests.pop(key, None)
            out[key] = store.ordered() if store is not None else ([], None)
        return out
