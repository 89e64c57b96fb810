"""Recorded weight loads: a replayed bucket leaves the model exactly as its loaders would, and a load
that is more than copies out of the bucket is never replayed."""

from __future__ import annotations

import copy

import pytest
import torch

from fourdthinker.weight_replay import ReplayingLoader, record_load
from fourdthinker.weights import pack, plan_buckets, unpack


def _buckets(named: dict[str, torch.Tensor], bucket_bytes: int):
    layouts = plan_buckets(((n, t.shape, t.dtype) for n, t in named.items()), bucket_bytes)
    return [(layout, pack(layout, [named[n] for n in layout.names])) for layout in layouts]


def _perturbed(named: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: t + torch.randn(t.shape, generator=g).to(t.dtype) for n, t in named.items()}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # nan_to_num: parameters no bucket reaches may hold uninitialised memory
    return {n: p.detach().clone().nan_to_num() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def vllm_model(plain_llm):
    """A fresh vLLM Qwen2.5-VL of the tiny shape, built from the test engine's config without the
    CPU backend's weight repacking: vLLM's own loaders (fused qkv and gate_up, padded vocabulary)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model

    config = copy.copy(plain_llm.llm_engine.vllm_config)
    config.compilation_config = copy.deepcopy(config.compilation_config)
    config.compilation_config.static_forward_context = {}  # its attention layers register anew
    with set_current_vllm_config(config):
        return initialize_model(vllm_config=config)


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir):
    """The tiny checkpoint's language-model tensors, what a learner sends."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(tiny_model_dir.glob("*.safetensors")):
        state.update(load_file(path))
    return {n: t for n, t in state.items() if "visual" not in n}


def test_replayed_buckets_equal_vllm_loaders(vllm_model, checkpoint):
    loader = ReplayingLoader(vllm_model)
    for layout, flat in _buckets(checkpoint, 1 << 20):  # first sync: the loaders, recorded
        loader(layout, flat)
    assert len(loader.plans) > 1 and all(plan is not None for plan in loader.plans.values())

    new = _perturbed(checkpoint, seed=1)
    for layout, flat in _buckets(new, 1 << 20):  # second sync: replayed
        loader(layout, flat)
    assert loader.replayed == len(loader.plans)
    replayed = _snapshot(vllm_model)

    for layout, flat in _buckets(new, 1 << 20):  # the loaders themselves, on the same bytes
        vllm_model.load_weights(unpack(layout, flat))
    loaded = _snapshot(vllm_model)
    assert replayed.keys() == loaded.keys()
    assert all(torch.equal(replayed[n], loaded[n]) for n in loaded)
    # and the second sync really moved the weights (a no-op replay would leave the first ones)
    assert not torch.equal(replayed["language_model.model.layers.0.self_attn.qkv_proj.weight"],
                           _first_sync_qkv(vllm_model, checkpoint))


def _first_sync_qkv(model, checkpoint) -> torch.Tensor:
    prefix = "model.layers.0.self_attn."
    return torch.cat([checkpoint[prefix + f"{p}_proj.weight"] for p in "qkv"])


class _Fused(torch.nn.Module):
    """q and k loaded into one fused weight (a narrow and a copy each), like vLLM's qkv_proj."""

    def __init__(self, rows: int = 4, cols: int = 3, dtype=torch.float32):
        super().__init__()
        self.qk = torch.nn.Parameter(torch.zeros(2 * rows, cols, dtype=dtype), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(cols, dtype=dtype), requires_grad=False)
        self.rows = rows
        self.mode = "copy"

    def load_weights(self, weights):
        for name, w in weights:
            if name == "bias":
                target = self.bias.data
            else:
                target = self.qk.data.narrow(0, 0 if name == "q" else self.rows, self.rows)
            if self.mode == "copy":
                target.copy_(w)
            elif self.mode == "scaled":
                target.copy_(w * 2)
            elif self.mode == "accumulate":
                target.add_(w)
            elif self.mode == "reallocate" and name == "bias":
                self.bias.data = w.clone()
            elif self.mode == "elsewhere" and name == "bias":  # a weight kept outside the parameters
                self.side = torch.empty_like(w)
                self.side.copy_(w)
            elif self.mode == "overlap" and name == "q":  # two bucket views into shared rows
                self.qk.data[: self.rows].copy_(w)
                self.qk.data[1: self.rows + 1].copy_(w)
            else:
                target.copy_(w)


def _named(seed: int, dtype=torch.float32, rows: int = 4, cols: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(rows, cols, generator=g).to(dtype), "k": torch.randn(rows, cols, generator=g).to(dtype),
            "bias": torch.randn(cols, generator=g).to(dtype)}


def test_a_bf16_bucket_replays_into_fp32_parameters_as_the_loader_converts():
    model = _Fused()
    loader = ReplayingLoader(model)
    for seed in (0, 1):
        (layout, flat), = _buckets(_named(seed, torch.bfloat16), 1 << 20)
        loader(layout, flat)
    assert loader.replayed == 1
    expected = _named(1, torch.bfloat16)
    assert torch.equal(model.qk, torch.cat([expected["q"], expected["k"]]).float())
    assert torch.equal(model.bias, expected["bias"].float())


@pytest.mark.parametrize("mode, reason", [("scaled", "computed tensor"), ("accumulate", "writes into a parameter"),
                                          ("reallocate", "re-allocated"), ("overlap", "same parameter bytes"),
                                          ("elsewhere", "outside the model's parameters")])
def test_a_load_that_is_more_than_copies_stays_on_the_loaders(mode, reason):
    model = _Fused()
    model.mode = mode
    (layout, flat), = _buckets(_named(0), 1 << 20)
    tensors = [*model.parameters()]
    plan, why = record_load(model.load_weights, layout, flat, tensors)
    assert plan is None and reason in why

    model, reference = _Fused(), _Fused()
    model.mode = reference.mode = mode
    loader = ReplayingLoader(model)
    for seed in (1, 2):  # every later load runs the loaders again, so the result is theirs
        (layout, flat), = _buckets(_named(seed), 1 << 20)
        loader(layout, flat)
        reference.load_weights(unpack(layout, flat))
    assert loader.replayed == 0
    assert torch.equal(model.qk, reference.qk) and torch.equal(model.bias, reference.bias)


def test_a_reallocated_parameter_voids_the_plan_and_the_load_is_recorded_again():
    model = _Fused()
    loader = ReplayingLoader(model)
    (layout, flat), = _buckets(_named(0), 1 << 20)
    loader(layout, flat)
    model.qk.data = torch.zeros_like(model.qk)  # e.g. the engine rebuilt its weights
    (layout, flat), = _buckets(_named(1), 1 << 20)
    loader(layout, flat)
    assert loader.replayed == 0  # recorded again, on the new parameter
    (layout, flat), = _buckets(_named(2), 1 << 20)
    loader(layout, flat)
    assert loader.replayed == 1
    expected = _named(2)
    assert torch.equal(model.qk, torch.cat([expected["q"], expected["k"]]))


def test_a_disabled_loader_always_runs_the_loaders():
    model = _Fused()
    loader = ReplayingLoader(model, enabled=False)
    for seed in (0, 1):
        (layout, flat), = _buckets(_named(seed), 1 << 20)
        loader(layout, flat)
    assert loader.replayed == 0 and not loader.plans
    assert torch.equal(model.bias, _named(1)["bias"])
