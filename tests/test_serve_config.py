"""The Serve stage's typed config and the Ray Serve options it becomes (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fourdthinker.config import ConfigError, load_config
from fourdthinker.serve_config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_3b_preset_is_one_replica_per_gpu_autoscaled_on_ongoing_requests(tmp_path):
    from serve.app import deployment_options

    cfg = load_config(ServeConfig, ROOT / "configs/3b/serve.yaml", [f"model_dir={tmp_path}", "max_replicas=4"])
    options = deployment_options(cfg)
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                             "target_ongoing_requests": cfg.target_ongoing_requests}
    assert options["max_ongoing_requests"] == cfg.max_ongoing_requests
    assert cfg.auth_token_env and cfg.served_name == tmp_path.name


def test_the_tiny_preset_loads_and_the_builder_takes_serve_run_arguments(tmp_path):
    from serve.app import app

    application = app({"config": str(ROOT / "configs/tiny/serve.yaml"), "model_dir": str(tmp_path),
                       "model_name": "tiny"})
    assert type(application).__name__ == "Application"
    with pytest.raises(ConfigError, match="model_dir"):
        app({})


@pytest.mark.parametrize("override, needle", [("min_replicas=3", "min_replicas"), ("max_body_bytes=0", "max_body_bytes"),
                                              ("media_root=/no/such/dir", "media_root"),
                                              ("target_ongoing_requests=0", "target_ongoing_requests"),
                                              ("request_timeout_s=-1", "request_timeout_s"),
                                              ("resources={GPU: 1}", r"resources\.GPU")])
def test_bad_values_name_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(ServeConfig, None, [f"model_dir={tmp_path}", override])


def test_the_replicas_ask_for_the_named_resources_of_the_config(tmp_path):
    """The 3B preset's replicas land on the L40S nodes (cluster.yaml's gpu_serve); the tiny preset
    asks for none. Checked on the deployment Serve would start, not on the options dict alone."""
    from serve.app import app

    big = app({"config": str(ROOT / "configs/3b/serve.yaml"), "model_dir": str(tmp_path)})
    assert big._bound_deployment.ray_actor_options == {"num_gpus": 1, "num_cpus": 4,
                                                       "resources": {"accelerator_type:L40S": 0.001}}
    tiny = app({"config": str(ROOT / "configs/tiny/serve.yaml"), "model_dir": str(tmp_path), "resources": "{a: 2}"})
    assert tiny._bound_deployment.ray_actor_options["resources"] == {"a": 2}
    assert app({"config": str(ROOT / "configs/tiny/serve.yaml"), "model_dir": str(tmp_path)}
               )._bound_deployment.ray_actor_options["resources"] == {}


def test_paths_are_made_absolute_and_a_relative_one_under_a_ray_job_is_refused(tmp_path, monkeypatch):
    from fourdthinker.paths import resolve_config_paths

    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cfg = load_config(ServeConfig, ROOT / "configs/tiny/serve.yaml", ["model_dir=ckpt"])
    resolve_config_paths(cfg, ServeConfig.PATH_KEYS)
    assert cfg.model_dir == str(tmp_path / "ckpt") and cfg.media_root == ""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')  # what `ray job submit` sets
    cfg = load_config(ServeConfig, ROOT / "configs/tiny/serve.yaml", ["model_dir=ckpt"])
    with pytest.raises(ConfigError, match="model_dir=ckpt: a relative path in a Ray job"):
        resolve_config_paths(cfg, ServeConfig.PATH_KEYS)
