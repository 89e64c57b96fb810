"""Latent decoding on vLLM's V2 model runner (CUDA builds; the V2 runner needs Triton).

vLLM 0.26 runs a model with custom logits processors on its V1 runner (`logits.py`, `state.py`).
Its V2 runner instead lets a model bring its own `ModelState` (`get_model_state_cls`), which sees
every request arrive and leave, builds the step's `inputs_embeds` and may wrap the sampler. Here the
whole latent state machine lives on the GPU, so a step adds a few small kernels and no host work:

- forcing (`forced_tokens`): from the last latent_size + 1 tokens of each sequence (the runner keeps
  every request's tokens on the device), pad x latent_size after `<|latent_start|>`, then
  `<|latent_end|>`; `latent_force_steps` force a start. The sampled token is replaced, and its
  log-prob is the raw one of the forced token, as the V1 path reports it.
- recording: a forced pad's input is this step's hidden state of its row. It is appended to a slab
  on the device (row index from a running count, no host sync) with the request's serial number
  and token position, and `vector_row[slot, position]` points at it.
- injection: every step, each row whose input is a pad takes the slab row its (slot, position)
  points at, written into the runner's persistent `inputs_embeds` buffer (CUDA graphs read it).
  A preempted request leaves its slot; when it is scheduled again (a new slot, the same request id)
  its pointers are rebuilt from the slab, so the recompute feeds the same vectors.
- `pop(keys)`: one device-to-host read of the slab's bookkeeping. The slab starts over once no
  request is in flight.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

# Vectors the slab holds between two pops (all requests of one `generate`): 64k x 2048 bf16 = 256 MB.
CAPACITY_ENV = "FOURDTHINKER_LATENT_CAPACITY"
DEFAULT_CAPACITY = 65536
MAX_FORCE_STEPS = 64  # latent_force_steps per request (a probe/test hook)


def forced_tokens(tail: torch.Tensor, out_step: torch.Tensor, force_steps: torch.Tensor,
                  pad_id: int, start_id: int, end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token each row must sample, or -1, and whether it is a pad (its input gets recorded).

    tail [R, K+1]: each row's last K+1 tokens, oldest first (-1 before the sequence start);
    out_step [R]: the output index of the token about to be sampled; force_steps [R, F]: output
    steps forced to `<|latent_start|>` (-1 padding). The rule is the V1 logits processor's."""
    k = tail.shape[1] - 1
    trailing = torch.flip(tail == pad_id, [1]).long().cumprod(1).sum(1)  # pads at the end, 0..K+1
    before = tail.gather(1, (k - trailing).clamp(min=0).unsqueeze(1)).squeeze(1)
    in_block = (trailing <= k) & (before == start_id)
    pad = in_block & (trailing < k)
    end = in_block & (trailing == k)
    start = ~in_block & (force_steps == out_step.unsqueeze(1)).any(1)
    token = torch.where(pad, pad_id, torch.where(end, end_id, torch.where(start, start_id, -1)))
    return token, pad


@functools.cache
def latent_model_state_cls():
    """`LatentModelState`, built on first use: its base imports the V2 runner (Triton)."""
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    return _make_cls(DefaultModelState)


class ForcingSampler:
    """The runner's sampler, then the latent state's forcing and recording on its output."""

    def __init__(self, inner, state):
        self.inner, self.state = inner, state

    def __getattr__(self, name):  # the runner also reads the sampler's states
        return getattr(self.inner, name)

    def __call__(self, logits: torch.Tensor, input_batch):
        plan = self.state.plan_step(logits, input_batch, self.inner.returns_logprobs(input_batch.idx_mapping_np))
        out = self.inner(logits, input_batch)
        return self.state.apply_step(out, plan)


def _make_cls(base):
    from vllm.v1.worker.gpu.sample.output import SamplerOutput

    from fourdthinker.tokens import LatentIds

    class LatentModelState(base):
        def __init__(self, vllm_config, model, encoder_cache, device):
            super().__init__(vllm_config, model, encoder_cache, device)
            ids = LatentIds.from_config(vllm_config.model_config.hf_config)
            self.pad_id, self.start_id, self.end_id, self.latent_size = ids.pad, ids.start, ids.end, ids.latent_size
            self.capacity = int(os.environ.get(CAPACITY_ENV, DEFAULT_CAPACITY))
            hidden = vllm_config.model_config.get_hidden_size()
            r, n = self.max_num_reqs, self.max_model_len
            # slab row of the vector fed at (slot, token position); column n and row `capacity`
            # take the writes of rows that record nothing
            self.vector_row = torch.full((r, n + 1), -1, dtype=torch.int64, device=device)
            self.slab = torch.zeros(self.capacity + 1, hidden, dtype=self.dtype, device=device)
            self.slab_serial = torch.full((self.capacity + 1,), -1, dtype=torch.int64, device=device)
            self.slab_pos = torch.zeros(self.capacity + 1, dtype=torch.int64, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)
            self.overflow = torch.zeros((), dtype=torch.bool, device=device)
            self.slot_serial = torch.full((r,), -1, dtype=torch.int64, device=device)
            self.force_steps = torch.full((r, MAX_FORCE_STEPS), -1, dtype=torch.int64, device=device)
            self.req_states = None  # the runner's RequestState (the sampler's), set by custom_sampler
            self._hidden: torch.Tensor | None = None
            self._next_serial = 0
            self.serial_of: dict[str, int] = {}  # vLLM request id -> serial (kept across preemption)
            self.key_of: dict[int, str] = {}  # serial -> latent key
            self.live: set[str] = set()
            model.latent_sampling = self  # compute_logits hands its rows over

        # -- requests ---------------------------------------------------------------------
        def add_request(self, req_index: int, new_req_data) -> None:
            super().add_request(req_index, new_req_data)
            req_id = new_req_data.req_id
            extra = (new_req_data.sampling_params.extra_args or {}) if new_req_data.sampling_params else {}
            resumed = req_id in self.serial_of
            if not resumed:
                self.serial_of[req_id] = self._next_serial
                self.key_of[self._next_serial] = extra.get("latent_key") or f"req:{req_id}"
                self._next_serial += 1
            serial = self.serial_of[req_id]
            self.live.add(req_id)
            self.slot_serial[req_index].fill_(serial)
            self.vector_row[req_index].fill_(-1)
            if resumed:  # point the new slot at the vectors recorded before the preemption
                mine = self.slab_serial[: self.capacity] == serial
                cols = torch.where(mine, self.slab_pos[: self.capacity], self.max_model_len)
                self.vector_row[req_index].index_copy_(
                    0, cols, torch.arange(self.capacity, device=cols.device))
                self.vector_row[req_index, self.max_model_len] = -1
            steps = [int(s) for s in extra.get("latent_force_steps", ())][:MAX_FORCE_STEPS]
            self.force_steps[req_index].fill_(-1)
            if steps:
                self.force_steps[req_index, : len(steps)].copy_(torch.tensor(steps), non_blocking=True)

        def remove_request(self, req_id: str) -> None:
            super().remove_request(req_id)
            self.live.discard(req_id)  # finished or preempted: its serial stays until a pop

        # -- inputs: latent vectors into the pad rows ---------------------------------------
        def get_mm_embeddings(self, scheduled_encoder_inputs, input_batch, req_states):
            embeds = super().get_mm_embeddings(scheduled_encoder_inputs, input_batch, req_states)
            n = input_batch.num_tokens
            if n == 0:
                return embeds
            ids, pos = input_batch.input_ids[:n], input_batch.positions[:n]
            if n == input_batch.num_reqs:  # a pure decode step: row i is request i
                slot = input_batch.idx_mapping[:n].long()
            else:
                req = torch.searchsorted(input_batch.query_start_loc[1: input_batch.num_reqs + 1],
                                         torch.arange(n, device=ids.device, dtype=input_batch.query_start_loc.dtype),
                                         right=True)
                slot = input_batch.idx_mapping[req].long()
            row = self.vector_row[slot, pos.clamp(max=self.max_model_len)]
            take = (ids == self.pad_id) & (row >= 0)
            rows = embeds[:n]
            rows.copy_(torch.where(take.unsqueeze(1), self.slab[row.clamp(min=0)].to(rows.dtype), rows))
            return embeds

        # -- sampling: forcing and recording ------------------------------------------------
        def stash_hidden(self, hidden: torch.Tensor) -> None:
            self._hidden = hidden

        def plan_step(self, logits: torch.Tensor, input_batch, with_logprobs: bool):
            """Before sampling: which rows are forced, to what, and (if the batch returns log-probs)
            their raw log-probs. None for a batch of no request of ours (the runner's dummy runs)."""
            hidden, self._hidden = self._hidden, None
            if hidden is None or not input_batch.req_ids or input_batch.req_ids[0] not in self.live:
                return None
            num_reqs = input_batch.num_reqs
            slot = input_batch.idx_mapping[:num_reqs].long()
            pos = input_batch.positions[input_batch.logits_indices][:num_reqs].long()  # last input token
            k = self.latent_size
            cols = pos.unsqueeze(1) + torch.arange(-k, 1, device=pos.device)
            tokens = self.req_states.all_token_ids.gpu[slot.unsqueeze(1), cols.clamp(min=0)].long()
            tail = torch.where(cols >= 0, tokens, -1)
            out_step = pos + 1 - self.req_states.prompt_len.gpu[slot].long()
            token, pad = forced_tokens(tail, out_step, self.force_steps[slot], self.pad_id, self.start_id,
                                       self.end_id)
            # only rows that really sample (not a chunk in the middle of a prefill)
            real = input_batch.seq_lens[:num_reqs] >= self.req_states.prefill_len.gpu[slot]
            token = torch.where(real, token, -1)
            pad = pad & real
            raw = None
            if with_logprobs:  # a pass over the whole vocabulary: only when someone reads it
                raw = logits.float().log_softmax(-1).gather(1, token.clamp(min=0).unsqueeze(1)).squeeze(1)
            self._record(hidden[:num_reqs], pad, slot, pos + 1)
            return token, raw

        def _record(self, hidden: torch.Tensor, pad: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor) -> None:
            order = torch.cumsum(pad.long(), 0) - 1
            index = self.count + order
            self.overflow |= (pad & (index >= self.capacity)).any()
            index = torch.where(pad & (index < self.capacity), index, self.capacity)
            self.slab.index_copy_(0, index, hidden.to(self.slab.dtype))
            self.slab_serial.index_copy_(0, index, self.slot_serial[slot])
            self.slab_pos.index_copy_(0, index, pos)
            flat = slot * (self.max_model_len + 1) + torch.where(pad, pos.clamp(max=self.max_model_len),
                                                                 self.max_model_len)
            self.vector_row.view(-1).index_copy_(0, flat, torch.where(pad, index, -1))
            self.count += pad.sum()

        def apply_step(self, out, plan):
            if plan is None:
                return out
            token, raw = plan
            forced = token >= 0
            sampled = out.sampled_token_ids
            sampled = torch.where(forced.view(-1, 1), token.view(-1, 1).to(sampled.dtype), sampled)
            logprobs = out.logprobs_tensors
            if logprobs is not None and raw is not None:  # column 0 is the sampled token
                ids = logprobs.logprob_token_ids.clone()
                ids[:, 0] = torch.where(forced, token.to(ids.dtype), ids[:, 0])
                values = logprobs.logprobs.clone()
                values[:, 0] = torch.where(forced, raw.to(values.dtype), values[:, 0])
                logprobs = logprobs._replace(logprob_token_ids=ids, logprobs=values)
            return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=logprobs, num_nans=out.num_nans,
                                 num_sampled=out.num_sampled, num_rejected=out.num_rejected)

        def custom_sampler(self, sampler):
            self.req_states = sampler.req_states
            return ForcingSampler(sampler, self), None

        # -- handing vectors out -------------------------------------------------------------
        def pop(self, keys: list[str]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
            if bool(self.overflow):
                raise RuntimeError(f"more than {self.capacity} latent vectors between two pops: raise "
                                   f"{CAPACITY_ENV} (vectors; each takes hidden_size x 2 bytes on the GPU)")
            n = int(self.count)
            serials = self.slab_serial[:n].cpu().numpy()
            positions = self.slab_pos[:n].cpu().numpy()
            serial_of_key = {key: s for s, key in self.key_of.items()}
            out = {}
            for key in keys:
                serial = serial_of_key.get(key)
                if serial is not None:  # popped: forget it
                    self.key_of.pop(serial, None)
                rows = np.flatnonzero(serials == serial) if serial is not None else np.zeros(0, dtype=np.int64)
                if len(rows) == 0:
                    out[key] = ([], None)
                    continue
                # by position; a position recorded twice (a step whose output a preemption threw
                # away, then sampled again) keeps its last record, the one vector_row points at
                rows = rows[np.lexsort((rows, positions[rows]))]
                rows = rows[np.append(positions[rows][1:] != positions[rows][:-1], True)]
                index = torch.from_numpy(rows).to(self.slab.device)
                out[key] = ([int(p) for p in positions[rows]], self.slab.index_select(0, index))
            if not self.live:  # nothing in flight: start the slab over
                self.count.zero_()
                self.slab_serial.fill_(-1)
                self.serial_of.clear()
                self.key_of.clear()
            return out

    return LatentModelState
