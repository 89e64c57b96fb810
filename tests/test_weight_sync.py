"""Learner -> rollout weight transports on CPU: the collective group (gloo here, NCCL on GPU) and the
object store land the same weights in every engine, and a restarted engine gets a new group."""

from __future__ import annotations

import pytest
import torch
from rl_rows import PROMPTS, max_gap, rollout_rows

from fourdthinker.config import ConfigError
from fourdthinker.grpo_config import GrpoConfig
from fourdthinker.tokens import LatentIds
from fourdthinker.weights import pack_buckets, plan_buckets


def test_transport_names_are_checked_at_load_time():
    base = dict(model_dir="m", train_jsonl="t", prompts_per_step=1, num_generations=2)
    with pytest.raises(ConfigError, match="weight_sync: one of auto, collective"):
        GrpoConfig(**base, weight_sync="nccl2").validate()
    with pytest.raises(ConfigError, match="weight_sync: cuda_ipc needs colocate"):
        GrpoConfig(**base, weight_sync="cuda_ipc").validate()
    GrpoConfig(**base, weight_sync="cuda_ipc", colocate=True).validate()


def test_auto_picks_ipc_only_for_a_learner_sharing_its_gpu():
    from fourdthinker.weight_sync import CollectiveWeightSync, ObjectStoreWeightSync, make_weight_sync

    assert isinstance(make_weight_sync("auto", 1 << 20, torch.device("cpu"), colocated=True), CollectiveWeightSync)
    assert isinstance(make_weight_sync("auto", 1 << 20, torch.device("cpu"), colocated=False), CollectiveWeightSync)
    assert isinstance(make_weight_sync("object_store", 1 << 20, torch.device("cpu"), False), ObjectStoreWeightSync)
    with pytest.raises(ValueError, match="cuda_ipc needs the learner on a GPU"):
        make_weight_sync("cuda_ipc", 1 << 20, torch.device("cpu"), colocated=True)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    import ray
    from transformers import AutoConfig

    from fourdthinker.actors.learner import LearnerGroup
    from fourdthinker.actors.rollout import rollout_actor_class

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}})
    cfg = GrpoConfig(model_dir=str(tiny_model_dir), train_jsonl="-", prompts_per_step=2, num_generations=2,
                     num_learners=1, micro_batch_size=1, learner_gpus=0, learner_cpus=0.25, beta=0.0,
                     gradient_checkpointing=False, bf16=False, weight_bucket_mb=1, weight_sync="collective")
    cfg.validate()
    rollouts = [rollout_actor_class(num_gpus=0, num_cpus=0.25).remote(
        str(tiny_model_dir), {"max_model_len": 1024, "max_num_seqs": 8}) for _ in range(2)]
    group = LearnerGroup(cfg)
    yield ray, group, rollouts, AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True)
    group.shutdown()
    ray.shutdown()


def _language_model(model_dir):
    """(name, tensor) of what the learner trains and sends: all but the frozen vision tower."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
    return [(n, p.detach()) for n, p in model.named_parameters() if ".visual." not in f".{n}"]


def _perturb(ray, rollout, model_dir, seed: int) -> None:
    """Give an engine weights the learner does not have (through the object-store path)."""
    g = torch.Generator().manual_seed(seed)
    noisy = [(n, p + 0.05 * torch.randn(p.shape, generator=g)) for n, p in _language_model(model_dir)]
    ray.get(rollout.update_weights.remote(list(pack_buckets(noisy)), -1))


def _restarted(ray, actor, pid_before: int, timeout_s: float = 300) -> bool:
    """Wait for Ray to bring a killed actor back (a fresh process: another pid)."""
    import time

    from ray.exceptions import RayActorError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ray.get(actor.health.remote())["pid"] != pid_before:
                return True
        except RayActorError:
            pass
        time.sleep(1)
    return False


def _gaps(ray, group, rollouts, config) -> list[float]:
    ids = LatentIds.from_config(config)
    gaps = []
    for rollout in rollouts:
        rows = rollout_rows(ray, rollout, config)
        gaps.append(max_gap(group.logprobs(PROMPTS, rows), rows, ids))
    return gaps


@pytest.mark.slow
def test_collective_sync_lands_the_learner_weights_in_every_engine_and_survives_a_restart(cluster, tiny_model_dir):
    ray, group, rollouts, config = cluster
    for k, rollout in enumerate(rollouts):
        _perturb(ray, rollout, tiny_model_dir, seed=k)
    assert min(_gaps(ray, group, rollouts, config)) > 1e-2  # the engines hold other weights now

    sync = group.broadcast_weights(rollouts, version=1)
    # Only what the learner trains travels; the engines keep their (identical) frozen vision tower,
    # which the clip prompt's log-probs depend on.
    sent = plan_buckets(((n, p.shape, p.dtype) for n, p in _language_model(tiny_model_dir)), 1 << 20)
    assert sync["sync_bytes"] == sum(layout.total_bytes for layout in sent)
    assert sync["sync_buckets"] == len(sent) > 1
    assert sync["sync_receiver_load_s"] > 0 and sync["sync_receiver_finish_s"] > 0
    # The phase split: the one RPC's wall time holds the workers' begin, buckets and end, and the
    # parts fit the whole.
    phase = {k.removeprefix("sync/"): v for k, v in sync.items() if k.startswith("sync/")}
    worker_parts = ("begin_worker_s", "receive_transfer_s", "receive_load_s", "end_worker_s")
    assert all(phase[f"receiver/{k}"] > 0 for k in worker_parts)
    assert phase["receiver/receive_s"] >= sum(phase[f"receiver/{k}"] for k in worker_parts)
    assert phase["receiver/receive_s"] <= sync["sync_receiver_load_s"]
    assert phase["receiver/reset_caches_s"] <= sync["sync_receiver_finish_s"]
    assert sum(phase[f"sender/{k}"] for k in ("plan_s", "pack_s", "send_s", "wait_s")) <= sync["sync_s"]
    assert max(_gaps(ray, group, rollouts, config)) < 1e-3
    first_tokens = ray.get([r.weight_group_token.remote() for r in rollouts])
    assert first_tokens[0] == first_tokens[1] is not None
    assert ray.get([r.health.remote() for r in rollouts])[1]["version"] == 1

    # A restarted engine lost its group and its weights: the next sync forms a new group for all.
    pid = ray.get(rollouts[1].health.remote())["pid"]
    ray.kill(rollouts[1], no_restart=False)
    assert _restarted(ray, rollouts[1], pid)
    assert ray.get(rollouts[1].weight_group_token.remote()) is None
    _perturb(ray, rollouts[1], tiny_model_dir, seed=7)
    group.broadcast_weights(rollouts, version=2)
    tokens = ray.get([r.weight_group_token.remote() for r in rollouts])
    assert tokens[0] == tokens[1] != first_tokens[0]
    assert max(_gaps(ray, group, rollouts, config)) < 1e-3
    assert [h["version"] for h in ray.get([r.health.remote() for r in rollouts])] == [2, 2]

    # The plain broadcast over the same group (the interconnect's own figure) runs too.
    assert group.probe_weight_sync(rollouts, 3 << 20) > 0


@pytest.mark.slow
def test_zero3_learner_with_mixed_prompts_trains_and_gathers_its_shards_into_one_sync(cluster, tiny_model_dir):
    """ZeRO-3 shards every parameter, the vision tower's too, and gathers them with collectives that
    all ranks must issue alike: here one rank scores a video prompt while the other scores a text-only
    one. Scoring and a training step must not deadlock, and the sync gathers the shards into the
    engine's full weights, before and after the step."""
    from fourdthinker.actors.learner import LearnerGroup
    from fourdthinker.actors.rollout import rollout_actor_class

    ray, _, _, config = cluster
    cfg = GrpoConfig(model_dir=str(tiny_model_dir), train_jsonl="-", prompts_per_step=2, num_generations=2,
                     num_learners=2, micro_batch_size=1, learner_gpus=0, learner_cpus=0.25, beta=0.0,
                     lr=1e-2, zero_stage=3, gradient_checkpointing=False, bf16=False, weight_bucket_mb=1)
    cfg.validate()
    rollout = rollout_actor_class(num_gpus=0, num_cpus=0.25).remote(
        str(tiny_model_dir), {"max_model_len": 1024, "max_num_seqs": 8})
    group = LearnerGroup(cfg)
    try:
        _perturb(ray, rollout, tiny_model_dir, seed=3)
        assert _gaps(ray, group, [rollout], config)[0] > 1e-2
        sync = group.broadcast_weights([rollout], version=1)
        sent = plan_buckets(((n, p.shape, p.dtype) for n, p in _language_model(tiny_model_dir)), 1 << 20)
        assert sync["sync_bytes"] == sum(layout.total_bytes for layout in sent)
        assert _gaps(ray, group, [rollout], config)[0] < 1e-3

        ids = LatentIds.from_config(config)
        assert group.train_step(PROMPTS, rollout_rows(ray, rollout, config))["optimizer_steps"] == 1
        stale = rollout_rows(ray, rollout, config)
        assert max_gap(group.logprobs(PROMPTS, stale), stale, ids) > 1e-2  # the step moved the weights
        group.broadcast_weights([rollout], version=2)
        assert _gaps(ray, group, [rollout], config)[0] < 1e-3
    finally:
        group.shutdown()
        ray.kill(rollout)


class _StubEngine:
    """Records the cache resets a weight update asks of its engine."""

    def __init__(self):
        self.calls = []
        self.llm_engine = self

    def collective_rpc(self, method, args=()):
        return [{"begin_s": 0.0, "transfer_s": 0.0, "load_s": 0.0, "end_s": 0.0}] \
            if method == "weight_group_update" else [0.0]

    def reset_prefix_cache(self):  # O(KV pool): an update salts the prefix cache instead
        self.calls.append("prefix")

    def reset_encoder_cache(self):
        self.calls.append("encoder")


@pytest.mark.parametrize("names, resets", [
    (["model.language_model.layers.0.mlp.up_proj.weight", "lm_head.weight"], []),
    (["model.visual.blocks.0.attn.qkv.weight", "lm_head.weight"], ["encoder"]),
])
def test_an_update_salts_the_prefix_cache_and_keeps_vision_outputs_unless_the_tower_changed(names, resets):
    from types import SimpleNamespace

    from fourdthinker.actors.rollout import RolloutWorker

    salts = []
    for update in ("collective", "buckets", "collective"):
        engine = _StubEngine()
        worker = RolloutWorker(generator=SimpleNamespace(llm=engine, cache_salt=None))
        if update == "collective":
            receipt = worker.receive_weights([(names, [[1]] * len(names), ["float32"] * len(names))], version=3)
        else:
            worker.begin_weight_update(names)
            receipt = worker.finish_weight_update(3)
        assert receipt["version"] == 3 and engine.calls == resets
        salts.append(worker.generator.cache_salt)
    # cached KV blocks of earlier weights can't match: every update salts the prefix cache anew,
    # the same version number again included
    assert None not in salts and len(set(salts)) == len(salts)


def test_the_learner_lists_what_it_sends_once_and_anew_when_a_parameter_is_reallocated():
    from types import SimpleNamespace

    from fourdthinker.actors.learner import LearnerWorker
    from fourdthinker.config import to_dict

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    module[0].bias.requires_grad_(False)
    worker = LearnerWorker(to_dict(GrpoConfig(model_dir="m", train_jsonl="-", zero_stage=2)), rank=0, world_size=1)
    worker.engine = SimpleNamespace(module=module)

    def sent():
        return {n: t.clone() for n, t in worker._full_parameters()}

    first = sent()
    assert list(first) == ["0.weight", "1.weight", "1.bias"]
    listed = worker._sync_list
    with torch.no_grad():
        module[1].weight.add_(1.0)  # an optimizer step: in place
    second = sent()
    assert worker._sync_list is listed  # not listed again
    torch.testing.assert_close(second["1.weight"], first["1.weight"] + 1.0)
    module[1].weight.data = torch.zeros(2, 3)  # re-allocated (as a checkpoint load may do)
    third = sent()
    assert worker._sync_list is not listed
    assert torch.equal(third["1.weight"], torch.zeros(2, 3))
    module[1].bias.requires_grad_(False)  # frozen: no longer sent
    assert list(sent()) == ["0.weight", "1.weight"]
