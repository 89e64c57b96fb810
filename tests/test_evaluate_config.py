"""The evaluate stage's config: presets load, bad values are refused naming the key, models parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from fourdthinker.config import ConfigError, load_config
from fourdthinker.eval_config import EvaluateConfig, ModelSpec, argv_with_models

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["tiny", "3b"])
def test_presets_load_with_models_given(preset):
    cfg = load_config(EvaluateConfig, REPO / "configs" / preset / "evaluate.yaml", ['models=["x=/m/x", "/m/y"]'])
    assert cfg.model_specs() == [ModelSpec("x", "/m/x"), ModelSpec("y", "/m/y")]
    assert cfg.engine == "vllm" and cfg.temperature == 0.0  # the project's engine, greedy
    assert cfg.videos == Path(cfg.benchmark).parent / "videos"


def test_repeated_model_flags_become_the_models_list():
    argv = argv_with_models(["--config", "c.yaml", "--model", "a=/m/a", "limit=3", "--model", "/m/b"])
    assert argv == ["--config", "c.yaml", "limit=3", 'models=["a=/m/a", "/m/b"]']
    cfg = load_config(EvaluateConfig, None, ["benchmark=b.parquet", *argv[2:]])
    assert [m.name for m in cfg.model_specs()] == ["a", "b"]
    assert argv_with_models(["limit=3"]) == ["limit=3"]


@pytest.mark.parametrize("overrides, key", [
    (["models=[/m/a]", "no_such_key=1"], "no_such_key"),
    (["models=[]"], "models"),
    (["models=[/m/a]", "engine=gpt"], "engine"),
    (["models=[/m/a]", "engine=constant:E"], "constant"),
    (['models=["/x/a", "/y/a"]'], "repeat"),
    (["models=[/m/a]", "max_actors=0"], "max_actors"),
    (["models=[/m/a]", "force_latent_steps=[-1]"], "force_latent_steps"),
    (["models=[/m/a]", "actor_resources={GPU: 1}"], r"actor_resources\.GPU"),
])
def test_bad_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(EvaluateConfig, None, ["benchmark=b.parquet", *overrides])


class _RecordingDataset:
    """Stands for the decoded videos' Dataset: records the plan's calls instead of running them."""

    def __init__(self):
        self.calls = []

    def flat_map(self, fn, **kwargs):
        self.calls.append(("flat_map", fn, kwargs))
        return self

    def map_batches(self, fn, **kwargs):
        self.calls.append(("map_batches", fn, kwargs))
        return self


def test_the_answerer_pool_asks_for_the_configured_resources_per_actor():
    """What each engine actor of a model's pool reserves: GPUs, CPUs and the named resources that
    steer it to a worker type (the 3B preset: the L40S nodes), between min and max actors."""
    from fourdthinker.actors.evaluator import AnswerQuestions, answered_questions

    cfg = load_config(EvaluateConfig, REPO / "configs/3b/evaluate.yaml", ["models=[/m/a]", "max_actors=3"])
    videos = _RecordingDataset()
    answered_questions(cfg, cfg.model_specs()[0], videos, {"v": [{"key": "k"}]})
    (_, fn, kwargs), = [call for call in videos.calls if call[0] == "map_batches"]
    assert fn is AnswerQuestions and kwargs["fn_constructor_kwargs"] == {"cfg": cfg, "model": ModelSpec("a", "/m/a")}
    assert (kwargs["num_gpus"], kwargs["num_cpus"], kwargs["resources"]) == (1, 4, {"accelerator_type:L40S": 0.001})
    assert (kwargs["compute"].min_size, kwargs["compute"].max_size, kwargs["batch_size"]) == (1, 3, 64)
    tiny = load_config(EvaluateConfig, REPO / "configs/tiny/evaluate.yaml", ["models=[/m/a]"])
    videos = _RecordingDataset()
    answered_questions(tiny, tiny.model_specs()[0], videos, {})
    assert videos.calls[-1][2]["resources"] == {} and videos.calls[-1][2]["num_gpus"] == 0


def test_a_relative_path_under_a_ray_job_is_refused_naming_the_key(monkeypatch, capsys):
    """Evaluate follows the stages' path rule: under `ray job submit` a relative benchmark or output_dir
    would point into the job's temporary copy of the code; refused before Ray starts."""
    import importlib.util

    from fourdthinker import cluster

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the paths were checked")

    monkeypatch.setattr(cluster, "ray_session", refuse)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')  # what `ray job submit` sets
    spec = importlib.util.spec_from_file_location("evaluate_stage", REPO / "pipelines" / "evaluate.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    config = str(REPO / "configs/3b/evaluate.yaml")
    assert stage.main(["--config", config, "--model", "a=/m/a", "output_dir=runs/eval"]) == 2
    assert "output_dir=runs/eval: a relative path in a Ray job" in capsys.readouterr().err
    assert stage.main(["--config", config, "--model", "a=/m/a", "benchmark=dsr/b.parquet"]) == 2
    assert "benchmark=dsr/b.parquet: a relative path in a Ray job" in capsys.readouterr().err
