"""The entry point every stage shares (fourdthinker/cluster.py: run_stage, ray_session): paths made
absolute or refused under a Ray job, inputs checked before Ray starts, --help listing every config key,
and the Ray cluster it joins."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fourdthinker import cluster
from fourdthinker.config import DiftConfig, load_config
from fourdthinker.paths import in_ray_job

REPO = Path(__file__).resolve().parents[1]


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_stage", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if a stage gets as far as starting Ray."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(cluster, "ray_session", refuse)


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")  # what the check looks for
    return path


def _dift(argv, capsys) -> tuple[int, str]:
    rc = _stage("dift").main(["--config", str(REPO / "configs/tiny/dift.yaml"), *argv])
    return rc, capsys.readouterr().err


def test_a_jsonl_without_a_usable_sample_stops_the_stage_before_ray_with_counts_and_fix(
        no_ray, model_dir, tmp_path, capsys):
    data = tmp_path / "data" / "dift.jsonl"
    data.parent.mkdir()
    record = {"id": "a", "text_input": "Q?", "text_output": "<think>x <output_image></think><answer>A</answer>",
              "image_input": ["runs/pp/frames/a/frame_0000.jpg"], "image_output": ["runs/pp/overlays/a/0.png"]}
    data.write_text(json.dumps(record) + "\n" + json.dumps({**record, "image_input": ["../x.jpg"]}) + "\n")
    rc, err = _dift([f"model_dir={model_dir}", f"train_jsonl={data}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert rc == 2
    assert f"{data}: no usable samples" in err and "missing_image: 1" in err and "path_outside_root: 1" in err
    assert f"relative to the JSONL file's folder {data.parent}" in err
    assert "Traceback" not in err


def test_input_paths_are_checked_before_ray_and_name_the_key(no_ray, model_dir, tmp_path, capsys):
    rc, err = _dift([f"model_dir={tmp_path / 'nowhere'}", f"train_jsonl={tmp_path / 'x.jsonl'}"], capsys)
    assert rc == 2 and f"model_dir={tmp_path / 'nowhere'}: does not exist" in err
    rc, err = _dift([f"model_dir={tmp_path}", f"train_jsonl={tmp_path / 'x.jsonl'}"], capsys)
    assert rc == 2 and f"model_dir={tmp_path}: holds no config.json" in err
    rc, err = _dift([f"model_dir={model_dir}", f"train_jsonl={tmp_path / 'x.jsonl'}"], capsys)
    assert rc == 2 and f"train_jsonl={tmp_path / 'x.jsonl'}: no such file" in err


def test_the_preprocess_input_root_error_says_how_to_build_one(no_ray, tmp_path, capsys):
    rc = _stage("preprocess").main(["--config", str(REPO / "configs/tiny/preprocess.yaml"),
                                    f"input_root={tmp_path / 'world'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"input_root={tmp_path / 'world'}: does not exist" in err
    assert "fourdthinker synth --out runs/world" in err


def test_an_override_that_is_not_yaml_is_taken_as_the_string_typed(tmp_path):
    cfg = load_config(DiftConfig, REPO / "configs/tiny/dift.yaml",
                      ["model_dir=...", "train_jsonl=[a,", "run_name=@x", "lr=3e-4"])
    assert (cfg.model_dir, cfg.train_jsonl, cfg.run_name, cfg.lr) == ("...", "[a,", "@x", 3e-4)


def test_relative_paths_become_absolute_outside_a_ray_job(no_ray, model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    rc, err = _dift(["model_dir=model", "train_jsonl=missing.jsonl"], capsys)
    assert rc == 2 and f"train_jsonl={tmp_path / 'missing.jsonl'}: no such file" in err


def test_a_relative_path_under_a_ray_job_is_refused_with_what_to_give_instead(no_ray, model_dir, tmp_path,
                                                                               monkeypatch, capsys):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')  # what `ray job submit` sets
    rc, err = _dift([f"model_dir={model_dir}", f"train_jsonl={tmp_path / 'x.jsonl'}"], capsys)
    assert rc == 2  # the tiny config's output_dir (runs/dift-tiny) is relative
    assert "output_dir=runs/dift-tiny: a relative path in a Ray job points into the job's temporary copy" in err
    assert "give an absolute path on storage every node sees" in err


def test_a_ray_job_is_recognised_by_its_environment_or_its_unpacked_working_dir(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    unpacked = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_0123abcd/runs"
    assert in_ray_job(unpacked) and not in_ray_job("/home/me/fourdthinker")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert in_ray_job("/home/me/fourdthinker")


def test_help_lists_every_config_key_with_its_default_and_description(capsys):
    with pytest.raises(SystemExit):
        _stage("preprocess").main(["--help"])
    text = capsys.readouterr().out
    assert "  output_dir='runs/preprocess'" in text
    assert "  fps=1.0  frames extracted per second of video" in text
    assert "  segmenter.batch_size=1  clips per segmenter call" in text  # nested sections too
    assert "  llm.check_overlays=True  Ask, per question, whether every mental-image overlay" in text
    from dataclasses import fields

    from fourdthinker.grpo_config import GrpoConfig

    with pytest.raises(SystemExit):
        _stage("grpo").main(["--help"])
    text = capsys.readouterr().out
    assert all(f"  {f.name}=" in text for f in fields(GrpoConfig))


@pytest.mark.parametrize("env, flag, expected", [
    (None, None, "local"), ("10.0.0.5:6379", None, "10.0.0.5:6379"),
    ("10.0.0.5:6379", "ray://h:10001", "ray://h:10001")])
def test_a_stage_starts_its_own_ray_unless_told_which_cluster_to_join(monkeypatch, capsys, env, flag, expected):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    with cluster.ray_session(flag):
        pass
    assert calls == [{"address": expected}, "shutdown"]
    said = capsys.readouterr().out
    assert ("started a local cluster" in said) if expected == "local" else (f"joined the cluster at {expected}" in said)
