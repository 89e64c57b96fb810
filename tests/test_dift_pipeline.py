"""The DIFT stage end to end on CPU: Ray Train + DeepSpeed ZeRO-2 (gloo), tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dift_data import write_dift_set

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _cmd(model_dir, data, out, *overrides):
    return [sys.executable, str(ROOT / "pipelines" / "dift.py"), "--config", str(ROOT / "configs/tiny/dift.yaml"),
            f"model_dir={model_dir}", f"train_jsonl={data}", f"output_dir={out}", "progress_bar=false",
            "tensorboard=false", *overrides]


def _steps(out: Path, run: str = "dift-tiny") -> list[dict]:
    log = out / run / "metrics.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _wait_until_quiet(out: Path, run: str = "dift-tiny", quiet_s: float = 5.0, limit_s: float = 60.0) -> None:
    """Return once the run's files have not changed for `quiet_s` seconds."""
    def state():
        return [(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted((out / run).glob("*"))]

    last, since, start = state(), time.time(), time.time()
    while time.time() - since < quiet_s and time.time() - start < limit_s:
        time.sleep(0.5)
        now = state()
        if now != last:
            last, since = now, time.time()


def _committed_steps(out: Path, run: str = "dift-tiny") -> list[int]:
    snapshot = out / run / "checkpoint_manager_snapshot.json"
    try:
        return [r["metrics"]["step"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


@pytest.fixture(scope="module")
def dift_set(tmp_path_factory):
    return write_dift_set(tmp_path_factory.mktemp("dift-data"), n=8)


def test_killed_run_resumes_from_its_checkpoint_and_the_loss_goes_down(tiny_model_dir, dift_set, tmp_path):
    out = tmp_path / "run"
    cmd = _cmd(tiny_model_dir, dift_set, out, "max_steps=8", "checkpoint_every=2", "cpus_per_worker=0.5")
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # Kill once a checkpoint is committed (Ray Train records it in its snapshot) and training went on.
    while (not _committed_steps(out) or len(_steps(out)) < 3) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
    proc.wait()
    _wait_until_quiet(out)  # a Ray worker can outlive its driver by a moment and log one more step
    killed_at = [m["step"] for m in _steps(out)]
    committed = _committed_steps(out)
    assert committed and 3 <= len(killed_at) < 8, (killed_at, committed)

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [m["step"] for m in _steps(out)]
    # The rerun resumes after the last committed checkpoint and logs every step once: the killed
    # run's steps after that checkpoint are replaced, not appended a second time.
    assert max(committed) >= 2
    assert steps == list(range(1, 9)), (steps, committed)
    # Checkpoint folders are named by step (the last keep_checkpoints=2 of them are kept).
    assert sorted(p.name for p in (out / "dift-tiny").glob("checkpoint_*") if p.is_dir()) == [
        "checkpoint_step_000006", "checkpoint_step_000008"]
    losses = {m["step"]: m["loss"] for m in _steps(out)}
    assert (losses[7] + losses[8]) / 2 < (losses[1] + losses[2]) / 2
    final = out / "final"
    assert (final / "model.safetensors").exists() and (final / "processor_config.json").exists()
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(final, local_files_only=True).latent_size == 4


def test_two_workers_give_the_loss_curve_of_one_worker_with_the_same_global_batch(tiny_model_dir, dift_set, tmp_path):
    curves = []
    for workers, per_device in ((1, 2), (2, 1)):
        out = tmp_path / f"w{workers}"
        run = subprocess.run(_cmd(tiny_model_dir, dift_set, out, f"num_workers={workers}",
                                  f"per_device_batch_size={per_device}", "max_steps=3", "checkpoint_every=0",
                                  "cpus_per_worker=0.5", "epochs=1"),
                             cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        curves.append([m["loss"] for m in _steps(out)])
    assert len(curves[0]) == len(curves[1]) == 3
    for one, two in zip(*curves):
        assert two == pytest.approx(one, rel=1e-4)
    assert curves[0][0] != curves[0][2]  # the model did train: the curve is not flat


def test_the_logged_loss_is_the_configured_mix_and_the_latent_cosine_rises(tiny_model_dir, dift_set, tmp_path):
    """The stage trains the DIFT loss it is configured with: loss = ce_weight * CE + sim_weight * (1 - cos)
    at every step (a stage that drops or zeroes a term fails here) and imagining is learned: the
    latent cosine rises. Weights read from the shipped tiny config, so the check follows it."""
    import yaml

    from fourdthinker.config import DiftConfig, from_dict

    cfg = from_dict(DiftConfig, {**yaml.safe_load((ROOT / "configs/tiny/dift.yaml").read_text()),
                                 "model_dir": str(tiny_model_dir), "train_jsonl": str(dift_set)})
    out = tmp_path / "run"
    run = subprocess.run(_cmd(tiny_model_dir, dift_set, out, "max_steps=6", "checkpoint_every=0",
                              "cpus_per_worker=0.5"), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = _steps(out)
    assert [m["step"] for m in steps] == list(range(1, 7))
    for m in steps:
        assert m["sim"] == pytest.approx(1 - m["cos"], abs=1e-5)
        assert m["loss"] == pytest.approx(cfg.ce_weight * m["ce"] + cfg.sim_weight * m["sim"], rel=1e-4)
    assert cfg.sim_weight > 0 and cfg.ce_weight > 0
    first, last = steps[0]["cos"], max(m["cos"] for m in steps[-2:])
    assert last > first + 0.1, [m["cos"] for m in steps]


def test_a_killed_training_worker_ends_the_run_with_a_clear_message(tiny_model_dir, dift_set, tmp_path):
    import psutil

    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(tiny_model_dir, dift_set, out, "max_steps=50", "checkpoint_every=0",
                                 "cpus_per_worker=0.5"),
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 600
        while len(_steps(out)) < 1 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        # This run's own training worker: a descendant of the driver started here.
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())]
        assert workers, "no training worker found"
        for worker in workers:
            worker.kill()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert "dift: failed: training failed (" in err
    assert f"rerun the same command to resume from the last checkpoint under {out / 'dift-tiny'}" in err
