"""A stage submitted as the README shows (`ray job submit --working-dir . -- python pipelines/...`) to a
real local head: its outputs land at the absolute path given, and a relative path is refused (Ray
runs the job in a temporary copy of the working dir that vanishes with it)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from dift_data import write_dift_set

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_own(temp_dir: str, head: subprocess.Popen) -> None:
    """This head's processes only: the `ray start` process group and every process started under
    this test's own --temp-dir (GCS, raylet, dashboard, workers). Never `ray stop`."""
    import psutil

    ours = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for proc in ours:
        try:
            proc.kill()
        except psutil.Error:
            pass
    head.wait(timeout=30)


@pytest.fixture
def head():
    """A Ray head of the test's own: free ports, its own temp dir (short: Unix socket paths are
    limited to 107 bytes), the dashboard's job server on; yields the job server's address."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    port, dashboard = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this environment's
    # The dashboard gives each of its modules 30 s to start: too little on a loaded 2-core machine.
    env["RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT"] = "300"
    log = open(f"{temp_dir}.log", "wb")
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
                             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", "--block"],
                            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 360
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, Path(f"{temp_dir}.log").read_text()[-3000:]
            assert time.time() < deadline, "the dashboard's job server did not come up"
            time.sleep(1)
        yield address, env
    finally:
        _kill_own(temp_dir, proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        os.unlink(f"{temp_dir}.log")


def _submit(address: str, env: dict, job_id: str, *args: str) -> tuple[str, str]:
    """`ray job submit` exactly as the README writes it, from the repository root; the job's final
    status and its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
                    "--no-wait", "--working-dir", ".", "--", "python", "pipelines/dift.py",
                    "--config", "configs/tiny/dift.yaml", *args],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    client = JobSubmissionClient(address)
    deadline = time.time() + 900
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                            JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    return str(status), client.get_job_logs(job_id)


def test_the_readme_job_command_leaves_outputs_at_the_absolute_path_and_refuses_a_relative_one(
        head, tiny_model_dir, tmp_path):
    address, env = head
    data = write_dift_set(tmp_path / "data", n=4)
    inputs = [f"model_dir={tiny_model_dir}", f"train_jsonl={data}", "max_steps=2", "progress_bar=false",
              "tensorboard=false", "cpus_per_worker=0.5"]

    status, logs = _submit(address, env, "relative-output", *inputs, "output_dir=runs/dift-job")
    assert status == "FAILED"
    assert "output_dir=runs/dift-job: a relative path in a Ray job points into the job's temporary copy" in logs
    assert "Traceback" not in logs

    out = tmp_path / "out"
    status, logs = _submit(address, env, "absolute-output", *inputs, f"output_dir={out}")
    assert status == "SUCCEEDED", logs[-3000:]
    assert "joined the cluster at" in logs  # the driver used the job's cluster, not a Ray of its own
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert sorted(p.name for p in (out / "dift-tiny").glob("checkpoint_*") if p.is_dir()) == ["checkpoint_step_000002"]
    assert not (REPO / "runs" / "dift-job").exists()
