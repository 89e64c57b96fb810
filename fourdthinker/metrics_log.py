"""A training stage's per-step metrics: one JSON line per step in metrics.jsonl, and TensorBoard.

A resumed run restarts at its checkpoint's step, while the killed run may have logged steps after
it: opening the log at the resume step first drops those lines, so every step is in the file once,
in order, with the values of the run that the checkpoints continue.
"""

from __future__ import annotations

import json
from pathlib import Path

from fourdthinker.atomic import atomic_write_jsonl


def read_metrics(path: str | Path) -> list[dict]:
    """The logged steps; a torn last line (a run killed mid-write) is left out."""
    path = Path(path)
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_after(path: str | Path, step: int) -> None:
    """Keep only the lines of steps <= `step` (rewritten whole, atomically)."""
    path = Path(path)
    if not path.is_file():
        return
    rows = read_metrics(path)
    kept = [row for row in rows if int(row.get("step", 0)) <= step]
    if len(kept) != len(rows) or path.read_text(encoding="utf-8").count("\n") != len(rows):
        atomic_write_jsonl(path, kept)


class MetricsLog:
    """Appends one line per step to `path` (and scalars under `tensorboard_dir`, tagged
    `<prefix>/<key>`), after dropping the lines of steps after `resume_step`."""

    def __init__(self, path: str | Path, resume_step: int, tensorboard_dir: str | Path | None = None,
                 prefix: str = "train"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, resume_step)
        self.prefix = prefix
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, metrics: dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"{self.prefix}/{key}", value, int(metrics["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
