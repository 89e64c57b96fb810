"""Video index (buckets, filters, resume, missing files), frame decode and its bad inputs, outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fourdthinker.config import ConfigError, from_dict
from fourdthinker.data.synth import SynthConfig, build_world
from fourdthinker.errors import UsageError
from fourdthinker.preprocess.config import PreprocessConfig
from fourdthinker.preprocess.frames import extract_frames
from fourdthinker.preprocess.index import STATUS_DROPPED, STATUS_OK, bucket_of, build_index
from fourdthinker.preprocess.manifest import dift_format_error, summarize, write_clip_result, write_outputs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("index") / "world"
    build_world(root, SynthConfig(videos=3, seed=0, width=112, height=84, seconds=4, fps=5))
    return root


def _cfg(world, out, **kw) -> PreprocessConfig:
    return from_dict(PreprocessConfig, {"input_root": str(world), "output_dir": str(out), "fps": 2.5,
                                        "max_pixels": 112 * 112, "concepts": ["red box"], **kw})


def _add_row(world, **values):
    csv = world / "SpatialVID_metadata.csv"
    table = pd.read_csv(csv)
    row = {**table.iloc[0].to_dict(), **values}
    pd.concat([table, pd.DataFrame([row])], ignore_index=True).to_csv(csv, index=False)


def test_bucket_edges_are_upper_exclusive():
    assert bucket_of(4.9, 100, [5.0, 10.0], [1000]) == "d0_r0"
    assert bucket_of(5.0, 1000, [5.0, 10.0], [1000]) == "d1_r1"
    assert bucket_of(float("nan"), 10, [5.0], [1000]) == "d1_r0"


def test_index_rows_are_bucketed_filtered_and_resumable(world, tmp_path):
    rows, counts = build_index(_cfg(world, tmp_path / "out", duration_edges_s=[2.0, 8.0]))
    assert [r["clip_id"] for r in rows] == ["clip_0000", "clip_0001", "clip_0002"]
    assert {r["bucket"] for r in rows} == {"d1_r0"} and all(r["status"] == STATUS_OK for r in rows)
    assert counts == {"listed": 3, "filtered": 0, "finished": 0}

    rows, counts = build_index(_cfg(world, tmp_path / "out", max_duration_s=3.0))
    assert rows == [] and counts["filtered"] == 3
    rows, counts = build_index(_cfg(world, tmp_path / "out", groups=["group_9999"]))
    assert rows == [] and counts["filtered"] == 3

    write_clip_result(tmp_path / "out", {"clip_id": "clip_0001", "status": STATUS_OK, "reason": ""})
    rows, counts = build_index(_cfg(world, tmp_path / "out"))
    assert [r["clip_id"] for r in rows] == ["clip_0000", "clip_0002"] and counts["finished"] == 1


def test_missing_video_or_annotations_are_dropped_with_a_reason(tmp_path, world):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    _add_row(copy, **{"video path": "videos/group_0000/ghost.mp4"})
    shutil.rmtree(copy / "annotations" / "group_0000" / "clip_0002")
    rows = {r["clip_id"]: r for r in build_index(_cfg(copy, tmp_path / "out"))[0]}
    assert rows["ghost"]["status"] == STATUS_DROPPED and rows["ghost"]["reason"].startswith("video missing")
    assert rows["clip_0002"]["reason"].startswith("annotations missing")
    assert rows["clip_0000"]["status"] == STATUS_OK


def test_a_root_without_metadata_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="SpatialVID_metadata.csv"):
        build_index(_cfg(tmp_path, tmp_path / "out"))


def test_unknown_config_keys_and_bad_values_fail_at_load(world):
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(PreprocessConfig, {"input_root": str(world), "fsp": 2})
    with pytest.raises(ConfigError, match="min_frames"):
        from_dict(PreprocessConfig, {"input_root": str(world), "min_frames": 9, "max_frames": 4})
    with pytest.raises(ConfigError, match="GPU"):
        from_dict(PreprocessConfig, {"input_root": str(world), "segmenter": {"num_gpus_per_actor": 0}})


def _row(world, tmp_path, **overrides):
    rows, _ = build_index(_cfg(world, tmp_path / "out"))
    return {**rows[0], **overrides}


def test_frames_are_written_once_at_the_configured_fps(world, tmp_path):
    cfg = _cfg(world, tmp_path / "out", max_frames=6)
    row = extract_frames(_row(world, tmp_path), cfg)
    assert row["status"] == STATUS_OK
    # 4 s at 2.5 fps = 10 samples, spread evenly down to 6; times are the samples' instants.
    expected = np.linspace(0, 9, 6).astype(int) / 2.5
    np.testing.assert_allclose(row["frame_times"], expected)
    assert len(row["frame_paths"]) == 6 and row["frame_width"] % 28 == 0 and row["frame_height"] % 28 == 0
    mtimes = [p.stat().st_mtime_ns for p in map(Path, row["frame_paths"])]
    again = extract_frames(_row(world, tmp_path), cfg)
    assert again["frame_paths"] == row["frame_paths"]
    assert [p.stat().st_mtime_ns for p in map(Path, again["frame_paths"])] == mtimes


@pytest.mark.parametrize("damage, reason", [
    ("empty", "unreadable video"), ("garbage", "unreadable video"), ("truncate", "video"),
    ("fps", "fps mismatch"), ("short", "too short"),
])
def test_bad_videos_are_dropped_with_a_reason(world, tmp_path, damage, reason):
    video = tmp_path / "clip.mp4"
    source = world / "videos" / "group_0000" / "clip_0000.mp4"
    data = source.read_bytes()
    overrides = {"video_path": str(video)}
    if damage == "empty":
        video.write_bytes(b"")
    elif damage == "garbage":
        video.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    elif damage == "truncate":
        video.write_bytes(data[: len(data) // 3])
    else:
        video.write_bytes(data)
        overrides.update({"csv_fps": 30.0} if damage == "fps" else {})
    cfg = _cfg(world, tmp_path / "out", min_frames=12 if damage == "short" else 4)
    row = extract_frames(_row(world, tmp_path, **overrides), cfg)
    assert row["status"] == STATUS_DROPPED and reason in row["reason"], row["reason"]
    assert row["frame_paths"] == []


def test_dift_format_check_counts_placeholders_and_structure():
    good = {"id": "x", "text_input": "Q?\n\nA. a", "image_input": ["f.jpg"], "image_output": ["o.jpg"],
            "text_output": "<think>see <output_image></think>\n<answer>A. a</answer>"}
    assert dift_format_error(good) is None
    assert "placeholders" in dift_format_error({**good, "image_output": []})
    assert "<think>" in dift_format_error({**good, "text_output": "<output_image> <answer>A</answer>"})


def test_outputs_are_rebuilt_from_clip_results(tmp_path):
    sample = {"id": "c0_s", "kind": "camera",
              "dift": {"id": "c0_s", "text_input": "Q", "text_output": "<think></think><answer>A</answer>",
                       "image_input": ["f"], "image_output": []},
              "rl": {"Question": "Q", "A": "a", "B": "b", "C": "c", "D": "d", "Correct": "A", "frame_paths": ["f"]}}
    write_clip_result(tmp_path, {"clip_id": "c0", "status": "ok", "reason": "", "samples": [sample],
                                 "objects": [{"direction": "Moving Left", "speed": "Speeding Up", "distance": None}],
                                 "camera_segments": [[0, 3, ["Pan Left"]]], "drops": ["question dropped: x"]})
    write_clip_result(tmp_path, {"clip_id": "c1", "status": "dropped", "reason": "fps mismatch: 30 vs 5"})
    summary = write_outputs(tmp_path)
    assert [json.loads(line) for line in (tmp_path / "dift.jsonl").read_text().splitlines()] == [sample["dift"]]
    assert [json.loads(line) for line in (tmp_path / "rl.jsonl").read_text().splitlines()] == [sample["rl"]]
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert manifest[["clip_id", "status"]].values.tolist() == [["c0", "ok"], ["c0", "dropped"], ["c1", "dropped"]]
    assert summary == summarize([json.loads(p.read_text()) for p in sorted((tmp_path / "clips").glob("*.json"))])
    assert summary["drops_per_reason"] == {"fps mismatch": 1, "question dropped": 1}
    assert summary["camera_labels"] == {"Pan Left": 1} and summary["object_directions"] == {"Moving Left": 1}
