"""DSR benchmark: reading (incl. untrusted option strings), prompts, skips, scoring, results files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fourdthinker.dsr import (
    COLUMNS_ORDER,
    PUBLISHED,
    SUBTASKS,
    DsrItem,
    DsrRecord,
    comparison_table,
    item_prompt,
    parse_options,
    partition_available,
    read_benchmark,
    score,
    video_path,
    write_results,
)
from fourdthinker.errors import UsageError
from fourdthinker.prompts import PROMPT_SUFFIX

OPTIONS = ["A. left", "B. right", "C. up", "D. down"]


def _item(index: int, subtask_type: str, answer: str = "A", video_id: str | None = None) -> DsrItem:
    return DsrItem(index=index, video_id=video_id or f"vid{index}", question=f"Q{index}?",
                   options=tuple(OPTIONS), answer=answer, subtask_type=subtask_type)


def test_subtask_columns_follow_the_published_order():
    assert list(SUBTASKS) == ["abs_dis", "abs_dir", "abs_ori", "abs_spd", "abs_spd_comp", "abs_dir_pred",
                              "rel_dis", "rel_dir", "rel_ori", "rel_spd", "rel_spd_comp", "rel_dir_pred",
                              "non_temp"]
    assert COLUMNS_ORDER[-1] == "Avg" and COLUMNS_ORDER[:-1] == tuple(SUBTASKS.values())
    assert SUBTASKS["non_temp"] == "Non-Temp Based" and SUBTASKS["abs_spd_comp"] == "Abs Spd Comp"


def test_read_parquet_normalises_answer_and_type(tmp_path):
    path = tmp_path / "benchmark.parquet"
    pq.write_table(pa.table({
        "videoID": ["v1", "v2"],
        "question": ["Where does the car go?", "Is it faster?"],
        "options": [OPTIONS, OPTIONS[:2]],
        "answer": [" b ", "A. left"],
        "type": [" ABS_DIR ", "rel_spd"],
    }), path)
    items = read_benchmark(path)
    assert items == [
        DsrItem(0, "v1", "Where does the car go?", tuple(OPTIONS), "B", "abs_dir"),
        DsrItem(1, "v2", "Is it faster?", tuple(OPTIONS[:2]), "A", "rel_spd"),
    ]
    assert items[0].subtask_column == "Abs Dir"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_read_json_uses_fallback_columns_and_parses_option_strings(tmp_path, suffix):
    rows = [
        {"video": "v7", "question": "Q?", "candidates": repr(OPTIONS), "answer": "d", "type": "mystery"},
        {"videoID": "v8", "video": "ignored", "question": "Q2?", "options": OPTIONS, "answer": "C"},
    ]
    path = tmp_path / f"bench{suffix}"
    path.write_text(json.dumps(rows) if suffix == ".json" else "\n".join(map(json.dumps, rows)) + "\n")
    items = read_benchmark(path)
    assert [(i.index, i.video_id, i.options, i.answer, i.subtask_type) for i in items] == [
        (0, "v7", tuple(OPTIONS), "D", "mystery"),
        (1, "v8", tuple(OPTIONS), "C", ""),
    ]
    assert items[0].subtask_column is None


def test_parse_options_accepts_lists_arrays_and_list_literals():
    expected = tuple(OPTIONS)
    assert parse_options(OPTIONS, "row") == expected
    assert parse_options(np.array(OPTIONS, dtype=object), "row") == expected
    assert parse_options(np.array(OPTIONS), "row") == expected
    assert parse_options(str(OPTIONS), "row") == expected
    assert parse_options(str(tuple(OPTIONS)), "row") == expected


@pytest.mark.parametrize("bad", [
    "__import__('os').system('touch PWNED')",
    "[__import__('os').getcwd()]",
    "{'A': 'left'}",
    "'A. left'",
    "[1, 2]",
    "[]",
    "not python at all [",
])
def test_option_strings_that_are_not_a_list_of_strings_are_rejected(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({"videoID": "v", "question": "Q", "options": OPTIONS, "answer": "A"}) + "\n"
                    + json.dumps({"videoID": "v", "question": "Q", "options": bad, "answer": "A"}) + "\n")
    with pytest.raises(UsageError, match=r"bench\.jsonl row 1: .*options"):
        read_benchmark(path)
    assert not (tmp_path / "PWNED").exists()


def test_bad_benchmark_files_name_the_problem(tmp_path):
    with pytest.raises(UsageError, match="unsupported file type '.csv'"):
        read_benchmark(tmp_path / "bench.csv")
    with pytest.raises(UsageError, match="no such file"):
        read_benchmark(tmp_path / "absent.parquet")
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([{"videoID": "v", "options": OPTIONS, "answer": " "}]))
    with pytest.raises(UsageError, match=r"row 0: missing question, answer"):
        read_benchmark(path)
    path.write_text(json.dumps({"videoID": ["v"]}))
    with pytest.raises(UsageError, match="list of row objects"):
        read_benchmark(path)


def test_item_prompt_is_question_blank_line_options_and_suffix():
    item = _item(0, "abs_dis")
    assert item_prompt(item) == "Q0?\n\nA. left\nB. right\nC. up\nD. down" + PROMPT_SUFFIX


def test_missing_videos_are_skipped(tmp_path):
    items = [_item(0, "abs_dis"), _item(1, "abs_dis"), _item(2, "rel_dir")]
    (tmp_path / "vid0.mp4").write_bytes(b"x")
    (tmp_path / "vid2.mp4").write_bytes(b"x")
    (tmp_path / "vid1.mp4").mkdir()  # a directory is not a video
    assert video_path(items[1], tmp_path) == tmp_path / "vid1.mp4"
    available, skipped = partition_available(items, tmp_path)
    assert [i.index for i in available] == [0, 2]
    assert [i.index for i in skipped] == [1]


def _hand_built_records() -> list[DsrRecord]:
    rows = [
        # (type, gold, model output)
        ("abs_dis", "A", "<answer>A</answer>"),
        ("abs_dis", "B", "<think>far</think><answer>B. farther</answer>"),
        ("rel_dir", "C", "<answer>C</answer>"),
        ("rel_dir", "C", "<answer>D</answer>"),
        ("rel_dir", "A", "no idea"),
        ("rel_dir", "D", "CUDA out of memory"),  # an inference error scores as wrong
        ("mystery", "B", "<answer>B</answer>"),  # unknown sub-task: overall only
    ]
    records = [DsrRecord.from_output(_item(i, t, gold), f"/v/vid{i}.mp4", raw)
               for i, (t, gold, raw) in enumerate(rows)]
    records += [DsrRecord.skip(_item(7, "abs_dis"), "/v/vid7.mp4"),
                DsrRecord.skip(_item(8, "non_temp"), "/v/vid8.mp4")]
    return records


def test_score_is_micro_overall_and_macro_over_subtasks_with_questions():
    records = _hand_built_records()
    assert [r.pred for r in records[:7]] == ["A", "B", "C", "D", "", "C", "B"]
    summary = score(records)
    columns = list(SUBTASKS.values())
    assert summary == {
        "total": 9,
        "eval_count": 7,
        "skipped": 2,
        "correct": 4,
        "accuracy": 4 / 7,
        "subtask_accuracy": {c: {"Abs Dis": 1.0, "Rel Dir": 0.25}.get(c) for c in columns},
        "subtask_correct": {c: {"Abs Dis": 2, "Rel Dir": 1}.get(c, 0) for c in columns},
        "subtask_total": {c: {"Abs Dis": 2, "Rel Dir": 4}.get(c, 0) for c in columns},
        "subtask_macro_avg": (1.0 + 0.25) / 2,  # micro 4/7 differs from macro 0.625
        "subtask_columns_order": list(COLUMNS_ORDER),
    }
    assert list(summary["subtask_accuracy"]) == columns


def test_score_of_nothing_evaluated_has_no_accuracies():
    summary = score([DsrRecord.skip(_item(0, "abs_dis"), "/v/vid0.mp4")])
    assert (summary["total"], summary["eval_count"], summary["skipped"]) == (1, 0, 1)
    assert summary["accuracy"] is None and summary["subtask_macro_avg"] is None
    assert set(summary["subtask_accuracy"].values()) == {None}


# The published table as printed (REFERENCE.md), in percent: overall, Avg, then the 13 columns.
PUBLISHED_TABLE = {
    "DIFT": [31.07, 32.04, 48.19, 28.13, 25.32, 46.91, 28.57, 28.70, 35.85, 29.89, 37.18, 24.74, 25.36,
             31.06, 26.61],
    "4DRL": [34.18, 35.66, 50.60, 34.38, 29.11, 56.79, 34.07, 34.78, 49.06, 33.33, 30.77, 27.84, 26.81,
             28.57, 27.47],
}


@pytest.mark.parametrize("model", ["DIFT", "4DRL"])
def test_published_counts_reproduce_the_published_percentages(model):
    summary = PUBLISHED[model]
    ours = [summary["accuracy"], summary["subtask_macro_avg"],
            *(summary["subtask_accuracy"][c] for c in SUBTASKS.values())]
    # 0.006: the table rounds half up (18/64 = 28.125 -> 28.13)
    np.testing.assert_allclose(100 * np.array(ours), PUBLISHED_TABLE[model], atol=0.006)
    assert (summary["total"], summary["eval_count"], summary["skipped"]) == (1450, 1413, 37)


@pytest.mark.parametrize("model", ["DIFT", "4DRL"])
def test_scoring_records_with_the_published_counts_gives_the_published_summary(model):
    published = PUBLISHED[model]
    records, index = [], 0
    for key, column in SUBTASKS.items():
        for k in range(published["subtask_total"][column]):
            raw = "<answer>A</answer>" if k < published["subtask_correct"][column] else "<answer>B</answer>"
            records.append(DsrRecord.from_output(_item(index, key, "A"), "v.mp4", raw))
            index += 1
    records += [DsrRecord.skip(_item(index + i, "abs_dis"), "v.mp4") for i in range(published["skipped"])]
    assert score(records) == published


def test_write_results_round_trips(tmp_path):
    records = _hand_built_records()
    summary = score(records)
    samples_path, summary_path = write_results(records, summary, tmp_path / "results", "dsr_eval_x")
    assert samples_path == tmp_path / "results" / "dsr_eval_x.jsonl"
    assert summary_path == tmp_path / "results" / "dsr_eval_x_summary.json"
    assert json.loads(summary_path.read_text()) == summary
    lines = [json.loads(line) for line in samples_path.read_text().splitlines()]
    assert len(lines) == 7  # skipped questions have no sample line
    assert set(lines[1]) == {"index", "video_id", "video_path", "question", "options", "gt", "pred", "answer",
                             "raw", "hit", "subtask_type", "error"}
    assert lines[1] == {
        "index": 1, "video_id": "vid1", "video_path": "/v/vid1.mp4", "question": item_prompt(records[1].item),
        "options": list(records[1].item.options), "gt": "B", "pred": "B", "answer": "B", "raw": "<think>far</think><answer>B. farther</answer>",
        "hit": 1, "subtask_type": "abs_dis", "error": None,
    }
    assert [line["hit"] for line in lines] == [1, 1, 1, 0, 0, 0, 1]
    # Written via temp files renamed into place: nothing else is left behind.
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "dsr_eval_x.jsonl", "dsr_eval_x_skipped.jsonl", "dsr_eval_x_summary.json"]
    skipped = [json.loads(line) for line in (tmp_path / "results" / "dsr_eval_x_skipped.jsonl").read_text().splitlines()]
    assert [(s["index"], s["video_id"]) for s in skipped] == [(7, "vid7"), (8, "vid8")]


def test_comparison_table_shows_ours_next_to_published_in_percent():
    table = comparison_table(score(_hand_built_records()), name="tiny")
    lines = table.splitlines()
    assert lines[0].split(" | ")[-1] == "Avg |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| DIFT", "| 4DRL", "| tiny"]
    tiny = [cell.strip() for cell in lines[-1].strip("| ").split(" | ")]
    assert tiny[:5] == ["tiny", "7", f"{400 / 7:.2f}", "100.00", "-"]
    assert tiny[-1] == "62.50"
