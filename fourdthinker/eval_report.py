"""The comparison of evaluated models: a Markdown table in the paper's column order and a bar chart
with one group of bars per sub-task, from summaries (a finished run's, or any run directories')."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fourdthinker.atomic import atomic_write
from fourdthinker.dsr import COLUMNS_ORDER, MACRO_COLUMN, PUBLISHED, SUBTASKS, models_table
from fourdthinker.errors import UsageError

SUMMARY_NAME = "dsr_eval_summary.json"
TABLE_NAME = "comparison.md"
CHART_NAME = "comparison.png"


def _accuracy(summary: Mapping[str, Any], column: str) -> float:
    value = summary["subtask_macro_avg"] if column == MACRO_COLUMN else summary["subtask_accuracy"][column]
    return float("nan") if value is None else 100.0 * value


def plot_comparison(summaries: Mapping[str, Mapping[str, Any]], path: str | Path) -> dict[str, Any]:
    """A PNG: for each column of `COLUMNS_ORDER` (13 sub-tasks, then Avg) one bar per model. Returns
    what was drawn (group labels, bars per group) as read back from the figure."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summaries)
    columns = list(COLUMNS_ORDER)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(10, 0.9 * len(columns) * max(1, len(names) / 3)), 4.8))
    x = np.arange(len(columns))
    for k, name in enumerate(names):
        heights = [_accuracy(summaries[name], c) for c in columns]
        ax.bar(x + (k - (len(names) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, columns, rotation=35, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("DSR benchmark, accuracy per sub-task")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never on them
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    drawn = {"groups": [t.get_text() for t in ax.get_xticklabels()],
             "bars_per_group": [len(container) for container in ax.containers],
             "models": [container.get_label() for container in ax.containers]}
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return drawn


def write_comparison(summaries: Mapping[str, Mapping[str, Any]], out_dir: str | Path,
                     compare_published: bool = True) -> tuple[str, Path, Path]:
    """`comparison.md` and `comparison.png` in `out_dir`; returns (table, table path, chart path)."""
    out_dir = Path(out_dir)
    published = PUBLISHED if compare_published else {}
    table = models_table(summaries, published)
    table_path = atomic_write(out_dir / TABLE_NAME, table + "\n")
    chart_path = out_dir / CHART_NAME
    plot_comparison({**{f"{k} (published)": v for k, v in published.items()}, **summaries}, chart_path)
    return table, table_path, chart_path


def find_summaries(run_dirs: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """Every model summary under the given run directories (a run dir holds `<model>/` dirs; a model
    dir itself is accepted too), named by model dir, prefixed by the run when names repeat."""
    found: list[tuple[Path, Path]] = []
    for run in map(Path, run_dirs):
        if not run.is_dir():
            raise UsageError(f"{run}: not a directory; pass evaluation output directories")
        paths = [run / SUMMARY_NAME] if (run / SUMMARY_NAME).is_file() else sorted(run.glob(f"*/{SUMMARY_NAME}"))
        if not paths:
            raise UsageError(f"{run}: no {SUMMARY_NAME} in it or its sub-directories; "
                             "pass the output_dir of an evaluation (pipelines/evaluate.py)")
        found += [(run, p) for p in paths]
    names = [p.parent.name for _, p in found]
    summaries = {}
    for (run, path), name in zip(found, names):
        if names.count(name) > 1:
            name = f"{run.name}/{name}" if path.parent != run else f"{run.parent.name}/{name}"
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: not valid JSON ({err}); re-run that evaluation") from None
        missing = [k for k in ("accuracy", "eval_count", "subtask_accuracy", "subtask_macro_avg") if k not in summary]
        if missing or set(summary.get("subtask_accuracy", {})) != set(SUBTASKS.values()):
            raise UsageError(f"{path}: not a DSR summary (missing {missing or 'sub-task columns'})")
        summaries[name] = summary
    return summaries


def rebuild_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
                   compare_published: bool = True) -> tuple[str, Path, Path]:
    """Table and chart from existing summaries, no model run (`fourdthinker eval-report`)."""
    summaries = find_summaries(run_dirs)
    return write_comparison(summaries, Path(out_dir) if out_dir else Path(run_dirs[0]), compare_published)
