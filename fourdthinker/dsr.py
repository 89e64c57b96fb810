"""The DSR video-reasoning benchmark: read it, prompt it, score model outputs (no model calls).

Scoring follows the reference evaluation (REFERENCE-SPEC §10) so that our numbers sit next to the
published ones: a question whose video is missing is skipped (in no denominator), the overall
accuracy is micro over evaluated questions, the "Avg" column is the macro mean over the sub-tasks
that have questions, and a row whose `type` is no known sub-task counts only in the overall score.
Accuracies are stored as fractions in [0, 1]; the published table (and `comparison_table`) shows
percentages.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fourdthinker.atomic import atomic_write, atomic_write_json
from fourdthinker.errors import UsageError
from fourdthinker.prompts import question_prompt
from fourdthinker.rewards import extract_choice

# Sub-task key (the benchmark's `type` column) -> result column, in the published column order.
SUBTASKS: dict[str, str] = {
    "abs_dis": "Abs Dis",
    "abs_dir": "Abs Dir",
    "abs_ori": "Abs Ori",
    "abs_spd": "Abs Spd",
    "abs_spd_comp": "Abs Spd Comp",
    "abs_dir_pred": "Abs Dir Pred",
    "rel_dis": "Rel Dis",
    "rel_dir": "Rel Dir",
    "rel_ori": "Rel Ori",
    "rel_spd": "Rel Spd",
    "rel_spd_comp": "Rel Spd Comp",
    "rel_dir_pred": "Rel Dir Pred",
    "non_temp": "Non-Temp Based",
}
MACRO_COLUMN = "Avg"
COLUMNS_ORDER: tuple[str, ...] = (*SUBTASKS.values(), MACRO_COLUMN)

BENCHMARK_SUFFIXES = (".parquet", ".json", ".jsonl")


@dataclass(frozen=True)
class DsrItem:
    """One benchmark question; `index` is its row number in the benchmark file."""

    index: int
    video_id: str
    question: str
    options: tuple[str, ...]
    answer: str
    subtask_type: str

    @property
    def subtask_column(self) -> str | None:
        """The result column of this question's sub-task, None for an unknown `type`."""
        return SUBTASKS.get(self.subtask_type)


# ----------------------------------------------------------------------------------------- reading

def _load_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in BENCHMARK_SUFFIXES:
        raise UsageError(f"benchmark {path}: unsupported file type {path.suffix!r}; "
                         f"use one of {', '.join(BENCHMARK_SUFFIXES)}")
    if not path.is_file():
        raise UsageError(f"benchmark {path}: no such file; pass the DSR benchmark parquet/json/jsonl")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"benchmark {path}: invalid JSON ({err}); fix the file") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UsageError(f"benchmark {path}: expected a list of row objects (one per question)")
    return rows


def _first_present(row: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = row.get(key)
        if value is not None:
            return value
    return None


def parse_options(value: Any, where: str) -> tuple[str, ...]:
    """Options as a tuple of strings from a list, an array, or the string repr of a list.

    A string is parsed as a Python literal only (`ast.literal_eval`): benchmark files are data,
    and evaluating them as code (as the reference did) would run whatever a file contains.
    """
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise UsageError(f"{where}: options {value[:80]!r} are not a list literal; "
                             "write them as a list of option strings") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise UsageError(f"{where}: options must be a non-empty list of strings, got {value!r}")
    if not all(isinstance(option, str) for option in value):
        raise UsageError(f"{where}: options must all be strings, got {value!r}")
    return tuple(value)


def _item_from_row(index: int, row: Mapping[str, Any], source: Path) -> DsrItem:
    where = f"benchmark {source} row {index}"
    video_id = _first_present(row, "videoID", "video")
    question = row.get("question")
    options = _first_present(row, "options", "candidates")
    answer = "" if row.get("answer") is None else str(row["answer"]).strip().upper()[:1]
    missing = [name for name, value in (("videoID (or video)", video_id), ("question", question),
                                        ("options (or candidates)", options), ("answer", answer))
               if value is None or (isinstance(value, str) and not value.strip())]
    if missing:
        raise UsageError(f"{where}: missing {', '.join(missing)}; every question needs them")
    return DsrItem(
        index=index,
        video_id=str(video_id),
        question=str(question),
        options=parse_options(options, where),
        answer=answer,
        subtask_type=str(row.get("type") or "").strip().lower(),
    )


def read_benchmark(path: str | Path) -> list[DsrItem]:
    """All questions of a DSR benchmark file (.parquet, .json list or .jsonl), in row order."""
    path = Path(path)
    return [_item_from_row(i, row, path) for i, row in enumerate(_load_rows(path))]


def read_benchmark_rows(path: str | Path) -> list[tuple[DsrItem, str]]:
    """Every row of a benchmark file as (question, "") or, for a row that cannot be read (no video
    id, options that are not a list, ...), (a placeholder question without options, the reason).

    An evaluation skips unreadable rows with their reason and scores the rest; `read_benchmark`
    is the strict reader for callers that want the first bad row to stop them.
    """
    path = Path(path)
    out: list[tuple[DsrItem, str]] = []
    for index, row in enumerate(_load_rows(path)):
        try:
            out.append((_item_from_row(index, row, path), ""))
        except UsageError as err:
            video_id = _first_present(row, "videoID", "video")
            answer = "" if row.get("answer") is None else str(row["answer"]).strip().upper()[:1]
            placeholder = DsrItem(index=index, video_id="" if video_id is None else str(video_id),
                                  question=str(row.get("question") or ""), options=(), answer=answer,
                                  subtask_type=str(row.get("type") or "").strip().lower())
            out.append((placeholder, f"bad row: {err}"))
    return out


# --------------------------------------------------------------------------------- prompts, videos

def item_prompt(item: DsrItem) -> str:
    """The user text: question, blank line, the options one per line, the format suffix."""
    return question_prompt(item.question, list(item.options))


def video_path(item: DsrItem, video_root: str | Path) -> Path:
    return Path(video_root) / f"{item.video_id}.mp4"


def partition_available(items: Iterable[DsrItem], video_root: str | Path
                        ) -> tuple[list[DsrItem], list[DsrItem]]:
    """(questions whose video exists, questions to skip because their video file is missing)."""
    available: list[DsrItem] = []
    skipped: list[DsrItem] = []
    for item in items:
        (available if video_path(item, video_root).is_file() else skipped).append(item)
    return available, skipped


# ----------------------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class DsrRecord:
    """The outcome of one question: the model's raw output and the letter read from it, or a skip.

    `raw` is the assistant reply (or the error text when inference failed, which scores as wrong);
    `error` says why inference failed, `skip_reason` why the question was skipped.
    """

    item: DsrItem
    video_path: str
    raw: str = ""
    pred: str = ""
    skipped: bool = False
    error: str | None = None
    skip_reason: str = ""

    @classmethod
    def from_output(cls, item: DsrItem, video_path: str | Path, raw: str) -> "DsrRecord":
        return cls(item=item, video_path=str(video_path), raw=raw, pred=extract_choice(raw))

    @classmethod
    def skip(cls, item: DsrItem, video_path: str | Path, reason: str = "") -> "DsrRecord":
        return cls(item=item, video_path=str(video_path), skipped=True, skip_reason=reason)

    @property
    def hit(self) -> bool:
        return not self.skipped and self.pred == self.item.answer


def _fraction(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def summary_from_counts(subtask_correct: Sequence[int], subtask_total: Sequence[int], correct: int,
                        eval_count: int, skipped: int) -> dict[str, Any]:
    """The summary JSON (reference key set) from per-sub-task counts in `SUBTASKS` order plus the
    overall counts (which may include rows of no known sub-task)."""
    columns = list(SUBTASKS.values())
    subtask_accuracy = {c: _fraction(int(k), int(n)) for c, k, n in zip(columns, subtask_correct, subtask_total)}
    present = [acc for acc in subtask_accuracy.values() if acc is not None]
    return {
        "total": eval_count + skipped,
        "eval_count": eval_count,
        "skipped": skipped,
        "correct": correct,
        "accuracy": _fraction(correct, eval_count),
        "subtask_accuracy": subtask_accuracy,
        "subtask_correct": {c: int(k) for c, k in zip(columns, subtask_correct)},
        "subtask_total": {c: int(n) for c, n in zip(columns, subtask_total)},
        "subtask_macro_avg": float(np.mean(present)) if present else None,
        "subtask_columns_order": list(COLUMNS_ORDER),
    }


def score(records: Iterable[DsrRecord]) -> dict[str, Any]:
    """Benchmark summary of scored records: overall (micro) and per-sub-task accuracy, macro Avg."""
    records = list(records)
    evaluated = [r for r in records if not r.skipped]
    skipped = len(records) - len(evaluated)
    # Unknown types go to one extra bin past the sub-tasks so they count only in the overall score.
    keys = list(SUBTASKS)
    bins = np.array([keys.index(r.item.subtask_type) if r.item.subtask_type in SUBTASKS else len(keys)
                     for r in evaluated], dtype=np.int64)
    hits = np.array([r.hit for r in evaluated], dtype=np.int64)
    totals = np.bincount(bins, minlength=len(keys) + 1)[: len(keys)]
    corrects = np.bincount(bins, weights=hits, minlength=len(keys) + 1)[: len(keys)].astype(np.int64)
    return summary_from_counts(corrects, totals, correct=int(hits.sum()), eval_count=len(evaluated),
                               skipped=skipped)


def write_results(records: Sequence[DsrRecord], summary: Mapping[str, Any], out_dir: str | Path,
                  stem: str) -> tuple[Path, Path]:
    """Write `<stem>.jsonl` (one line per evaluated question: the reference's keys plus `options`
    and `error`), `<stem>_summary.json` and, when questions were skipped, `<stem>_skipped.jsonl`
    (index, video id, video path, reason): skipped questions have no output line, so their reasons
    would otherwise be lost behind the summary's `skipped` count.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({
            "index": r.item.index,
            "video_id": r.item.video_id,
            "video_path": r.video_path,
            "question": item_prompt(r.item),
            "options": list(r.item.options),
            "gt": r.item.answer,
            "pred": r.pred,
            "answer": r.pred,
            "raw": r.raw,
            "hit": int(r.hit),
            "subtask_type": r.item.subtask_type,
            "error": r.error,
        }, ensure_ascii=False)
        for r in records if not r.skipped
    ]
    skipped = [json.dumps({"index": r.item.index, "video_id": r.item.video_id, "video_path": r.video_path,
                           "reason": r.skip_reason}, ensure_ascii=False)
               for r in records if r.skipped]
    samples_path = out_dir / f"{stem}.jsonl"
    summary_path = out_dir / f"{stem}_summary.json"
    # a crashed run must not leave a truncated results file that looks complete
    atomic_write(samples_path, "".join(line + "\n" for line in lines))
    skipped_path = out_dir / f"{stem}_skipped.jsonl"
    if skipped:
        atomic_write(skipped_path, "".join(line + "\n" for line in skipped))
    else:
        skipped_path.unlink(missing_ok=True)  # left by an earlier run of the same stem
    atomic_write_json(summary_path, summary)
    return samples_path, summary_path


# ------------------------------------------------------------------------------ published results

# Published 3B results (REFERENCE-SPEC §11): per-sub-task correct/total in `SUBTASKS` order; both
# runs evaluated 1,413 of 1,450 questions (37 videos unavailable), every row of a known sub-task.
_PUBLISHED_TOTALS = (83, 64, 79, 81, 91, 115, 106, 87, 78, 97, 138, 161, 233)
_PUBLISHED_CORRECT = {
    "DIFT": (40, 18, 20, 38, 26, 33, 38, 26, 29, 24, 35, 50, 62),
    "4DRL": (42, 22, 23, 46, 31, 40, 52, 29, 24, 27, 37, 46, 64),
}
_PUBLISHED_SKIPPED = 37

PUBLISHED: dict[str, dict[str, Any]] = {
    model: summary_from_counts(correct, _PUBLISHED_TOTALS, correct=sum(correct),
                               eval_count=sum(_PUBLISHED_TOTALS), skipped=_PUBLISHED_SKIPPED)
    for model, correct in _PUBLISHED_CORRECT.items()
}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def comparison_table(summary: Mapping[str, Any], name: str = "ours",
                     published: Mapping[str, Mapping[str, Any]] = PUBLISHED) -> str:
    """A Markdown table of accuracies in percent: `summary` next to the published runs."""
    return models_table({name: summary}, published)


def models_table(summaries: Mapping[str, Mapping[str, Any]],
                 published: Mapping[str, Mapping[str, Any]] = PUBLISHED) -> str:
    """A Markdown table of accuracies in percent, one row per model (the published runs first), in
    the paper's column order."""
    header = ["model", "n", "Overall", *COLUMNS_ORDER]
    rows = [header, ["---"] * len(header)]
    for label, s in [*published.items(), *summaries.items()]:
        subtasks = [_percent(s["subtask_accuracy"][c]) for c in SUBTASKS.values()]
        rows.append([label, str(s["eval_count"]), _percent(s["accuracy"]), *subtasks,
                     _percent(s["subtask_macro_avg"])])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
