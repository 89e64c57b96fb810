"""The preprocess Ray Data job end to end on a synthetic world with broken clips mixed in."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fourdthinker.config import from_dict
from fourdthinker.data.synth import SynthConfig, build_world
from fourdthinker.preprocess.config import PreprocessConfig
from fourdthinker.preprocess.manifest import CLIPS_DIR, dift_format_error
from fourdthinker.preprocess.qa import validate_text_output
from fourdthinker.tokens import OUTPUT_IMAGE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
GOOD = ["clip_0000", "clip_0001", "clip_0002", "clip_0003"]
# Broken rows and the reason category each must be dropped with.
BROKEN = {"ghost": "video missing", "corrupt": "unreadable video", "wrongfps": "fps mismatch",
          "fewposes": "camera poses unusable", "noannot": "annotations missing"}


def _pipeline():
    spec = importlib.util.spec_from_file_location("preprocess_pipeline", REPO / "pipelines" / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "world"
    build_world(root, SynthConfig(videos=4, seed=0, width=112, height=84, seconds=4, fps=5))
    table = pd.read_csv(root / "SpatialVID_metadata.csv")
    template = table.iloc[0].to_dict()
    source_video = root / "videos" / "group_0000" / "clip_0000.mp4"
    source_annotations = root / "annotations" / "group_0000" / "clip_0000"
    extra = []
    for clip_id in BROKEN:
        video = root / "videos" / "group_0000" / f"{clip_id}.mp4"
        annotations = root / "annotations" / "group_0000" / clip_id
        row = {**template, "id": clip_id, "video path": f"videos/group_0000/{clip_id}.mp4"}
        if clip_id != "ghost":
            shutil.copyfile(source_video, video)
        if clip_id not in ("ghost", "noannot"):
            shutil.copytree(source_annotations, annotations)
            shutil.copytree(root / "ground_truth" / "clip_0000", root / "ground_truth" / clip_id)
        if clip_id == "corrupt":
            video.write_bytes(video.read_bytes()[:200])
        if clip_id == "wrongfps":
            row["fps"] = 30
        if clip_id == "fewposes":
            for name, width in (("poses.npy", 7), ("intrinsics.npy", 4)):
                np.save(annotations / name, np.load(annotations / name)[:2].reshape(-1, width))
            (annotations / "indexes.txt").write_text("0 0\n1 1\n")
            (annotations / "instructions.json").unlink()
        extra.append(row)
    pd.concat([table, pd.DataFrame(extra)], ignore_index=True).to_csv(root / "SpatialVID_metadata.csv", index=False)
    return root


def _cfg(world, out, **kw) -> PreprocessConfig:
    data = __import__("yaml").safe_load((REPO / "configs" / "tiny" / "preprocess.yaml").read_text())
    data.update(input_root=str(world), output_dir=str(out), **kw)
    return from_dict(PreprocessConfig, data)


def _outputs(out: Path) -> dict:
    prefix = str(out)
    text = {name: (out / name).read_text().replace(prefix, "<out>") for name in ("dift.jsonl", "rl.jsonl")}
    manifest = pd.read_parquet(out / "manifest.parquet")
    for column in ("frames_dir", "image_output"):
        manifest[column] = manifest[column].str.replace(prefix, "<out>", regex=False)
    return {**text, "manifest": manifest.to_dict("records")}


@pytest.fixture(scope="module")
def fresh_run(ray_local, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh") / "out"
    summary = _pipeline().run(_cfg(world, out))
    return out, summary


def test_every_sample_passes_the_reference_format_check(fresh_run):
    out, summary = fresh_run
    dift = [json.loads(line) for line in (out / "dift.jsonl").read_text().splitlines()]
    rl = [json.loads(line) for line in (out / "rl.jsonl").read_text().splitlines()]
    assert len(dift) == len(rl) == summary["samples"] > 0
    for record, rl_record in zip(dift, rl):
        assert dift_format_error(record) is None
        assert record["text_output"].count(OUTPUT_IMAGE) == len(record["image_output"])
        answer = rl_record["Correct"]
        assert validate_text_output(record["text_output"], len(record["image_output"]),
                                    f"{answer}. {rl_record[answer]}") is None
        assert all(Path(p).is_file() for p in record["image_input"] + record["image_output"])


def test_broken_clips_are_dropped_with_their_reason_and_good_clips_finish(fresh_run):
    out, summary = fresh_run
    manifest = pd.read_parquet(out / "manifest.parquet")
    per_clip = manifest.groupby("clip_id")
    for clip_id, reason in BROKEN.items():
        rows = per_clip.get_group(clip_id)
        assert (rows["status"] == "dropped").all() and rows["reason"].str.startswith(reason).all(), rows["reason"].tolist()
    assert summary["clips"] == len(GOOD) + len(BROKEN) and summary["clips_ok"] == len(GOOD)
    assert set(manifest.loc[manifest["status"] == "ok", "clip_id"]) == set(GOOD)
    assert summary["drops_per_reason"].keys() >= set(BROKEN.values())


def test_a_killed_run_resumes_without_redoing_finished_clips(fresh_run, world, tmp_path):
    fresh_out, _ = fresh_run
    out = tmp_path / "out"
    pipeline = _pipeline()
    pipeline.run(_cfg(world, out, max_clips=4))  # the "killed" run: only the first clips finished
    first = {p.name: p.stat().st_mtime_ns for p in (out / CLIPS_DIR).glob("*.json")}
    assert len(first) == 4
    pipeline.run(_cfg(world, out))
    after = {p.name: p.stat().st_mtime_ns for p in (out / CLIPS_DIR).glob("*.json")}
    assert {name: after[name] for name in first} == first  # finished clips were not recomputed
    assert len(after) == len(GOOD) + len(BROKEN)
    assert _outputs(out) == _outputs(fresh_out)
