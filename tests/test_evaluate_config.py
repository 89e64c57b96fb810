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
])
def test_bad_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(EvaluateConfig, None, ["benchmark=b.parquet", *overrides])
