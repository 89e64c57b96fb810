"""The V2 runner's latent state machine (`runner_v2.py`, its Triton kernels in `latent_kernels.py`).

Without a GPU the kernels run here in Triton's interpreter on CPU tensors; on a GPU (the lent
machine) compiled, on CUDA tensors. The forcing rule must decide exactly what
the V1 logits processor decides from the same token lists, and the model state, driven by a stand-in
runner, must decode as one sequence at a time does. (vLLM's V2 runner itself needs a GPU, so the
engine-level checks, tests/test_vllm_plugin.py on a GPU, run on the lent GPU machine, not in CI.)
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fourdthinker.vllm_plugin import latent_kernels
from fourdthinker.vllm_plugin.logits import FORCE_END, FORCE_PAD, FORCE_START, LatentLogitsProcessor, _Row

PAD, START, END, K = 7, 5, 6, 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the interpreter reads scalars out of one-element arrays, which NumPy deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.fixture(autouse=True)
def _on_the_kernels_device():
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


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
    n = len(seqs)
    state = _state(slots=n)
    tables = _tables(n)
    for slot, (prompt, output, force) in enumerate(seqs):
        seq = prompt + output
        tables.all_token_ids.gpu[slot, : len(seq)] = torch.tensor(seq)
        tables.prompt_len.gpu[slot], tables.prefill_len.gpu[slot] = len(prompt), len(seq)
        state.force_steps[slot, : len(force)] = torch.tensor(sorted(force), dtype=torch.int64)
        state.slot_serial[slot] = 1000 + slot
    lengths = torch.tensor([len(p) + len(o) for p, o, _ in seqs])
    batch = SimpleNamespace(num_reqs=n, idx_mapping=torch.arange(n, dtype=torch.int32),
                            logits_indices=torch.arange(n), positions=lengths - 1,
                            seq_lens=lengths.to(torch.int32))
    hidden = torch.randn(n, H)
    logits = torch.randn(n, V)
    token, raw = latent_kernels.plan(state, batch, hidden, logits, tables, with_logprobs=True)
    expected = [_v1_decision(p, o, f) for p, o, f in seqs]
    assert token.tolist() == expected
    kinds = set(expected)
    assert {PAD, END, START, -1} <= kinds  # every branch was taken
    forced = token >= 0
    raw_ref = logits.log_softmax(-1).gather(1, token.clamp(min=0).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(raw[forced], raw_ref[forced])
    # every forced pad's input (this step's hidden state) is recorded once, where vector_row points
    pads = [i for i, e in enumerate(expected) if e == PAD]
    assert int(state.count) == len(pads) and int(state.overflow) == 0
    rows = state.vector_row[torch.tensor(pads), lengths[pads]]
    assert sorted(rows.tolist()) == list(range(len(pads)))
    torch.testing.assert_close(state.slab[rows], hidden[pads])
    assert state.slab_serial[rows].tolist() == [1000 + i for i in pads]
    assert state.slab_pos[rows].tolist() == lengths[pads].tolist()


def test_a_chunk_inside_a_prefill_is_neither_forced_nor_recorded():
    state, tables = _state(slots=2), _tables(2)
    seq = [1, START, 2, 3, START, 4]
    tables.all_token_ids.gpu[:, : len(seq)] = torch.tensor(seq)
    # both rows end their input on the start token at position 4: row 0 is a chunk of a 6-token
    # prompt, row 1 a whole 5-token prompt. Only the row that reaches its prefill samples
    tables.prompt_len.gpu[:] = tables.prefill_len.gpu[:] = torch.tensor([6, 5])
    batch = SimpleNamespace(num_reqs=2, idx_mapping=torch.arange(2, dtype=torch.int32), logits_indices=torch.arange(2),
                            positions=torch.tensor([4, 4]), seq_lens=torch.tensor([5, 5], dtype=torch.int32))
    token, raw = latent_kernels.plan(state, batch, torch.randn(2, H), torch.randn(2, V), tables, with_logprobs=False)
    assert token.tolist() == [-1, PAD] and raw is None
    assert int(state.count) == 1 and int(state.vector_row[1, 5]) == 0 and int(state.vector_row[0, 5]) == -1


def test_pop_hands_out_each_position_once_its_latest_record_by_request():
    state, tables = _state(slots=2), _tables(2)
    for slot, (rid, seq) in enumerate([("r0", [1, 2, START]), ("r1", [3, START])]):
        tables.all_token_ids.gpu[slot, : len(seq)] = torch.tensor(seq)
        tables.prompt_len.gpu[slot] = tables.prefill_len.gpu[slot] = len(seq)
        state.add_request(slot, SimpleNamespace(req_id=rid, sampling_params=SimpleNamespace(
            extra_args={"latent_key": f"key-{rid}"})))
    batch = SimpleNamespace(num_reqs=2, idx_mapping=torch.tensor([1, 0], dtype=torch.int32),
                            logits_indices=torch.arange(2), positions=torch.tensor([1, 2]),
                            seq_lens=torch.tensor([2, 3], dtype=torch.int32))
    first, again = torch.randn(2, H), torch.randn(2, H)
    for hidden in (first, again):  # the same step twice: a preemption threw the first one's output away
        latent_kernels.plan(state, batch, hidden, torch.randn(2, V), tables, with_logprobs=False)
    assert int(state.count) == 4
    for rid in ("r0", "r1"):
        state.remove_request(rid)
    popped = state.pop(["key-r0", "key-r1", "key-unknown"])
    assert popped["key-r0"][0] == [3] and popped["key-r1"][0] == [2]
    torch.testing.assert_close(popped["key-r0"][1], again[1:2])  # row 1 of the batch is slot 0
    torch.testing.assert_close(popped["key-r1"][1], again[0:1])
    assert popped["key-unknown"] == ([], None)
    assert int(state.count) == 0 and state.pop(["key-r0"]) == {"key-r0": ([], None)}


def test_vectors_past_the_slab_capacity_fail_the_pop_with_the_setting_to_raise(monkeypatch):
    from fourdthinker.vllm_plugin.runner_v2 import CAPACITY_ENV

    monkeypatch.setenv(CAPACITY_ENV, "5")
    model, state = _Rnn(0), _state(SLOTS)
    with pytest.raises(RuntimeError, match=CAPACITY_ENV):
        _run_v2(model, REQUESTS, new=16, state=state)
    # the engine goes on: a batch that fits decodes as usual on the same state afterwards
    few = [("e", [1, 2, 3], [0])]
    got, logprobs, popped, _ = _run_v2(model, few, new=6, state=state)
    _check(model, few, got, logprobs, popped, 6, blocks=1)


# -- the model state's mechanics, driven by a small stand-in of the V2 runner ---------------------
H, V, MAX_LEN, SLOTS = 8, 12, 64, 4


class _Base:
    """What LatentModelState takes from vLLM's DefaultModelState: its sizes and an inputs_embeds
    buffer it fills with token embeddings (the runner's persistent buffer)."""

    def __init__(self, vllm_config, model, encoder_cache, device):
        self.max_num_reqs = vllm_config.scheduler_config.max_num_seqs
        self.max_model_len = vllm_config.model_config.max_model_len
        self.dtype = torch.float32
        self.model = model
        self.buffer = torch.zeros(MAX_LEN * SLOTS, H)

    def add_request(self, req_index, new_req_data):
        pass

    def remove_request(self, req_id):
        pass

    def get_mm_embeddings(self, scheduled_encoder_inputs, input_batch, req_states):
        n = input_batch.num_tokens
        self.buffer[:n] = self.model.embed[input_batch.input_ids[:n]]
        return self.buffer[:n]


class _Rnn:
    """A stand-in language model with memory: h_t = tanh(W x_t + U h_(t-1)), logits = h E^T."""

    def __init__(self, seed: int):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.embed, w, u = (torch.randn(*shape, generator=g, device="cpu").to(DEVICE)
                            for shape in ((V, H), (H, H), (H, H)))
        self.w, self.u = w / 2, u / 2

    def step(self, x, h):
        return torch.tanh(x @ self.w + h @ self.u)


class _GreedySampler:
    req_states = None

    def __init__(self, logprobs: bool):
        self.logprobs = logprobs

    def returns_logprobs(self, idx_mapping_np) -> bool:
        return self.logprobs

    def __call__(self, logits, input_batch):
        from vllm.v1.outputs import LogprobsTensors
        from vllm.v1.worker.gpu.sample.output import SamplerOutput

        sampled = logits.argmax(-1)
        logprobs = logits.log_softmax(-1).gather(1, sampled.unsqueeze(1))
        return SamplerOutput(sampled_token_ids=sampled.view(-1, 1),
                             logprobs_tensors=LogprobsTensors(sampled.unsqueeze(1), logprobs, sampled * 0)
                             if self.logprobs else None,
                             num_nans=None, num_sampled=None)


def _state(slots: int):
    from fourdthinker.vllm_plugin.runner_v2 import _make_cls

    hf = SimpleNamespace(latent_token_id=PAD, latent_start_id=START, latent_end_id=END, latent_size=K)
    config = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf, max_model_len=MAX_LEN,
                                                          get_hidden_size=lambda: H),
                             scheduler_config=SimpleNamespace(max_num_seqs=slots))
    return _make_cls(_Base)(config, SimpleNamespace(embed=torch.zeros(V, H)), None, DEVICE)


def _tables(slots: int):
    """The runner's RequestState tables the state reads (`.gpu` views of the device copies)."""
    return SimpleNamespace(all_token_ids=SimpleNamespace(gpu=torch.zeros(slots, MAX_LEN, dtype=torch.int32)),
                           prompt_len=SimpleNamespace(gpu=torch.zeros(slots, dtype=torch.int32)),
                           prefill_len=SimpleNamespace(gpu=torch.zeros(slots, dtype=torch.int32)))


def _reference(model: _Rnn, prompt: list[int], force: list[int], new: int):
    """Tokens, raw log-probs and the vector fed at each pad position, one sequence at a time."""
    tokens, h, fed, logprobs = list(prompt), torch.zeros(H), {}, []
    for i in range(len(tokens)):
        h = model.step(model.embed[tokens[i]], h)
    for step in range(new):
        logits = h @ model.embed.T
        token = _v1_decision(prompt, tokens[len(prompt):], frozenset(force))
        tok = token if token >= 0 else int(logits.argmax())
        logprobs.append(float(logits.log_softmax(-1)[tok]))
        pos = len(tokens)
        tokens.append(tok)
        x = h if token == PAD else model.embed[tok]  # a forced pad reads the hidden state
        if token == PAD:
            fed[pos] = h.clone()
        h = model.step(x, h)
    return tokens[len(prompt):], logprobs, fed


def _run_v2(model: _Rnn, requests: list[tuple[str, list[int], list[int]]], new: int, *,
            preempt: tuple[str, int, int] | None = None, chunk: int | None = None, logprobs: bool = True,
            state=None):
    """Drive LatentModelState as the V2 runner does: slots, a flat batch per step, the sampler
    wrapped, tokens kept per slot. `preempt` = (request, at step, back at step): dropped from its
    slot, then re-added in another one and recomputed from its tokens. `chunk`: prefill chunk size."""
    from fourdthinker.vllm_plugin.runner_v2 import ForcingSampler

    state, tables = state or _state(SLOTS), _tables(SLOTS)  # a state may decode one batch after another
    state.model = SimpleNamespace(embed=model.embed)
    inner = _GreedySampler(logprobs)
    inner.req_states = tables
    sampler, _ = state.custom_sampler(inner)
    assert isinstance(sampler, ForcingSampler)
    seqs = {rid: list(prompt) for rid, prompt, _ in requests}
    prompt_len = {rid: len(prompt) for rid, prompt, _ in requests}
    extra = {rid: {"latent_key": f"key-{rid}", "latent_force_steps": force} for rid, _, force in requests}
    slot_of, computed, rnn, free = {}, {}, {}, list(range(SLOTS))[::-1]
    logprobs = {rid: [] for rid in seqs} if logprobs else None

    def add(rid):
        slot = free.pop()
        slot_of[rid], computed[rid], rnn[rid] = slot, 0, torch.zeros(H)
        tables.all_token_ids.gpu[slot, : len(seqs[rid])] = torch.tensor(seqs[rid])
        tables.prompt_len.gpu[slot], tables.prefill_len.gpu[slot] = prompt_len[rid], len(seqs[rid])
        state.add_request(slot, SimpleNamespace(req_id=rid, sampling_params=SimpleNamespace(extra_args=extra[rid])))

    for rid in seqs:
        add(rid)
    step = 0
    while any(len(seqs[r]) - prompt_len[r] < new for r in seqs):
        if preempt and step == preempt[1]:
            state.remove_request(preempt[0])
            free.append(slot_of.pop(preempt[0]))
        if preempt and step == preempt[2]:
            add(preempt[0])
        batch = [r for r in seqs if r in slot_of and len(seqs[r]) - prompt_len[r] < new]
        spans = []
        for r in batch:
            todo = len(seqs[r]) - computed[r]
            spans.append(min(todo, chunk) if chunk else todo)
        starts = np.cumsum([0] + spans)
        ids = torch.tensor([t for r, n in zip(batch, spans) for t in seqs[r][computed[r]: computed[r] + n]])
        pos = torch.tensor([p for r, n in zip(batch, spans) for p in range(computed[r], computed[r] + n)])
        input_batch = SimpleNamespace(
            req_ids=batch, num_reqs=len(batch), num_tokens=len(ids), input_ids=ids, positions=pos,
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            idx_mapping=torch.tensor([slot_of[r] for r in batch], dtype=torch.int32),
            logits_indices=torch.tensor(starts[1:] - 1), idx_mapping_np=None,
            seq_lens=torch.tensor([computed[r] + n for r, n in zip(batch, spans)], dtype=torch.int32))
        embeds = state.get_mm_embeddings(None, input_batch, tables).clone()
        hidden = torch.zeros(len(ids), H)
        for r, a, b in zip(batch, starts[:-1], starts[1:]):
            for row in range(a, b):
                rnn[r] = hidden[row] = model.step(embeds[row], rnn[r])
        sample_hidden = hidden[input_batch.logits_indices]
        state.stash_hidden(sample_hidden)
        out = sampler(sample_hidden @ model.embed.T, input_batch)
        for i, (r, n) in enumerate(zip(batch, spans)):
            computed[r] += n
            if computed[r] == len(seqs[r]):  # a real sample (not a chunk inside a prefill)
                tok = int(out.sampled_token_ids[i, 0])
                tables.all_token_ids.gpu[slot_of[r], len(seqs[r])] = tok
                seqs[r].append(tok)
                if logprobs is not None:
                    logprobs[r].append(float(out.logprobs_tensors.logprobs[i, 0]))
        step += 1
    for r in list(slot_of):
        state.remove_request(r)
    popped = state.pop([f"key-{r}" for r in seqs])
    return {r: seqs[r][prompt_len[r]:] for r in seqs}, logprobs, popped, state


REQUESTS = [("a", [1, 2, 3], [0, 9]), ("b", [4, 3, 2, 1, 0, 2], [3]), ("c", [2, 2], []), ("d", [3, 1, 4], [6])]


def _check(model, requests, got, logprobs, popped, new, blocks):
    for rid, prompt, force in requests:
        tokens, ref_logprobs, fed = _reference(model, prompt, force, new)
        assert got[rid] == tokens, rid
        if logprobs is not None:
            np.testing.assert_allclose(logprobs[rid], ref_logprobs, atol=1e-5)
        positions, vectors = popped[f"key-{rid}"]
        assert positions == sorted(fed), rid
        if fed:
            torch.testing.assert_close(vectors, torch.stack([fed[p] for p in positions]))
    assert sum(len(p) for p, _ in popped.values()) >= blocks * K  # latent blocks were really decoded


@pytest.mark.parametrize("logprobs", [True, False])
def test_the_v2_model_state_decodes_latents_as_one_sequence_at_a_time_does(logprobs):
    model = _Rnn(0)
    got, logprobs, popped, state = _run_v2(model, REQUESTS, new=16, logprobs=logprobs)
    _check(model, REQUESTS, got, logprobs, popped, 16, blocks=3)
    assert int(state.count) == 0  # nothing in flight after the pop: the slab started over


def test_a_preempted_request_is_recomputed_with_the_vectors_it_was_fed():
    model = _Rnn(0)
    # "a" enters a block at step 0 and leaves at step 4 mid-block; it comes back in another slot
    got, logprobs, popped, _ = _run_v2(model, REQUESTS, new=16, preempt=("a", 3, 6))
    _check(model, REQUESTS, got, logprobs, popped, 16, blocks=3)


def test_chunked_prefill_does_not_force_or_record_inside_a_prompt():
    model = _Rnn(1)
    # chunks of 2 end on a start token inside "a"'s prompt: forcing there would record a vector
    requests = [("a", [1, START, 2, 3, START], [4]), ("b", [START, PAD, 1], [])]
    got, logprobs, popped, _ = _run_v2(model, requests, new=12, chunk=2)
    _check(model, requests, got, logprobs, popped, 12, blocks=2)


# -- the kernels compile for a GPU (the interpreter above is more lenient than the compiler) ------
_COMPILE = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fourdthinker.vllm_plugin import latent_kernels as lk

# pointer element types at the 3B shape on the V2 runner (bf16 model, fp32 logits); other arguments i32
POINTERS = {"embeds_ptr": "*bf16", "slab_ptr": "*bf16", "hidden_ptr": "*bf16", "logits_ptr": "*fp32",
            "logprobs_ptr": "*fp32", "raw_ptr": "*fp32", "positions_ptr": "*i64", "logits_indices_ptr": "*i64",
            "vector_row_ptr": "*i64", "force_steps_ptr": "*i64", "slot_serial_ptr": "*i64",
            "slab_serial_ptr": "*i64", "slab_pos_ptr": "*i64", "forced_ptr": "*i64", "sampled_ptr": "*i64",
            "logprob_ids_ptr": "*i64"}
CONSTANTS = {"BLOCK_H": 1024, "BLOCK_V": 2048, "BLOCK": 128, "LATENT_SIZE": 8, "TAIL": 16, "FORCE_STEPS": 64}
for kernel in (lk._inject_kernel, lk._plan_kernel, lk._apply_kernel):
    for with_logprobs in (True, False):
        constants = {p.name: CONSTANTS.get(p.name, with_logprobs) for p in kernel.params if p.is_constexpr}
        signature = {p.name: "constexpr" if p.is_constexpr else POINTERS.get(p.name, "*i32" if p.name.endswith("_ptr")
                     else "i32") for p in kernel.params}
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel
print("compiled")
'''


def test_the_kernels_compile_for_a_hopper_gpu():
    """Triton's compiler and ptxas, no GPU needed: a kernel the interpreter runs but the compiler
    rejects fails here, not on the GPU machine. In a fresh process: the interpreter is chosen when
    triton is imported."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
