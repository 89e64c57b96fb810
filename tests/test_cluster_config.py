"""The shipped configs: every stage config loads with its typed loader, `cluster.yaml` passes Ray's own
launcher checks, and every 3B stage asks only for resources some worker type of the cluster offers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fourdthinker.config import ConfigError, DiftConfig, load_config
from fourdthinker.eval_config import EvaluateConfig, argv_with_models
from fourdthinker.grpo_config import GrpoConfig
from fourdthinker.preprocess.config import PreprocessConfig
from fourdthinker.serve_config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))

# Config file stem (before any "_variant", e.g. grpo_1gpu) -> the stage's config class. A new stage's
# configs fail `test_every_shipped_config_loads` until their class is added here.
CONFIG_CLASSES = {
    "preprocess": PreprocessConfig,
    "dift": DiftConfig,
    "grpo": GrpoConfig,
    "evaluate": EvaluateConfig,
    "serve": ServeConfig,
}
# Keys a stage requires on the command line (the shipped files leave them to the run).
COMMAND_LINE = {
    "preprocess": ["input_root=/mnt/cluster_storage/data/SpatialVID"],
    "dift": ["model_dir=/mnt/cluster_storage/models/base", "train_jsonl=/mnt/cluster_storage/data/dift.jsonl"],
    "grpo": ["model_dir=/mnt/cluster_storage/models/dift", "train_jsonl=/mnt/cluster_storage/data/rl.jsonl"],
    "evaluate": ['models=["grpo=/mnt/cluster_storage/models/grpo"]'],
    "serve": ["model_dir=/mnt/cluster_storage/models/grpo"],
}


def _stage(path: Path) -> str:
    return path.stem.split("_")[0]


def load_shipped(path: Path, overrides: tuple[str, ...] = ()):
    stage = _stage(path)
    if stage not in CONFIG_CLASSES:
        pytest.fail(f"{path.relative_to(ROOT)}: no config class for stage {stage!r}; add it to CONFIG_CLASSES "
                    f"(and its required command-line keys to COMMAND_LINE) in {Path(__file__).name}")
    return load_config(CONFIG_CLASSES[stage], path, COMMAND_LINE.get(stage, []) + list(overrides))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_shipped(path)
    assert isinstance(cfg, CONFIG_CLASSES[_stage(path)])


def test_every_stage_ships_a_tiny_and_a_3b_config():
    stages = {_stage(p) for p in CONFIGS}
    assert set(CONFIG_CLASSES) <= stages
    for stage in stages:
        assert (ROOT / "configs" / "tiny" / f"{stage}.yaml").is_file(), stage
        assert (ROOT / "configs" / "3b" / f"{stage}.yaml").is_file(), stage


def test_the_loader_rejects_an_unknown_key_in_a_shipped_file(tmp_path):
    """What makes the loading test worth running: a typo in a shipped file is an error naming it."""
    broken = tmp_path / "dift.yaml"
    broken.write_text((ROOT / "configs/tiny/dift.yaml").read_text() + "\nlearning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match="unknown key.*learning_rate"):
        load_shipped(broken)


# -- cluster.yaml -------------------------------------------------------------------------------------
def launcher_config(raw: dict) -> dict:
    """`raw` as `ray up` checks it before asking the cloud for anything: defaults of the provider filled
    in, setup commands merged, per-type worker bounds set (prepare_config), then the schema and the
    cross-field checks (validate_config). What follows in `ray up` (the provider's bootstrap) needs
    cloud credentials."""
    from ray.autoscaler._private.providers import _NODE_PROVIDERS
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    assert config["provider"]["type"] in _NODE_PROVIDERS
    return config


@pytest.fixture(scope="module")
def cluster():
    return launcher_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))


def test_cluster_yaml_passes_rays_launcher_validation(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert {"cpu_worker", "gpu_sam3", "gpu_train", "gpu_serve"} <= set(types)
    for name, node_type in types.items():
        if name != "head":
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
    # The project is installed from its lock file on every node, as the Makefile installs it.
    setup = " ".join(cluster["worker_setup_commands"] + cluster["head_setup_commands"])
    assert "uv pip sync" in setup and "requirements/gpu.lock" in setup and "--no-deps -e ." in setup
    assert (ROOT / "requirements" / "gpu.lock").is_file()


def test_rays_validator_catches_a_broken_cluster_yaml():
    import jsonschema

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    raw["available_node_types"]["gpu_train"]["resources"]["GPU"] = 0.5  # the schema wants whole units
    with pytest.raises(jsonschema.ValidationError, match="0.5"):
        launcher_config(raw)


# -- what the 3B stages ask for against what the worker types offer --------------------------------
def _pipeline(stage: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{stage}_pipeline", ROOT / "pipelines" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _RecordingDataset:
    """Stands for a Ray Dataset: records the plan's map calls instead of running them."""

    def __init__(self):
        self.calls: list[dict] = []

    def flat_map(self, fn, **kwargs):
        return self

    def map_batches(self, fn, **kwargs):
        self.calls.append(kwargs)
        return self


def evaluator_pool(cfg: EvaluateConfig) -> dict:
    """The `map_batches` arguments of one model's engine pool, from the stage's own plan."""
    from fourdthinker.actors.evaluator import answered_questions

    videos = _RecordingDataset()
    answered_questions(cfg, cfg.model_specs()[0], videos, {})
    (pool,) = videos.calls
    return pool


def stage_requests(cfg) -> list[tuple[str, dict[str, float], int]]:
    """(what, Ray resources of one actor/worker/bundle/replica, how many) the stage asks for, as its
    code asks: preprocess_plan.py (decode tasks, segmenter pool; naming and annotate actors take 1 CPU),
    dift.py (ScalingConfig), grpo.py (its placement-group bundles, from the pipeline itself),
    actors/evaluator.py (decode tasks, the engine pool's map_batches) and serve/app.py (the replicas'
    ray_actor_options, up to max_replicas)."""
    def ask(cpus: float, gpus: float, named: dict[str, float]) -> dict[str, float]:
        return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {}), **named}

    if isinstance(cfg, PreprocessConfig):
        seg = cfg.segmenter
        return [("decode", ask(cfg.decode_cpus, 0, {}), 1), ("annotate", ask(1, 0, {}), 1),
                ("segmenter", ask(seg.num_cpus_per_actor, seg.num_gpus_per_actor, seg.resources), seg.max_actors)]
    if isinstance(cfg, DiftConfig):
        return [("worker", ask(cfg.cpus_per_worker, 1 if cfg.use_gpu else 0, cfg.worker_resources), cfg.num_workers)]
    if isinstance(cfg, GrpoConfig):
        return [(name, bundles[0], len(bundles)) for name, bundles in _pipeline("grpo").placement_bundles(cfg).items()]
    if isinstance(cfg, EvaluateConfig):
        pool = evaluator_pool(cfg)
        return [("decode", ask(cfg.decode_cpus, 0, {}), 1),
                ("engine", ask(pool["num_cpus"], pool["num_gpus"], pool["resources"]), pool["compute"].max_size)]
    if isinstance(cfg, ServeConfig):
        from serve.app import deployment_options

        options = deployment_options(cfg)
        actor = options["ray_actor_options"]
        return [("replica", ask(actor["num_cpus"], actor["num_gpus"], actor["resources"]),
                 options["autoscaling_config"]["max_replicas"])]
    raise AssertionError(f"no resource requests known for {type(cfg).__name__}; add them to stage_requests")


def fits(request: dict[str, float], node_type: dict) -> bool:
    return all(amount <= node_type["resources"].get(key, 0) for key, amount in request.items())


def unmet_requests(cfg, node_types: dict[str, dict]) -> list[str]:
    """What of the stage no worker type can hold: one actor larger than every type that offers its
    resources, or more of them than those types hold at their max_workers."""
    problems = []
    for what, request, count in stage_requests(cfg):
        hosts = {name: t for name, t in node_types.items() if fits(request, t)}
        if not hosts:
            problems.append(f"{what} {request}: no worker type offers it")
            continue
        for key, amount in request.items():
            room = sum(t["resources"].get(key, 0) * t["max_workers"] for t in hosts.values())
            if amount * count > room:
                problems.append(f"{what}: {count} x {key} {amount} exceeds the {room} of {sorted(hosts)}")
    return problems


THREE_B = sorted((ROOT / "configs" / "3b").glob("*.yaml"))


@pytest.mark.parametrize("path", THREE_B, ids=[p.name for p in THREE_B])
def test_each_3b_stage_fits_the_cluster_worker_types(path, cluster):
    assert unmet_requests(load_shipped(path), cluster["available_node_types"]) == []


def test_the_3b_gpu_stages_land_on_their_own_worker_types(cluster):
    """The named accelerator each 3B stage asks for picks its worker type, not any GPU node."""
    types = cluster["available_node_types"]

    def types_for(path: str) -> dict[str, list[str]]:
        return {what: sorted(n for n, t in types.items() if fits(request, t))
                for what, request, _ in stage_requests(load_shipped(ROOT / path))}

    assert types_for("configs/3b/preprocess.yaml")["segmenter"] == ["gpu_sam3"]
    assert types_for("configs/3b/dift.yaml") == {"worker": ["gpu_train"]}
    assert types_for("configs/3b/grpo.yaml") == {"rollout": ["gpu_train"], "learner": ["gpu_train"]}
    assert types_for("configs/3b/evaluate.yaml")["engine"] == ["gpu_serve"]
    assert types_for("configs/3b/serve.yaml") == {"replica": ["gpu_serve"]}


def test_gpu_serve_holds_a_full_evaluation_and_full_serving_at_once(cluster):
    """Both inference stages share the L40S type: at their max they fit it together, not just apart."""
    serve_type = cluster["available_node_types"]["gpu_serve"]
    (_, replica, replicas), = stage_requests(load_shipped(ROOT / "configs/3b/serve.yaml"))
    _, (_, engine, engines) = stage_requests(load_shipped(ROOT / "configs/3b/evaluate.yaml"))
    assert replicas * replica["GPU"] + engines * engine["GPU"] <= serve_type["resources"]["GPU"] * serve_type["max_workers"]
    # and the cluster-wide cap does not cut the types' own maxima
    assert cluster["max_workers"] >= sum(t.get("max_workers", 0) for t in cluster["available_node_types"].values())


def test_cluster_accelerator_names_are_the_ones_ray_detects(cluster):
    """Ray sets `accelerator_type:<name>` on a GPU node by itself; a name it never sets (a typo) would
    leave every actor asking for it pending."""
    import ray.util.accelerators.accelerators as known

    names = {v for k, v in vars(known).items() if k.isupper() and isinstance(v, str)}
    declared = {key.split(":", 1)[1] for t in cluster["available_node_types"].values() for key in t["resources"]
                if key.startswith("accelerator_type:")}
    assert declared and declared <= names, declared - names


def test_fit_check_reports_what_the_cluster_cannot_hold(cluster):
    types = cluster["available_node_types"]
    dift = ROOT / "configs/3b/dift.yaml"
    assert unmet_requests(load_shipped(dift, ('worker_resources={"accelerator_type:B200": 0.001}',)), types) \
        == ['worker {\'CPU\': 8.0, \'GPU\': 1, \'accelerator_type:B200\': 0.001}: no worker type offers it']
    too_many = unmet_requests(load_shipped(dift, ("num_workers=17",)), types)
    assert len(too_many) == 1 and "17 x GPU 1 exceeds the 16" in too_many[0]
    assert unmet_requests(load_shipped(dift, ("cpus_per_worker=200",)), types) != []


# -- KubeRay (deploy/) ---------------------------------------------------------------------------------
IMAGE_ROOT = "/workspace/fourdthinker/"  # where deploy/Dockerfile puts the project


def _manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((ROOT / "deploy" / name).read_text()) if doc]


@pytest.fixture(scope="module")
def raycluster() -> dict:
    (doc,) = [d for d in _manifests("raycluster.yaml") if d["kind"] == "RayCluster"]
    return doc


def _quantity(value: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    for unit, scale in units.items():
        if str(value).endswith(unit):
            return float(str(value)[:-len(unit)]) * scale
    return float(value)


def group_node_type(group: dict) -> dict:
    """A KubeRay group as a cluster.yaml node type: the Ray resources of one pod (CPUs and GPUs from the
    container's limits, as Ray on Kubernetes counts them; named ones from rayStartParams) and its bounds."""
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    resources = {"CPU": _quantity(limits["cpu"])}
    if "nvidia.com/gpu" in limits:
        resources["GPU"] = _quantity(limits["nvidia.com/gpu"])
    named = group.get("rayStartParams", {}).get("resources")
    if named:
        import json

        resources.update(json.loads(named.strip('"').replace('\\"', '"')))
    return {"resources": resources, "min_workers": group["minReplicas"], "max_workers": group["maxReplicas"]}


def test_raycluster_mirrors_the_cluster_yaml_worker_types(raycluster, cluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: group_node_type(g) for g in raycluster["spec"]["workerGroupSpecs"]}
    launcher = {name.replace("_", "-"): t for name, t in cluster["available_node_types"].items() if name != "head"}
    assert set(groups) == set(launcher)
    for name, group in groups.items():
        want = launcher[name]
        assert (group["min_workers"], group["max_workers"]) == (want["min_workers"], want["max_workers"]), name
        named = {k: v for k, v in want["resources"].items() if k != "CPU"}  # GPUs and accelerator type
        assert {k: v for k, v in group["resources"].items() if k != "CPU"} == named, name
        assert 0 < group["resources"]["CPU"] <= want["resources"]["CPU"], name


def test_raycluster_pods_request_what_they_limit_and_mount_the_shared_storage(raycluster):
    (claim,) = [d for d in _manifests("raycluster.yaml") if d["kind"] == "PersistentVolumeClaim"]
    pods = [raycluster["spec"]["headGroupSpec"]] + raycluster["spec"]["workerGroupSpecs"]
    for pod in pods:
        spec = pod["template"]["spec"]
        (container,) = spec["containers"]
        assert container["resources"]["requests"] == container["resources"]["limits"], pod.get("groupName", "head")
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = mounts["/mnt/cluster_storage"]
        assert {v["name"]: v for v in spec["volumes"]}[volume]["persistentVolumeClaim"]["claimName"] \
            == claim["metadata"]["name"]


@pytest.mark.parametrize("path", THREE_B, ids=[p.name for p in THREE_B])
def test_each_3b_stage_fits_the_raycluster_groups(path, raycluster):
    groups = {g["groupName"]: group_node_type(g) for g in raycluster["spec"]["workerGroupSpecs"]}
    assert unmet_requests(load_shipped(path), groups) == []


RAYJOBS = sorted((ROOT / "deploy").glob("rayjob-*.yaml"))


def _images(cluster_spec: dict) -> set[str]:
    return {c["image"] for g in [cluster_spec["headGroupSpec"]] + cluster_spec["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]}


def test_the_rayjobs_cover_the_batch_stages():
    assert {p.stem.removeprefix("rayjob-") for p in RAYJOBS} >= {"dift", "evaluate"}


@pytest.mark.parametrize("path", RAYJOBS, ids=[p.name for p in RAYJOBS])
def test_rayjob_runs_its_stage_of_the_image_on_the_raycluster(path, raycluster):
    import shlex

    (job,) = _manifests(path.name)
    stage = path.stem.removeprefix("rayjob-")
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == ("ray.io/v1", "RayJob", f"fourdthinker-{stage}")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}
    python, script, flag, config, *overrides = shlex.split(job["spec"]["entrypoint"])
    assert (python, flag) == ("python", "--config")
    assert script.startswith(IMAGE_ROOT) and config.startswith(IMAGE_ROOT)
    assert (ROOT / script[len(IMAGE_ROOT):]) == ROOT / "pipelines" / f"{stage}.py"
    assert config == f"{IMAGE_ROOT}configs/3b/{stage}.yaml"
    if stage == "evaluate":
        overrides = argv_with_models(overrides)  # --model name=path, as the pipeline reads it
    cfg = load_config(CONFIG_CLASSES[stage], ROOT / config[len(IMAGE_ROOT):], overrides)  # the job's own overrides
    paths = [v for k, v in (o.split("=", 1) for o in overrides) if k in PATH_KEYS]
    if isinstance(cfg, EvaluateConfig):
        paths += [m.path for m in cfg.model_specs()]
    assert paths and cfg.output_dir in paths
    for value in paths:
        assert value.startswith(SHARED), value  # shared by every pod, absolute
    assert f"WORKDIR {IMAGE_ROOT.rstrip('/')}" in (ROOT / "deploy" / "Dockerfile").read_text()
    images = _images(raycluster["spec"])
    assert {c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]} == images
    assert len(images) == 1


def test_rayservice_serves_the_image_app_on_the_serving_group(raycluster):
    """deploy/rayservice.yaml: Ray's own Serve schema accepts its serve config; the app it names loads
    from the image's preset with its args; its cluster's GPU group is raycluster.yaml's gpu-serve (the
    L40S nodes) with room for every replica; the token the preset asks for reaches the worker pods."""
    from ray.serve.schema import ServeDeploySchema

    (service,) = _manifests("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (application,) = serve_config["applications"]
    assert application["import_path"] == "serve.app:app"
    assert application["runtime_env"]["env_vars"]["PYTHONPATH"] == IMAGE_ROOT.rstrip("/")
    args = dict(application["args"])
    preset = args.pop("config")
    assert preset.startswith(IMAGE_ROOT)
    cfg = load_config(ServeConfig, ROOT / preset[len(IMAGE_ROOT):], [f"{k}={v}" for k, v in args.items()])
    assert cfg.model_dir.startswith(SHARED)
    # the same app as serve/config.yaml (`serve deploy` on cluster.yaml's nodes), paths aside
    launcher_app = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]
    assert Path(launcher_app["args"]["config"]).parts[-3:] == Path(preset).parts[-3:]
    assert launcher_app["args"]["model_dir"] == cfg.model_dir

    spec = service["spec"]["rayClusterConfig"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert _images(spec) == _images(raycluster["spec"])
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    main_groups = {g["groupName"]: group_node_type(g) for g in raycluster["spec"]["workerGroupSpecs"]}
    served = {name: group_node_type(g) for name, g in groups.items()}
    assert set(served) == {"gpu-serve"}
    assert served["gpu-serve"]["resources"] == main_groups["gpu-serve"]["resources"]
    assert served["gpu-serve"]["min_workers"] >= cfg.min_replicas
    assert unmet_requests(cfg, served) == []  # every replica, up to max_replicas, has a pod
    (worker,) = groups["gpu-serve"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in worker.get("env", [])}
    assert "secretKeyRef" in env[cfg.auth_token_env]["valueFrom"]
    (claim,) = [d for d in _manifests("raycluster.yaml") if d["kind"] == "PersistentVolumeClaim"]
    for pod in [spec["headGroupSpec"], *groups.values()]:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {claim["metadata"]["name"]}
        (container,) = pod["template"]["spec"]["containers"]
        assert container["resources"]["requests"] == container["resources"]["limits"]


# -- docs/cluster.md -----------------------------------------------------------------------------------
PATH_KEYS = ("input_root", "output_dir", "model_dir", "train_jsonl", "segmenter.checkpoint", "segmenter.bpe_path",
             "benchmark", "video_root")
SHARED = "/mnt/cluster_storage/"


def _doc_commands() -> tuple[list[list[str]], dict[str, str]]:
    """The shell commands of docs/cluster.md's code blocks (continuations joined, `&&` split), and the
    shell variables it assigns, expanded in the commands (others, e.g. an exported token, stay as written)."""
    import re
    import shlex

    text = (ROOT / "docs" / "cluster.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    variables = {}
    for line in lines:
        match = re.fullmatch(r"([A-Z_]+)=(.*)", line.strip())
        if match:
            variables[match[1]] = shlex.split(match[2])[0]
    commands = []
    for line in lines:
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            words = [re.sub(r"\$([A-Z_]+)", lambda m: variables.get(m[1], m[0]), w) for w in words]
            if words:
                commands.append(words)
    return commands, variables


def _click_parse(group, words: list[str]):
    """Parse `words` with the installed CLI's own click command (flags checked, nothing run)."""
    import click

    command, rest = group, list(words)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command, rest = command.commands[rest[0]], rest[1:]
    return command, command.make_context(command.name, rest)


def test_docs_ray_and_serve_commands_parse_with_the_installed_cli():
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    commands, _ = _doc_commands()
    parsed = [_click_parse({"ray": ray_cli, "serve": serve_cli}[w[0]], w[1:]) for w in commands
              if w[0] in ("ray", "serve")]
    names = {command.name for command, _ in parsed}
    assert {"up", "submit", "dashboard", "rsync-up", "down", "deploy", "run", "attach", "status", "shutdown"} <= names


def test_docs_job_commands_run_existing_stages_with_absolute_paths():
    import json

    commands, variables = _doc_commands()
    jobs = [w for w in commands if w[:3] == ["ray", "job", "submit"]]
    stages = set()
    for words in jobs:
        _, ctx = _click_parse(__import__("ray.scripts.scripts", fromlist=["cli"]).cli, words[1:])
        assert ctx.params["working_dir"] == "." and ctx.params["address"].startswith("http")
        assert json.loads(ctx.params["runtime_env_json"])["env_vars"]["HF_HUB_OFFLINE"] == "1"
        python, pipeline, flag, config, *overrides = ctx.params["entrypoint"]
        stage = Path(pipeline).stem
        stages.add(stage)
        assert (python, flag, pipeline, config) == ("python", "--config", f"pipelines/{stage}.py",
                                                    f"configs/3b/{stage}.yaml")
        if stage == "evaluate":  # `--model name=path` (repeated), as pipelines/evaluate.py reads it
            assert "--model" in overrides
            overrides = argv_with_models(overrides)
        for override in overrides:
            key, value = override.split("=", 1)
            if key in PATH_KEYS:
                assert value.startswith(SHARED), override  # absolute, shared
        assert (ROOT / pipeline).is_file()
        cfg = load_config(CONFIG_CLASSES[stage], ROOT / config, overrides)  # the command's own, nothing added
        if isinstance(cfg, EvaluateConfig):
            assert len(cfg.model_specs()) >= 2 and all(m.path.startswith(SHARED) for m in cfg.model_specs())
            assert cfg.benchmark.startswith(SHARED) and str(cfg.videos).startswith(SHARED)
    assert {"preprocess", "dift", "grpo", "evaluate"} <= stages
    assert variables["S"].startswith("/mnt/cluster_storage/")


def test_grpo_bundles_carry_the_named_resources_of_what_they_hold():
    grpo = _pipeline("grpo")
    base = ROOT / "configs/3b/grpo_1gpu.yaml"  # colocated: one bundle holds a rollout and a learner
    colocated = load_shipped(base, ("learner_resources={a: 0.5}", "rollout_resources={a: 0.25, b: 1}"))
    assert grpo.placement_bundles(colocated) == {"colocated": [{"CPU": 8.0, "GPU": 1.0, "a": 0.75, "b": 1}]}
    apart = load_shipped(ROOT / "configs/3b/grpo.yaml")
    assert grpo.placement_bundles(apart) == {
        "rollout": [{"CPU": 8.0, "GPU": 1.0, "accelerator_type:H200": 0.001}] * 4,
        "learner": [{"CPU": 8.0, "GPU": 1.0, "accelerator_type:H200": 0.001}] * 4}


def test_docs_serve_run_builds_the_3b_app_on_shared_storage():
    """`serve run ... serve.app:app key=value ...` as serve/app.py's builder takes it: the preset and
    overrides load, the model is on shared storage, the replicas ask for the serving worker type."""
    from ray.serve.scripts import cli as serve_cli

    commands, _ = _doc_commands()
    runs = [_click_parse(serve_cli, w[1:])[1].params for w in commands if w[:2] == ["serve", "run"]]
    assert runs
    for params in runs:
        assert params["config_or_import_path"] == "serve.app:app" and params["working_dir"] == "."
        assert params["address"].startswith("ray://")
        env = __import__("json").loads(params["runtime_env_json"])["env_vars"]
        assert env["HF_HUB_OFFLINE"] == "1" and "FOURDTHINKER_API_TOKEN" in env
        args = dict(a.split("=", 1) for a in params["arguments"])
        cfg = load_config(ServeConfig, ROOT / args.pop("config"), [f"{k}={v}" for k, v in args.items()])
        assert cfg.model_dir.startswith(SHARED) and cfg.auth_token_env in env
        assert cfg.resources == {"accelerator_type:L40S": 0.001}
    deploys = [w for w in commands if w[:2] == ["serve", "deploy"]]
    assert deploys and all((ROOT / _click_parse(serve_cli, w[1:])[1].params["config_or_import_path"]).is_file()
                           for w in deploys)


# -- serve/config.yaml (`serve deploy`) ---------------------------------------------------------------
def node_project_dir(cluster: dict) -> str:
    """Where cluster.yaml's file_mounts put the project on every node (`~` is the ssh user's home)."""
    (target,) = [t for t, source in cluster["file_mounts"].items() if source == "."]
    return target.replace("~", f"/home/{cluster['auth']['ssh_user']}", 1)


def test_serve_config_file_passes_rays_schema_and_fits_the_serving_worker_type(cluster):
    """What `serve deploy` checks before anything runs (Ray's own schema: no local working_dir), and
    what the app it names asks for: built from the nodes' copy of the project, as the builder would."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(raw)
    (application,) = raw["applications"]
    project = node_project_dir(cluster)
    assert application["import_path"] == "serve.app:app"
    assert application["runtime_env"]["env_vars"]["PYTHONPATH"] == project  # `serve` importable on the nodes
    args = dict(application["args"])
    preset = args.pop("config")
    assert preset.startswith(project + "/")  # read where the app is built, on a node
    cfg = load_config(ServeConfig, ROOT / preset[len(project) + 1:], [f"{k}={v}" for k, v in args.items()])
    assert cfg.model_dir.startswith(SHARED)
    types = cluster["available_node_types"]
    (_, replica, _), = stage_requests(cfg)
    assert sorted(n for n, t in types.items() if fits(replica, t)) == ["gpu_serve"]
    assert unmet_requests(cfg, types) == []


def test_rays_serve_schema_refuses_a_local_working_dir():
    """Why serve/config.yaml reaches the code through PYTHONPATH: the check above can fail."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    raw["applications"][0]["runtime_env"] = {"working_dir": "."}
    with pytest.raises(ValueError, match="remote URIs"):
        ServeDeploySchema.model_validate(raw)
