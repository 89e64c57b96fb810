"""The GRPO driver end to end on CPU: 2 rollout actors (vLLM) + 2 learner ranks (DeepSpeed over gloo)
run a few steps, log every metric, checkpoint, and resume; a rollout actor that dies is restarted,
re-synced and its prompts re-queued."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
METRICS = ["reward/accuracy/mean", "reward/accuracy/std", "reward/format/mean", "reward/format/std",
           "reward/total/mean", "accuracy", "format_rate", "completion_length/mean", "latent_blocks/mean",
           "kl", "clip_fraction", "logprob_gap/max", "logprob_gap/mean", "time/generate", "time/reward",
           "time/train", "time/wake", "time/sync", "loss", "weight_version"]


def _pipeline():
    spec = importlib.util.spec_from_file_location("grpo_pipeline", REPO / "pipelines" / "grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def _dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        frames = []
        for j in range(2):
            path = root / f"clip{i}" / f"frame_{j:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(path)
            frames.append(str(path.relative_to(root)))
        lines.append({"Question": f"Which way does object {i} move?", "A": "Left", "B": "Right", "C": "Up",
                      "D": "Down", "Correct": "ABCD"[i], "frame_paths": frames, "Type": "abs_dir"})
    path = root / "4drl.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_a_run_logs_every_metric_checkpoints_and_resumes(ray_local, tiny_model_dir, tmp_path, capsys):
    grpo = _pipeline()
    data = _dataset(tmp_path / "data")
    args = ["--config", str(REPO / "configs/tiny/grpo.yaml"), f"model_dir={tiny_model_dir}",
            f"train_jsonl={data}", f"output_dir={tmp_path / 'runs'}", "run_name=t", "max_tokens=12",
            "progress_bar=false", "checkpoint_every=1"]
    assert grpo.main(args + ["max_steps=2"]) == 0
    run = tmp_path / "runs" / "t"
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in first] == [1, 2]
    for m in first:
        missing = [k for k in METRICS if k not in m]
        assert not missing, missing
        assert m["logprob_gap/max"] < 1e-3  # policy consistency holds at every step
        assert m["optimizer_steps"] == 1 and m["weight_version"] == m["step"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000002"]

    # As if the run had been killed after logging step 2 but before its checkpoint: the rerun resumes
    # at step 1's checkpoint and must log step 2 once, not append it a second time.
    shutil.rmtree(run / "checkpoints" / "step_000002")
    assert grpo.main(args + ["max_steps=3"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    resumed = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert resumed["logprob_gap/max"] < 1e-3  # the fresh engines got the checkpoint's weights
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000003"]

    capsys.readouterr()
    metrics_before = (run / "metrics.jsonl").read_text()
    assert grpo.main(args + ["max_steps=3"]) == 0  # finished: says so, starts no engine, logs nothing
    said = capsys.readouterr().out
    assert "already finished (3 of max_steps=3 steps)" in said and str(run / "final") in said
    assert (run / "metrics.jsonl").read_text() == metrics_before

    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(run / "final", local_files_only=True)
    saved = load_file(str(run / "checkpoints" / "step_000003" / "hf" / "model.safetensors"))
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True)
    name = "lm_head.weight"
    assert np.allclose(model.state_dict()[name].numpy(), saved[name].numpy())
    assert not np.allclose(model.state_dict()[name].numpy(), initial.state_dict()[name].numpy())


def test_a_killed_learner_ends_the_run_with_a_clear_message_not_a_hang(ray_local, tiny_model_dir, tmp_path,
                                                                       monkeypatch, capsys):
    from fourdthinker.actors.learner import LearnerGroup

    train_step = LearnerGroup.train_step

    def killing_train_step(self, prompts, rows):
        ray_local.kill(self.workers[1])  # rank 1 dies as the step starts; rank 0 would wait on it forever
        return train_step(self, prompts, rows)

    monkeypatch.setattr(LearnerGroup, "train_step", killing_train_step)
    grpo = _pipeline()
    data = _dataset(tmp_path / "data")
    rc = grpo.main(["--config", str(REPO / "configs/tiny/grpo.yaml"), f"model_dir={tiny_model_dir}",
                    f"train_jsonl={data}", f"output_dir={tmp_path / 'runs'}", "run_name=k", "max_tokens=8",
                    "progress_bar=false", "max_steps=2"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "grpo: failed: learner rank 1 of 2 died during train_step" in err
    assert "at step 1; rerun the same command to resume from the start (no checkpoint yet)" in err
    assert "Traceback" not in err


def _flaky_rollout_class():
    """Defined in a function so Ray ships the class by value (workers cannot import tests)."""

    class _FlakyRollout:
        """Dies on its first generate (once, ever: a marker file survives the restart)."""

        def __init__(self, marker: str):
            self.marker = Path(marker)
            self.version = 0

        def generate(self, requests, sampling):
            import os

            if not self.marker.exists():
                self.marker.write_text("died")
                os._exit(1)
            return [[f"{r}@v{self.version}"] * sampling for r in requests]

        def update_weights(self, buckets, version):
            self.version = version
            return version

    return _FlakyRollout


def test_a_dead_rollout_actor_is_restarted_resynced_and_its_prompts_requeued(ray_local, tmp_path):
    from fourdthinker.actors.rollout_group import generate_groups

    ray = ray_local
    flaky = ray.remote(max_restarts=1, num_cpus=0)(_flaky_rollout_class())
    actors = [flaky.remote(str(tmp_path / "a")), flaky.remote(str(tmp_path / "b"))]
    (tmp_path / "b").write_text("healthy")  # only actor 0 dies
    resynced = []

    def resync(actor):
        resynced.append(actor)
        ray.get(actor.update_weights.remote(None, 7))

    groups = generate_groups(actors, ["p0", "p1", "p2"], 2, resync, max_retries=1)
    assert groups == [["p0@v7", "p0@v7"], ["p1@v7", "p1@v7"], ["p2@v0", "p2@v0"]]
    assert resynced == [actors[0]]
