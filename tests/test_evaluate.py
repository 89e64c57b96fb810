"""The evaluate stage end to end on the synthetic world's DSR benchmark, with broken rows mixed in.

One Ray and one world for the module. Stand-in engines (no model) check scoring, outputs, decoding
once per video and resume; one test runs the tiny model through vLLM with latent decoding and
compares it with the HF reference decoding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fourdthinker.config import from_dict
from fourdthinker.data.synth import SynthConfig, build_world
from fourdthinker.dsr import COLUMNS_ORDER, PUBLISHED, SUBTASKS, DsrItem, item_prompt, score
from fourdthinker.eval_config import EvaluateConfig, parse_model
from fourdthinker.eval_report import plot_comparison, rebuild_report
from fourdthinker.evaluation import SHARDS_DIR, Benchmark, decode_video_row, model_records, sample_key
from fourdthinker.rewards import extract_choice

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BROKEN = {"ghost": "video missing", "corrupt": "video undecodable", "badopts": "not a list literal"}


def _pipeline():
    spec = importlib.util.spec_from_file_location("evaluate_pipeline", REPO / "pipelines" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic benchmark (options as string literals, as some DSR files carry them) plus a row
    whose video is missing, one whose video is corrupt and one whose options are not a list."""
    root = tmp_path_factory.mktemp("evaluate") / "world"
    build_world(root, SynthConfig(videos=2, seed=0, width=112, height=84, seconds=4, fps=5))
    table = pd.read_parquet(root / "dsr" / "benchmark.parquet")
    table["options"] = [str(list(options)) for options in table["options"]]
    good = table.iloc[0].to_dict()
    videos = root / "dsr" / "videos"
    corrupt = (videos / f"{good['videoID']}.mp4").read_bytes()[:300]
    (videos / "corrupt.mp4").write_bytes(corrupt)
    extra = [{**good, "videoID": "ghost"}, {**good, "videoID": "corrupt"},
             {**good, "videoID": good["videoID"], "options": "A. left, B. right"}]
    pd.concat([table, pd.DataFrame(extra)], ignore_index=True).to_parquet(root / "dsr" / "bench.parquet")
    return root


def _cfg(world, out, **kw) -> EvaluateConfig:
    data = __import__("yaml").safe_load((REPO / "configs" / "tiny" / "evaluate.yaml").read_text())
    data.update(benchmark=str(world / "dsr" / "bench.parquet"), output_dir=str(out), **kw)
    return from_dict(EvaluateConfig, data)


@pytest.fixture(scope="module")
def two_models(ray_local, world, tmp_path_factory):
    """One job, two checkpoints (stand-ins answering the gold letter)."""
    out = tmp_path_factory.mktemp("two") / "run"
    cfg = _cfg(world, out, engine="oracle", models=["a=/ckpt/a", "/ckpt/b"], batch_size=4)
    return cfg, _pipeline().run(cfg)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_checkpoints_give_two_summaries_and_one_table(two_models):
    cfg, info = two_models
    out = Path(cfg.output_dir)
    assert sorted(info["summaries"]) == ["a", "b"]
    for name in ("a", "b"):
        assert json.loads((out / name / "dsr_eval_summary.json").read_text()) == info["summaries"][name]
    rows = (out / "comparison.md").read_text().splitlines()
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| DIFT", "| 4DRL", "| a", "| b"]
    assert rows[0].split(" | ")[3:] == [*COLUMNS_ORDER[:-1], "Avg |"]
    assert rows[2].split(" | ")[2] == "31.07" and rows[3].split(" | ")[2] == "34.18"


def test_summary_fields_are_consistent_and_the_oracle_scores_every_evaluated_question(two_models, world):
    cfg, info = two_models
    bench = pd.read_parquet(world / "dsr" / "benchmark.parquet")
    summary = info["summaries"]["a"]
    assert summary["total"] == len(bench) + len(BROKEN)
    assert summary["eval_count"] == len(bench) and summary["skipped"] == len(BROKEN)
    assert summary["correct"] == sum(summary["subtask_correct"].values()) == len(bench)
    assert sum(summary["subtask_total"].values()) == summary["eval_count"]
    expected_totals = bench["type"].map(SUBTASKS).value_counts().to_dict()
    assert {k: v for k, v in summary["subtask_total"].items() if v} == expected_totals
    present = [v for v in summary["subtask_accuracy"].values() if v is not None]
    assert summary["subtask_macro_avg"] == pytest.approx(np.mean(present)) == 1.0
    assert summary["subtask_columns_order"] == list(COLUMNS_ORDER)
    assert set(summary) == set(PUBLISHED["DIFT"])
    lines = _lines(Path(cfg.output_dir) / "a" / "dsr_eval.jsonl")
    assert [line["index"] for line in lines] == list(range(len(bench)))
    assert all(line["pred"] == line["gt"] == bench["answer"][line["index"]] for line in lines)
    assert lines[0]["options"] == list(bench["options"][0]) and lines[0]["error"] is None


def test_each_video_is_decoded_once_for_both_models(two_models):
    cfg, info = two_models
    # the two good videos and the corrupt one were needed; the missing one never reached the decoder
    assert info["videos_decoded"] == 3
    decodes = {}
    for name in ("a", "b"):
        for shard in (Path(cfg.output_dir) / name / SHARDS_DIR).glob("*.jsonl"):
            for record in _lines(shard):
                decodes.setdefault(record["video_id"], set()).add(record["decode_id"])
    assert len(decodes) == 2 and all(len(ids) == 1 for ids in decodes.values()), decodes
    assert info["models"]["a"]["decode_ids"] == info["models"]["b"]["decode_ids"]


def test_missing_corrupt_and_unparsable_rows_are_skipped_with_their_reason(two_models, world):
    cfg, _ = two_models
    skipped = _lines(Path(cfg.output_dir) / "b" / "dsr_eval_skipped.jsonl")
    first = len(pd.read_parquet(world / "dsr" / "benchmark.parquet"))
    assert [s["index"] for s in skipped] == [first, first + 1, first + 2]
    for entry, (video, reason) in zip(skipped, BROKEN.items()):
        assert reason in entry["reason"], entry
    assert skipped[0]["video_path"].endswith("ghost.mp4")


def test_the_chart_has_one_bar_group_per_subtask_and_eval_report_rebuilds_it(two_models, tmp_path):
    cfg, info = two_models
    chart = Path(cfg.output_dir) / "comparison.png"
    data = chart.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    drawn = plot_comparison(info["summaries"], tmp_path / "c.png")
    assert drawn["groups"] == list(COLUMNS_ORDER)
    assert drawn["models"] == ["a", "b"] and drawn["bars_per_group"] == [len(COLUMNS_ORDER)] * 2
    table, table_path, chart_path = rebuild_report([cfg.output_dir], tmp_path / "report")
    assert table_path.read_text() == (Path(cfg.output_dir) / "comparison.md").read_text()
    assert chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from fourdthinker.cli import main

    assert main(["eval-report", str(tmp_path / "nothing-here")]) == 2


def _answered(cfg, world, engine: str) -> list:
    """Questions of a hand-made answer table answered by a stand-in through the stage's actor class
    (no Ray), then scored as the stage scores them."""
    from fourdthinker.actors.evaluator import AnswerQuestions

    cfg = _cfg(world, cfg.output_dir + "-" + engine.replace(":", "_"), engine=engine, models=["m=/ckpt/m"],
               limit=0)
    bench = Benchmark(cfg)
    bench.items = [DsrItem(i, "clip_0000", f"Q{i}?", ("A. a", "B. b", "C. c", "D. d"), gold, "abs_dis")
                   for i, gold in enumerate("ABCCAB")]
    bench.keys, bench.skip_reasons = [sample_key(item) for item in bench.items], {}
    rows = [{**bench.sample_row(k, item), "decode_id": "x", "frames": b"", "frames_shape": [0]}
            for k, item in bench.evaluable()]
    actor = AnswerQuestions(cfg, cfg.model_specs()[0])
    out = actor({c: np.array([r[c] for r in rows], dtype=object) for c in rows[0]})
    assert out["key"] == [r["key"] for r in rows]
    from fourdthinker.evaluation import finished_records

    records = model_records(bench, finished_records(cfg.output_dir, cfg.model_specs()[0], engine), {})
    return records


def test_scores_against_a_hand_made_answer_table(two_models, world):
    cfg, _ = two_models
    assert score(_answered(cfg, world, "oracle"))["accuracy"] == 1.0
    assert score(_answered(cfg, world, "constant:D"))["accuracy"] == 0.0  # D is no gold answer
    # no <answer>: the DSR rule takes the first capital A-D anywhere, here the B of "Based"
    reply = "Based on the motion it is option C"
    records = _answered(cfg, world, "reply:" + reply)
    assert extract_choice(reply) == "B"
    assert [r.pred for r in records] == ["B"] * 6 and [r.raw for r in records] == [reply] * 6
    assert score(records)["correct"] == 2  # the two questions whose gold is B


def test_a_killed_run_resumes_without_generating_finished_questions_again(ray_local, two_models, world, tmp_path):
    clean_cfg, clean = two_models
    out = tmp_path / "resumed"
    overrides = [f"benchmark={world / 'dsr' / 'bench.parquet'}", f"output_dir={out}", "engine=oracle",
                 "batch_size=2", "stand_in_delay_s=0.4"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--config",
                             str(REPO / "configs" / "tiny" / "evaluate.yaml"), "--model", "a=/ckpt/a", *overrides],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = out / "a" / SHARDS_DIR
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and len(list(shards.glob("*.jsonl"))) < 2 and proc.poll() is None:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = sum(len(_lines(p)) for p in shards.glob("*.jsonl"))
    total = clean["summaries"]["a"]["eval_count"]
    assert 0 < before < total, "the run was not killed mid-way"
    assert not (out / "a" / "dsr_eval_summary.json").exists()

    cfg = _cfg(world, out, engine="oracle", models=["a=/ckpt/a"], batch_size=2)
    info = _pipeline().run(cfg)
    assert info["models"]["a"]["answered_this_run"] == total - before
    assert sum(len(_lines(p)) for p in shards.glob("*.jsonl")) == total  # nothing generated twice
    assert info["summaries"]["a"] == clean["summaries"]["a"]
    clean_lines = (Path(clean_cfg.output_dir) / "a" / "dsr_eval.jsonl").read_text()
    assert (out / "a" / "dsr_eval.jsonl").read_text() == clean_lines


def test_model_names_come_from_the_dir_or_name_equals_path():
    assert parse_model("/ckpt/run-7/final") == parse_model("final=/ckpt/run-7/final")
    assert parse_model("/ckpt/run-7/final/").name == "final"
    assert parse_model("dift=/x/y").name == "dift"
    with pytest.raises(Exception, match="names the model's results directory"):
        parse_model("a b=/x")


def test_the_tiny_model_through_vllm_with_latent_decoding_matches_the_hf_reference(ray_local, world, tmp_path,
                                                                                     tiny_model_dir):
    """The stage's vLLM actor on the real engine, a latent block forced at steps 2 and 9 (a random
    model rarely starts one): outputs recorded with latent markers, and the same text, tokens and
    letters as the HF reference decoding of the same frames."""
    from fourdthinker.eval_engines import HFAnswerer
    from fourdthinker.generation import SamplingConfig

    cfg = _cfg(world, tmp_path / "vllm", engine="vllm", models=[f"tiny={tiny_model_dir}"], limit=3,
               max_new_tokens=20, force_latent_steps=[2, 9], max_model_len=2048)
    info = _pipeline().run(cfg)
    assert info["models"]["tiny"]["answered_this_run"] == 3
    shard = {r["key"]: r for p in (tmp_path / "vllm" / "tiny" / SHARDS_DIR).glob("*.jsonl") for r in _lines(p)}
    lines = _lines(tmp_path / "vllm" / "tiny" / "dsr_eval.jsonl")
    hf = HFAnswerer(tiny_model_dir, SamplingConfig(max_tokens=20, temperature=0.0), force_latent_steps=[2, 9])
    bench = Benchmark(cfg)
    for key, item in bench.evaluable():
        row = decode_video_row({"video_path": bench.sample_row(key, item)["video_path"]}, cfg.max_frames,
                               cfg.max_pixels)
        ref = hf.answer([{"prompt": item_prompt(item), **row}])[0]
        got = shard[key]
        assert got["error"] is None and got["num_latent_blocks"] == ref.num_latent_blocks == 2
        assert got["text"] == ref.text and got["raw"] == ref.marked
        assert "⟨latent 1⟩" in got["raw"] and "⟨latent 2⟩" in got["raw"] and "<|latent_pad|>" not in got["raw"]
        line = next(line for line in lines if line["index"] == item.index)
        assert line["raw"] == got["raw"] and line["pred"] == extract_choice(ref.text)
    shutil.rmtree(tmp_path / "vllm", ignore_errors=True)
