"""Triton kernels of latent decoding on vLLM's V2 runner: one launch each per step.

Decode on the V2 runner is host-bound (a 3B decode step of 64 requests is ~2 ms of GPU work under
~4 ms of host work), so the latent state machine must not add a string of small PyTorch ops: the
first version, ~60 kernel launches a step, cost 20% of plain vLLM's throughput. Here it is three:

- `inject`: the rows of the step's flat token batch whose input is a pad take the recorded vector
  their (slot, position) points at, written into the runner's `inputs_embeds` buffer.
- `plan`: per request, the token it must sample (pad x latent_size after `<|latent_start|>`, then
  `<|latent_end|>`, or a forced start) from its last latent_size + 1 tokens; if the batch returns
  log-probs, the raw log-prob of that token; a forced pad's input (this step's hidden state)
  appended to the slab, with the request's serial and position, and pointed at by `vector_row`.
- `apply`: the sampler's output rows of forced requests take the forced token and raw log-prob.

The kernels are written for the GPU. The CPU tests run them in Triton's interpreter
(`TRITON_INTERPRET=1`, set by tests/conftest.py where there is no GPU, before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_row(src_ptr, dst_ptr, size, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for h in range(0, size, BLOCK):
        mask = h + offs < size
        tl.store(dst_ptr + h + offs, tl.load(src_ptr + h + offs, mask=mask), mask=mask)


@triton.jit(do_not_specialize=["num_reqs"])  # varies step to step: no recompiles
def _inject_kernel(embeds_ptr, embeds_stride, input_ids_ptr, positions_ptr, query_start_loc_ptr, idx_mapping_ptr,
                   num_reqs, vector_row_ptr, vector_row_stride, max_model_len, slab_ptr, slab_stride, hidden_size,
                   pad_id, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    if tl.load(input_ids_ptr + t) == pad_id:
        # the request of token t: the last r with query_start_loc[r] <= t
        lo = 0
        hi = num_reqs
        while lo < hi:
            mid = (lo + hi) // 2
            after = tl.load(query_start_loc_ptr + mid + 1) <= t
            lo = tl.where(after, mid + 1, lo)
            hi = tl.where(after, hi, mid)
        slot = tl.load(idx_mapping_ptr + lo).to(tl.int64)
        pos = tl.minimum(tl.load(positions_ptr + t), max_model_len)
        row = tl.load(vector_row_ptr + slot * vector_row_stride + pos)
        if row >= 0:
            _copy_row(slab_ptr + row * slab_stride, embeds_ptr + t * embeds_stride, hidden_size, BLOCK_H)


@triton.jit
def _plan_kernel(
        # the step
        idx_mapping_ptr, logits_indices_ptr, positions_ptr, seq_lens_ptr, hidden_ptr, hidden_stride,
        logits_ptr, logits_stride, vocab_size,
        # the runner's request tables
        all_token_ids_ptr, all_token_ids_stride, prompt_len_ptr, prefill_len_ptr,
        # the latent state
        force_steps_ptr, force_steps_stride, slot_serial_ptr, vector_row_ptr, vector_row_stride, max_model_len,
        slab_ptr, slab_stride, slab_serial_ptr, slab_pos_ptr, count_ptr, overflow_ptr, capacity, hidden_size,
        # out
        forced_ptr, raw_ptr,
        pad_id, start_id, end_id, LATENT_SIZE: tl.constexpr, TAIL: tl.constexpr, FORCE_STEPS: tl.constexpr,
        WITH_LOGPROBS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr):
    r = tl.program_id(0)
    slot = tl.load(idx_mapping_ptr + r).to(tl.int64)
    pos = tl.load(positions_ptr + tl.load(logits_indices_ptr + r)).to(tl.int64)  # the last input token
    # the last LATENT_SIZE + 1 tokens, oldest first (-1 before the sequence start)
    j = tl.arange(0, TAIL)
    col = pos - LATENT_SIZE + j
    lane = j <= LATENT_SIZE
    tail = tl.load(all_token_ids_ptr + slot * all_token_ids_stride + col, mask=lane & (col >= 0), other=-1)
    last_other = tl.max(tl.where(lane & (tail != pad_id), j, -1), 0)  # the token before the trailing pads
    before = tl.sum(tl.where(j == last_other, tail, 0), 0)
    in_block = (last_other >= 0) & (before == start_id)  # K - last_other pads follow a start
    is_pad = in_block & (last_other > 0)
    is_end = in_block & (last_other == 0)
    out_step = pos + 1 - tl.load(prompt_len_ptr + slot)
    steps = tl.load(force_steps_ptr + slot * force_steps_stride + tl.arange(0, FORCE_STEPS))
    is_start = (in_block == 0) & (tl.max((steps == out_step).to(tl.int32), 0) > 0)
    real = tl.load(seq_lens_ptr + r) >= tl.load(prefill_len_ptr + slot)  # not a chunk inside a prefill
    token = tl.where(is_pad, pad_id, tl.where(is_end, end_id, tl.where(is_start, start_id, -1)))
    token = tl.where(real, token, -1)
    tl.store(forced_ptr + r, token)
    if WITH_LOGPROBS:
        if token >= 0:  # the raw log-prob of the forced token, one online log-sum-exp pass
            offs = tl.arange(0, BLOCK_V)
            m = -float("inf")
            s = 0.0
            for v in range(0, vocab_size, BLOCK_V):
                x = tl.load(logits_ptr + r * logits_stride + v + offs, mask=v + offs < vocab_size,
                            other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
                m = m_new
            chosen = tl.load(logits_ptr + r * logits_stride + token).to(tl.float32)
            tl.store(raw_ptr + r, chosen - m - tl.log(s))
    if is_pad & real:  # its input is this step's hidden state: record it
        index = tl.atomic_add(count_ptr, 1).to(tl.int64)  # 64-bit offsets past it
        if index < capacity:
            _copy_row(hidden_ptr + r * hidden_stride, slab_ptr + index * slab_stride, hidden_size, BLOCK_H)
            tl.store(slab_serial_ptr + index, tl.load(slot_serial_ptr + slot))
            tl.store(slab_pos_ptr + index, pos + 1)
            tl.store(vector_row_ptr + slot * vector_row_stride + tl.minimum(pos + 1, max_model_len), index)
        else:
            tl.store(overflow_ptr, 1)


@triton.jit(do_not_specialize=["num_reqs"])
def _apply_kernel(forced_ptr, raw_ptr, num_reqs, sampled_ptr, sampled_stride, logprob_ids_ptr, logprob_ids_stride,
                  logprobs_ptr, logprobs_stride, WITH_LOGPROBS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    token = tl.load(forced_ptr + r, mask=r < num_reqs, other=-1)
    forced = token >= 0
    tl.store(sampled_ptr + r * sampled_stride, token, mask=forced)
    if WITH_LOGPROBS:  # column 0 is the sampled token
        tl.store(logprob_ids_ptr + r * logprob_ids_stride, token, mask=forced)
        tl.store(logprobs_ptr + r * logprobs_stride, tl.load(raw_ptr + r, mask=forced), mask=forced)


def inject(embeds: torch.Tensor, input_batch, vector_row: torch.Tensor, slab: torch.Tensor, pad_id: int) -> None:
    """Write the recorded vector of every pad input of the step into its row of `embeds`."""
    n = input_batch.num_tokens
    _inject_kernel[(n,)](
        embeds, embeds.stride(0), input_batch.input_ids, input_batch.positions, input_batch.query_start_loc,
        input_batch.idx_mapping, input_batch.num_reqs, vector_row, vector_row.stride(0), vector_row.shape[1] - 1,
        slab, slab.stride(0), slab.shape[1], pad_id, BLOCK_H=1024)


def plan(state, input_batch, hidden: torch.Tensor, logits: torch.Tensor, req_states, with_logprobs: bool):
    """Forced tokens [num_reqs] (-1: none) and, with log-probs, the forced tokens' raw log-probs;
    records the forced pads' inputs in the state's slab."""
    num_reqs = input_batch.num_reqs
    forced, raw = state.forced[:num_reqs], state.raw[:num_reqs]
    _plan_kernel[(num_reqs,)](
        input_batch.idx_mapping, input_batch.logits_indices, input_batch.positions, input_batch.seq_lens,
        hidden, hidden.stride(0), logits, logits.stride(0), logits.shape[1],
        req_states.all_token_ids.gpu, req_states.all_token_ids.gpu.stride(0), req_states.prompt_len.gpu,
        req_states.prefill_len.gpu,
        state.force_steps, state.force_steps.stride(0), state.slot_serial, state.vector_row,
        state.vector_row.stride(0), state.vector_row.shape[1] - 1,
        state.slab, state.slab.stride(0), state.slab_serial, state.slab_pos, state.count, state.overflow,
        state.capacity, state.slab.shape[1],
        forced, raw, state.pad_id, state.start_id, state.end_id,
        LATENT_SIZE=state.latent_size, TAIL=triton.next_power_of_2(state.latent_size + 1),
        FORCE_STEPS=state.force_steps.shape[1], WITH_LOGPROBS=with_logprobs, BLOCK_H=1024, BLOCK_V=2048)
    return forced, raw if with_logprobs else None


def apply(out, forced: torch.Tensor, raw: torch.Tensor | None) -> None:
    """Overwrite, in place, the sampler output of forced requests: the token, and the log-prob of
    column 0 (the sampled token) where the batch returns log-probs."""
    sampled, logprobs = out.sampled_token_ids, out.logprobs_tensors
    with_logprobs = logprobs is not None and raw is not None
    ids, values = (logprobs.logprob_token_ids, logprobs.logprobs) if with_logprobs else (sampled, sampled)
    n = forced.shape[0]
    block = 128
    _apply_kernel[(triton.cdiv(n, block),)](
        forced, raw if with_logprobs else forced, n, sampled, sampled.stride(0), ids, ids.stride(0), values,
        values.stride(0), WITH_LOGPROBS=with_logprobs, BLOCK=block)
