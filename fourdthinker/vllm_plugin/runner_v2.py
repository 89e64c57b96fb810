"""Latent decoding on vLLM's V2 model runner (CUDA builds; the V2 runner needs Triton).

vLLM 0.26 runs a model with custom logits processors on its V1 runner (`logits.py`, `state.py`).
Its V2 runner instead lets a model bring its own `ModelState` (`get_model_state_cls`), which sees
every request arrive and leave, builds the step's `inputs_embeds` and may wrap the sampler. Here the
whole latent state machine lives on the GPU, three Triton kernels a step (`latent_kernels`) and no
host work:

- forcing: from the last latent_size + 1 tokens of each sequence (the runner keeps every request's
  tokens on the device), pad x latent_size after `<|latent_start|>`, then `<|latent_end|>`;
  `latent_force_steps` force a start. The sampled token is replaced, and its log-prob is the raw one
  of the forced token, as the V1 path reports it.
- recording: a forced pad's input is this step's hidden state of its row. It is appended to a slab
  on the device (row index from an atomic count, no host sync) with the request's serial number
  and token position, and `vector_row[slot, position]` points at it.
- injection: every step, each row whose input is a pad takes the slab row its (slot, position)
  points at, written into the runner's persistent `inputs_embeds` buffer (CUDA graphs read it).
  A preempted request leaves its slot; when it is scheduled again (a new slot, the same request id)
  its pointers are rebuilt from the slab, so the recompute feeds the same vectors.
- `pop(keys)`: the batch's slab rows sorted and de-duplicated on the device, one gather, one read
  of their bookkeeping to the host. The slab starts over once no request is in flight.
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
    from fourdthinker.tokens import LatentIds
    from fourdthinker.vllm_plugin import latent_kernels

    class LatentModelState(base):
        def __init__(self, vllm_config, model, encoder_cache, device):
            super().__init__(vllm_config, model, encoder_cache, device)
            ids = LatentIds.from_config(vllm_config.model_config.hf_config)
            self.pad_id, self.start_id, self.end_id, self.latent_size = ids.pad, ids.start, ids.end, ids.latent_size
            self.capacity = int(os.environ.get(CAPACITY_ENV, DEFAULT_CAPACITY))
            hidden = vllm_config.model_config.get_hidden_size()
            r, n = self.max_num_reqs, self.max_model_len
            # slab row of the vector fed at (slot, token position); column n takes the positions
            # past the context (clamped), which no input reads
            self.vector_row = torch.full((r, n + 1), -1, dtype=torch.int64, device=device)
            self.slab = torch.zeros(self.capacity, hidden, dtype=self.dtype, device=device)
            self.slab_serial = torch.full((self.capacity,), -1, dtype=torch.int64, device=device)
            self.slab_pos = torch.zeros(self.capacity, dtype=torch.int64, device=device)
            self.count = torch.zeros(1, dtype=torch.int32, device=device)  # vectors recorded (atomic)
            self.overflow = torch.zeros(1, dtype=torch.int32, device=device)
            self.forced = torch.full((r,), -1, dtype=torch.int64, device=device)  # a step's forced tokens
            self.raw = torch.zeros(r, dtype=torch.float32, device=device)  # and their raw log-probs
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
                mine = self.slab_serial == serial
                cols = torch.where(mine, self.slab_pos, self.max_model_len)
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
            if input_batch.num_tokens:
                latent_kernels.inject(embeds, input_batch, self.vector_row, self.slab, self.pad_id)
            return embeds

        # -- sampling: forcing and recording ------------------------------------------------
        def stash_hidden(self, hidden: torch.Tensor) -> None:
            self._hidden = hidden

        def plan_step(self, logits: torch.Tensor, input_batch, with_logprobs: bool):
            """Before sampling: the forced tokens and (if the batch returns log-probs) their raw
            log-probs; records the forced pads' inputs. None for a batch of no request of ours (the
            runner's dummy runs)."""
            hidden, self._hidden = self._hidden, None
            if hidden is None or not input_batch.req_ids or input_batch.req_ids[0] not in self.live:
                return None
            return latent_kernels.plan(self, input_batch, hidden, logits, self.req_states, with_logprobs)

        def apply_step(self, out, plan):
            if plan is not None:
                latent_kernels.apply(out, *plan)
            return out

        def custom_sampler(self, sampler):
            self.req_states = sampler.req_states
            return ForcingSampler(sampler, self), None

        # -- handing vectors out -------------------------------------------------------------
        def pop(self, keys: list[str]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
            serial_of_key = {key: s for s, key in self.key_of.items()}
            wanted = {key: serial_of_key.get(key) for key in keys}
            for serial in wanted.values():  # popped: forget it
                self.key_of.pop(serial, None)
            if int(self.overflow):  # the vectors are lost; the slab starts over for the next batch
                self._start_over_if_idle()
                raise RuntimeError(f"more than {self.capacity} latent vectors between two pops: raise "
                                   f"{CAPACITY_ENV} (vectors; each takes hidden_size x 2 bytes on the GPU)")
            n = int(self.count)  # at most capacity: past it, overflow is set
            rows, serials, positions = self._rows_of([s for s in wanted.values() if s is not None], n)
            vectors = self.slab.index_select(0, rows)  # one gather for the whole batch
            out = {}
            for key, serial in wanted.items():
                a, b = np.searchsorted(serials, [serial, serial + 1]) if serial is not None else (0, 0)
                out[key] = (positions[a:b].tolist(), vectors[a:b]) if b > a else ([], None)
            self._start_over_if_idle()
            return out

        def _start_over_if_idle(self) -> None:
            if not self.live:  # nothing in flight: start the slab over
                self.count.zero_()
                self.overflow.zero_()
                self.slab_serial.fill_(-1)
                self.serial_of.clear()
                self.key_of.clear()

        def _rows_of(self, serials: list[int], n: int):
            """The slab rows of these serials among the first n, by (serial, position), with their
            serials and positions on the host. A position recorded twice (a step whose output a
            preemption threw away, then sampled again) keeps its last record, the one vector_row
            points at: the sort is stable, so of equal (serial, position) the latest row is last."""
            serial, pos = self.slab_serial[:n], self.slab_pos[:n]
            key = serial * (self.max_model_len + 2) + pos
            key = torch.where(torch.isin(serial, torch.tensor(serials, dtype=serial.dtype, device=serial.device)),
                              key, torch.iinfo(key.dtype).max)
            key, order = torch.sort(key, stable=True)
            last = torch.ones_like(key, dtype=torch.bool)
            last[:-1] = key[1:] != key[:-1]
            rows = order[last & (key != torch.iinfo(key.dtype).max)]
            return rows, serial[rows].cpu().numpy(), pos[rows].cpu().numpy()

    return LatentModelState
