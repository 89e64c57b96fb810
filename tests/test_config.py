"""Stage configs: defaults in one place, YAML + overrides on top, unknown keys named."""

from __future__ import annotations

import pytest

from fourdthinker.config import ConfigError, DiftConfig, load_config


def test_yaml_and_overrides_fill_the_typed_config(tmp_path):
    path = tmp_path / "dift.yaml"
    path.write_text("model_dir: /m\ntrain_jsonl: /d.jsonl\nlr: 2.0e-5\nzero_stage: 3\n")
    cfg = load_config(DiftConfig, path, ["num_workers=2", "bf16=false", "max_steps=7"])
    assert (cfg.model_dir, cfg.lr, cfg.zero_stage, cfg.num_workers, cfg.bf16, cfg.max_steps) == \
        ("/m", 2e-5, 3, 2, False, 7)
    assert cfg.ce_weight == 0.1 and cfg.sim_weight == 1.0  # the reference's defaults


def test_unknown_key_is_an_error_naming_the_key_and_the_file(tmp_path):
    path = tmp_path / "dift.yaml"
    path.write_text("model_dir: /m\ntrain_jsonl: /d\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"learning_rate") as err:
        load_config(DiftConfig, path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("override,needle", [("zero_stage=5", "zero_stage"), ("lr=abc", "lr"),
                                             ("num_workers=0", "num_workers"), ("model_dir=", "model_dir")])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(DiftConfig, None, ["model_dir=/m", "train_jsonl=/d", override])


def test_compiled_blocks_are_refused_under_zero3():
    with pytest.raises(ConfigError, match="compile"):
        load_config(DiftConfig, None, ["model_dir=/m", "train_jsonl=/d", "compile=true", "zero_stage=3"])
    assert load_config(DiftConfig, None, ["model_dir=/m", "train_jsonl=/d", "compile=true"]).compile


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="no-such.yaml"):
        load_config(DiftConfig, "no-such.yaml")


def test_named_resources_reach_each_stage_config_and_bad_ones_name_their_key():
    from fourdthinker.grpo_config import GrpoConfig
    from fourdthinker.preprocess.config import PreprocessConfig

    base = ["model_dir=m", "train_jsonl=t"]
    assert load_config(DiftConfig, None, base + ['worker_resources={"accelerator_type:H200": 0.001}']
                       ).worker_resources == {"accelerator_type:H200": 0.001}
    grpo = load_config(GrpoConfig, None, base + ["learner_resources={a: 1}", "rollout_resources={b: 2}"])
    assert (grpo.learner_resources, grpo.rollout_resources) == ({"a": 1}, {"b": 2})
    prep = load_config(PreprocessConfig, None, ["input_root=r", "segmenter.resources={fake_gpu: 1}"])
    assert prep.segmenter.resources == {"fake_gpu": 1}
    with pytest.raises(ConfigError, match=r"worker_resources\.GPU: CPUs, GPUs and memory have their own keys"):
        load_config(DiftConfig, None, base + ["worker_resources={GPU: 1}"])
    with pytest.raises(ConfigError, match=r"segmenter\.resources\.fake_gpu: expected an amount >= 0, got -1"):
        load_config(PreprocessConfig, None, ["input_root=r", "segmenter.resources={fake_gpu: -1}"])
    with pytest.raises(ConfigError, match=r"rollout_resources\.x: expected an amount >= 0, got 'many'"):
        load_config(GrpoConfig, None, base + ["rollout_resources={x: many}"])


def test_named_resources_of_the_inference_stages_and_bad_ones_name_their_key():
    from fourdthinker.eval_config import EvaluateConfig
    from fourdthinker.serve_config import ServeConfig

    evaluate = ["benchmark=b.parquet", "models=[/m/a]"]
    assert load_config(EvaluateConfig, None, evaluate + ['actor_resources={"accelerator_type:L40S": 0.001}']
                       ).actor_resources == {"accelerator_type:L40S": 0.001}
    assert load_config(EvaluateConfig, None, evaluate).actor_resources == {}  # none unless asked
    assert load_config(ServeConfig, None, ["model_dir=m", "resources={fake_gpu: 1}"]).resources == {"fake_gpu": 1}
    with pytest.raises(ConfigError, match=r"actor_resources\.CPU: CPUs, GPUs and memory have their own keys"):
        load_config(EvaluateConfig, None, evaluate + ["actor_resources={CPU: 4}"])
    with pytest.raises(ConfigError, match=r"^resources\.fake_gpu: expected an amount >= 0, got -1"):
        load_config(ServeConfig, None, ["model_dir=m", "resources={fake_gpu: -1}"])
