"""Latent-aware decoding inside vLLM matches the HF reference (`fourdthinker.model.generate_latent`).

One vLLM engine with the plugin (fp32 tiny model; the CPU build runs vLLM's V1 runner, a GPU the
V2 runner, `runner_v2.py`) serves the whole module; requests
enter latent mode at different steps through the `latent_force_steps` hook, since a random model
rarely samples `<|latent_start|>` by itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fourdthinker.data.collate import prompt_batch
from fourdthinker.generation import GenerationRequest, SamplingConfig
from fourdthinker.model import completion_logprobs, generate_latent
from fourdthinker.prompts import question_prompt
from fourdthinker.tokens import LatentIds
from fourdthinker.vllm_plugin.generate import LatentGenerator

pytestmark = pytest.mark.slow

MAX_NEW = 14
QUESTIONS = ["Which way does the camera pan?", "Is the red box moving toward the camera?",
             "What happens between 1s and 3s?", "Describe the motion.", "Pan or tilt?",
             "Which object is faster?", "Does the sphere stop?", "Where is the cube heading?"]
# Log-probs against the fp32 HF reference: on a GPU, vLLM's Triton attention takes its fp32 dot
# products at TF32 precision (`tl.dot`'s default), ~1e-3 relative; the CPU build computes in fp32.
LOGPROB_ATOL = 5e-3 if torch.cuda.is_available() else 1e-3
# Entry steps: never, at once, late, twice, at the very end (a block cut by max_new_tokens).
FORCES = [[], [0], [5], [1, 8], [MAX_NEW - 2], [3], [2, 9], [7]]


def _clip(seed: int, frames: int, h: int, w: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(frames)]


def _requests() -> list[tuple[str, list[Image.Image] | None, list[int]]]:
    out = []
    for i in range(16):
        frames = None if i % 4 == 3 else _clip(i, 2 + 2 * (i % 2), 56, 56 + 28 * (i % 3))
        out.append((question_prompt(QUESTIONS[i % len(QUESTIONS)]), frames, FORCES[i % len(FORCES)]))
    return out


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    return processor, model, LatentIds.from_config(model.config)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from conftest import engine_test_kwargs

    return LatentGenerator.from_model_dir(tiny_model_dir, max_model_len=2048, max_num_seqs=16, **engine_test_kwargs())


def _hf_reference(hf, requests):
    processor, model, ids = hf
    inputs = prompt_batch(processor, [(text, frames) for text, frames, _ in requests])
    ref = generate_latent(model, inputs, ids, MAX_NEW, forced_latent_steps=[f for _, _, f in requests],
                          eos_token_ids=[])
    return inputs, ref


def _vllm(generator, requests, **sampling):
    reqs = [GenerationRequest(text, frames=frames, force_latent_steps=f) for text, frames, f in requests]
    out = generator.generate(reqs, SamplingConfig(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, **sampling))
    return [group[0] for group in out]


def _assert_same(got, ref, ids: LatentIds):
    for row, c in enumerate(got):
        assert c.error is None
        assert c.token_ids == ref.sequences[row], f"row {row}"
        expected = ref.latents[row]
        if expected.shape[0] == 0:
            assert c.latents is None
            continue
        assert c.latents.shape == expected.shape
        cos = torch.nn.functional.cosine_similarity(c.latents, expected.float(), dim=-1)
        assert cos.min().item() > 0.999, f"row {row}: {cos}"
        assert [c.token_ids[p] for p in c.latent_positions] == [ids.pad] * len(c.latent_positions)
        assert np.abs(np.array(c.logprobs) - ref.logprobs[row].numpy()).max() < LOGPROB_ATOL


def test_greedy_tokens_latents_and_logprobs_equal_the_hf_reference(hf, generator):
    requests = _requests()
    _, ref = _hf_reference(hf, requests)
    got = _vllm(generator, requests)
    assert sum(len(r) for r in ref.latents) >= 10 * hf[2].latent_size  # many blocks, entered at different steps
    _assert_same(got, ref, hf[2])


def test_text_logprobs_equal_the_hf_teacher_forced_logprobs_with_the_fed_latents(hf, generator):
    processor, model, ids = hf
    requests = [r for r in _requests() if r[2]][:6]
    inputs, _ = _hf_reference(hf, requests)
    got = _vllm(generator, requests)
    latents = [c.latents if c.latents is not None else torch.zeros(0, model.config.text_config.hidden_size)
               for c in got]
    with torch.no_grad():
        teacher = completion_logprobs(model, inputs, [c.token_ids for c in got], latents, ids)
        pads = [torch.zeros_like(x) + model.get_input_embeddings().weight[ids.pad] for x in latents]
        wrong = completion_logprobs(model, inputs, [c.token_ids for c in got], pads, ids)
    text = [torch.tensor([t not in (ids.pad, ids.start, ids.end) for t in c.token_ids]) for c in got]
    diffs = [(torch.tensor(c.logprobs) - t)[m].abs().max() for c, t, m in zip(got, teacher, text)]
    assert max(diffs) < LOGPROB_ATOL
    # Feeding the pad embedding at the latent slots (the reference's learner) is visibly different.
    wrong_diffs = [(torch.tensor(c.logprobs) - w)[m].abs().max() for c, w, m in zip(got, wrong, text)]
    assert max(wrong_diffs) > 1e-2


def test_without_latents_the_plugin_equals_plain_vllm(generator, plain_llm, hf):
    processor = hf[0]
    requests = [(text, frames, []) for text, frames, _ in _requests()[:6]]
    got = _vllm(generator, requests)
    prompts = [generator.prepare(GenerationRequest(t, frames=f)).prompt for t, f, _ in requests]
    from vllm import SamplingParams

    plain = plain_llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
                               use_tqdm=False)
    for c, p in zip(got, plain):
        assert c.token_ids == list(p.outputs[0].token_ids)
        assert c.latents is None
    del processor


def test_preemption_and_recompute_keep_tokens_and_latents(hf, generator):
    """Reset the prefix cache with running requests every few steps: each reset preempts them
    all, and their re-prefill must re-inject the same latent vectors."""
    from vllm import SamplingParams

    requests = _requests()[:8]
    _, ref = _hf_reference(hf, requests)
    engine = generator.llm.llm_engine
    keys = [f"preempt-{i}" for i in range(len(requests))]
    for key, (text, frames, force) in zip(keys, requests):
        prompt = generator.prepare(GenerationRequest(text, frames=frames)).prompt
        engine.add_request(key, prompt, SamplingParams(
            max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=0,
            extra_args={"latent_key": key, "latent_force_steps": force}))
    finished, steps, resets = {}, 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps % 3 == 0 and engine.has_unfinished_requests():
            resets += engine.reset_prefix_cache(reset_running_requests=True)
    assert resets >= 3
    latents = generator.pop_latents(keys)
    for row, key in enumerate(keys):
        assert finished[key] == ref.sequences[row]
        _, vectors = latents[key]
        if ref.latents[row].shape[0]:
            cos = torch.nn.functional.cosine_similarity(vectors, ref.latents[row].float(), dim=-1)
            assert cos.min().item() > 0.999


def test_prefix_cache_hits_give_the_same_latents(hf, generator):
    requests = _requests()[:4]
    first = _vllm(generator, requests)
    second = _vllm(generator, requests)  # the prompts (and latent-block KV) now come from the cache
    for a, b in zip(first, second):
        assert a.token_ids == b.token_ids
        if a.latents is not None:
            torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)


def test_a_bad_request_fails_alone(generator, tmp_path):
    good = GenerationRequest(question_prompt("Which way?"), frames=_clip(0, 2, 56, 56))
    missing = GenerationRequest(question_prompt("Which way?"), frame_paths=[str(tmp_path / "nope.jpg")])
    too_long = GenerationRequest(question_prompt("Which way? " * 2000))
    out = generator.generate([good, missing, too_long], SamplingConfig(max_tokens=4, temperature=0.0))
    assert out[0][0].error is None and len(out[0][0].token_ids) == 4
    assert "nope.jpg" in out[1][0].error and out[1][0].finish_reason == "error"
    assert "context" in out[2][0].error


def test_update_weights_changes_outputs_exactly_as_the_new_weights_do(hf, generator, tiny_model_dir):
    from fourdthinker.actors.rollout import RolloutWorker
    from fourdthinker.weights import pack_buckets

    processor, model, ids = hf
    requests = _requests()[:6]
    g = torch.Generator().manual_seed(1)
    perturbed = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    worker = RolloutWorker(generator=generator)  # the actor's logic around the module's engine
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    _vllm(generator, requests)  # their KV blocks (prompt and completion) now sit in the prefix cache
    try:
        assert worker.update_weights(list(pack_buckets(perturbed.items(), bucket_bytes=1 << 20)), version=7)["version"] == 7
        assert worker.health()["version"] == 7
        got = _vllm(generator, requests)
        model.load_state_dict(perturbed, strict=False)
        _, ref = _hf_reference(hf, requests)
        _assert_same(got, ref, ids)
    finally:
        model.load_state_dict(original, strict=False)
        worker.update_weights(list(pack_buckets(original.items())), version=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_vectors_travel_in_one_blob_bit_exact_in_the_engine_dtype(dtype):
    from fourdthinker.vllm_plugin.extension import decode_latents, encode_latents

    g = torch.Generator().manual_seed(0)
    popped = {"a": ([5, 6], torch.randn(2, 8, generator=g).to(dtype)), "empty": ([], None),
              "b": ([9, 10, 11], torch.randn(3, 8, generator=g).to(dtype))}
    wire = encode_latents(popped)
    assert isinstance(wire["data"], bytes) and wire["counts"] == [2, 0, 3]
    back = decode_latents(wire)
    assert list(back) == ["a", "empty", "b"] and back["empty"] == ([], None)
    for key in ("a", "b"):
        assert back[key][0] == popped[key][0]
        assert back[key][1].dtype == dtype and torch.equal(back[key][1], popped[key][1])
    assert decode_latents(encode_latents({"x": ([], None)})) == {"x": ([], None)}
