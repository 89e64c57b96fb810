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
        self._injected = torch.zeros((), dtype=torch.long)

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
        rows: list[int] = []
        vectors: list[torch.Tensor] = []
        # O(requests in the batch): each request's scheduled span [c, c + n) is checked against
        # its own stored positions; a decode step has n == 1.
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            key = self.key_of_req_id.get(req_id)
            store = self.requests.get(key) if key is not None else None
            if not store or not store.positions:
                continue
            start, n = int(computed[i]), int(qsl[i + 1] - qsl[i])
            if n == 1:  # decode: one dict lookup instead of a scan of the request's vectors
                vec = store.positions.get(start)
                if vec is not None:
                    rows.append(int(qsl[i]))
                    vectors.append(vec)
                continue
            for pos, vec in store.positions.items():
                if start <= pos < start + n:
                    rows.append(int(qsl[i]) + pos - start)
                    vectors.append(vec)
        if not rows:
            return embeds
        index = torch.as_tensor(rows, device=embeds.device)
        values = torch.stack(vectors).to(device=embeds.device, dtype=embeds.dtype)
        # Only rows that really carry the pad id take a vector: a wrong mapping must not
        # silently overwrite text.
        is_pad = input_ids.index_select(0, index) == self.pad_id
        current = embeds.index_select(0, index)
        embeds = embeds.index_copy(0, index, torch.where(is_pad.unsqueeze(-1), values, current))
        # Kept on the device: reading it here would stall the CPU on the GPU every step.
        self._injected = self._injected + is_pad.sum()
        return embeds

    @property
    def injected_rows(self) -> int:
        """Rows that received a latent vector so far (tests and metrics; synchronises once)."""
        return int(self._injected)

    # -- the logits processor's side ------------------------------------------------------
    def record(self, hidden: torch.Tensor, rows: np.ndarray, keys: list[str], positions: list[int]) -> None:
        """Keep `hidden[rows[j]]` as the input of token position `positions[j]` of request `keys[j]`."""
        if len(rows) == 0:
            return
        taken = hidden.index_select(0, torch.as_tensor(rows, device=hidden.device)).detach().clone()
        for j, (key, pos) in enumerate(zip(keys, positions)):
            self.requests.setdefault(key, RequestLatents()).positions[int(pos)] = taken[j]

    def bind(self, req_id: str, key: str) -> None:
        self.key_of_req_id[req_id] = key
        self.requests.setdefault(key, RequestLatents())

    def release(self, req_id: str, keep: bool) -> None:
        """A request left the batch for good; drop its vectors unless a caller will pop them."""
        key = self.key_of_req_id.pop(req_id, None)
        if key is not None and not keep:
            self.requests.pop(key, None)

    def pop(self, keys: list[str]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        out = {}
        for key in keys:
            store = self.requests.pop(key, None)
            out[key] = store.ordered() if store is not None else ([], None)
        return out
