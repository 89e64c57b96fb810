"""Per-step metrics: a resumed run logs every step once, in order."""

from __future__ import annotations

import json

from fourdthinker.metrics_log import MetricsLog, read_metrics, truncate_after


def _log_steps(path, steps, resume_step):
    log = MetricsLog(path, resume_step)
    for step in steps:
        log.write({"step": step, "loss": 1.0 / step})
    log.close()


def test_a_resumed_log_drops_the_steps_after_its_checkpoint_before_appending(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    _log_steps(path, [1, 2, 3], resume_step=0)  # the killed run: checkpoint at step 1, logged up to 3
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    _log_steps(path, [2, 3, 4], resume_step=1)  # the rerun resumes from step 1's checkpoint
    steps = [row["step"] for row in read_metrics(path)]
    assert steps == [1, 2, 3, 4]
    assert all(json.loads(line) for line in path.read_text().splitlines())  # no torn line left


def test_a_fresh_run_over_an_old_log_starts_it_over_and_truncation_keeps_earlier_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log_steps(path, [1, 2], resume_step=0)
    _log_steps(path, [1], resume_step=0)  # no checkpoint: every old line is of a run that is gone
    assert [row["step"] for row in read_metrics(path)] == [1]
    truncate_after(path, 5)
    assert [row["step"] for row in read_metrics(path)] == [1]
    truncate_after(tmp_path / "absent.jsonl", 0)  # nothing to do, no error
    assert not (tmp_path / "absent.jsonl").exists()
