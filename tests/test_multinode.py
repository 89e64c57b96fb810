"""The stages on a multi-node Ray cluster: three raylets on this machine (Ray's own `cluster_utils.Cluster`),
a named resource standing in for GPUs on the two worker nodes.

Each stage asks for the named resource through its config (`segmenter.resources`, `worker_resources`),
so its actors and workers must land on the nodes that offer it, one per node, and its outputs must equal
the same run's on a single node.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from dift_data import write_dift_set

from fourdthinker.data.synth import SynthConfig, build_world
from fourdthinker.tiny_model import weights_digest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ACCELERATOR = "fake_gpu"  # what a worker type's `resources` would name on a real cluster
SEGMENTER_ACTOR = "SegmentClips"
TRAIN_WORKER_ACTOR = "RayTrainWorker"
DIFT_RUN = "dift-tiny"


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_stage", ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("multinode-inputs")
    world = root / "world"
    build_world(world, SynthConfig(videos=3, seed=0, width=112, height=84, seconds=4, fps=5))
    return {"world": world, "dift_jsonl": write_dift_set(root / "dift", n=4), "model_dir": tiny_model_dir}


def _run_stages(inputs: dict, out: Path) -> dict:
    """Preprocess and DIFT on the connected Ray, each stage's pool/workers asking for one `ACCELERATOR`."""
    prep = out / "preprocess"
    rc = _stage("preprocess").main([
        "--config", str(ROOT / "configs/tiny/preprocess.yaml"), f"input_root={inputs['world']}",
        f"output_dir={prep}", "decode_cpus=0.5", "segmenter.min_actors=2", "segmenter.max_actors=2",
        "segmenter.num_cpus_per_actor=0.25", f"segmenter.resources={{{ACCELERATOR}: 1}}"])
    assert rc == 0
    dift = out / "dift"
    rc = _stage("dift").main([
        "--config", str(ROOT / "configs/tiny/dift.yaml"), f"model_dir={inputs['model_dir']}",
        f"train_jsonl={inputs['dift_jsonl']}", f"output_dir={dift}", "num_workers=2", "per_device_batch_size=1",
        "max_steps=2", "checkpoint_every=0", "cpus_per_worker=0.25", f"worker_resources={{{ACCELERATOR}: 1}}",
        "progress_bar=false", "tensorboard=false"])
    assert rc == 0
    return {"prep": prep, "dift": dift, "actor_nodes": _actor_nodes(), "inputs": inputs}


def _actor_nodes() -> dict[str, list[str]]:
    """Node id of every actor this cluster ran, by class name. Ray's GCS actor table keeps dead actors'
    addresses, and needs no dashboard (the state API `ray.util.state` asks the dashboard)."""
    import ray._private.state

    nodes: dict[str, list[str]] = {}
    for actor in ray._private.state.actors().values():
        nodes.setdefault(actor["ActorClassName"], []).append(actor["Address"]["NodeID"])
    return nodes


def _nodes_of(actor_nodes: dict[str, list[str]], class_part: str) -> list[str]:
    return sorted(node for name, ids in actor_nodes.items() if class_part in name for node in ids)


@pytest.fixture(scope="module")
def single_node(inputs, tmp_path_factory):
    import ray

    ray.init(address="local", num_cpus=3, resources={ACCELERATOR: 2}, include_dashboard=False,
             object_store_memory=150 * 1024**2)
    try:
        return {**_run_stages(inputs, tmp_path_factory.mktemp("single")), "node": ray.get_runtime_context().get_node_id()}
    finally:
        ray.shutdown()  # before the multi-node cluster connects


@pytest.fixture(scope="module")
def multi_node(inputs, single_node, tmp_path_factory):
    import ray
    import ray._private.utils
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        # Cluster publishes its head in /tmp/ray for `ray.init()` without an address to find; other
        # Ray users of this machine must not join it.
        patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1, resources={ACCELERATOR: 1}) for _ in range(2)]
        ray.init(address=cluster.address)
        try:
            yield {**_run_stages(inputs, tmp_path_factory.mktemp("multi")), "head": cluster.head_node.node_id,
                   "accelerator_nodes": sorted(node.node_id for node in workers)}
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def _texts(out: Path) -> dict[str, str]:
    return {name: (out / name).read_text().replace(str(out), "<out>") for name in ("dift.jsonl", "rl.jsonl")}


def test_segmenter_pool_runs_one_actor_on_each_node_offering_its_resource(multi_node):
    assert _nodes_of(multi_node["actor_nodes"], SEGMENTER_ACTOR) == multi_node["accelerator_nodes"]


def test_preprocess_on_three_nodes_writes_what_one_node_writes(single_node, multi_node):
    single, multi = _texts(single_node["prep"]), _texts(multi_node["prep"])
    assert single["dift.jsonl"].count("\n") > 0  # a run that wrote nothing would match trivially
    assert multi == single
    assert _nodes_of(single_node["actor_nodes"], SEGMENTER_ACTOR) == [single_node["node"]] * 2


def test_dift_workers_run_on_the_two_accelerator_nodes(multi_node):
    assert _nodes_of(multi_node["actor_nodes"], TRAIN_WORKER_ACTOR) == multi_node["accelerator_nodes"]


def test_dift_on_two_nodes_trains_what_two_workers_on_one_node_train(single_node, multi_node):
    def steps(run):
        return [json.loads(line) for line in (run["dift"] / DIFT_RUN / "metrics.jsonl").read_text().splitlines()]

    single, multi = steps(single_node), steps(multi_node)
    assert [m["step"] for m in single] == [m["step"] for m in multi] == [1, 2]
    for one, other in zip(single, multi):
        for key in ("loss", "ce", "sim", "cos", "grad_norm"):
            assert other[key] == pytest.approx(one[key], rel=1e-5), key
    trained = weights_digest(multi_node["dift"] / "final")
    assert trained == weights_digest(single_node["dift"] / "final")
    assert trained != weights_digest(multi_node["inputs"]["model_dir"])  # the two steps changed the weights
