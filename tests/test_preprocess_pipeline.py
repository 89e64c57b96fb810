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
          "fewposes": "camera poses unusable", "noannot": "annotations missing",
          # NaN poses beside an instructions.json: camera labels come from the file, object motion fails
          "nanposes": "labelling failed"}


def _pipeline():
    spec = importlib.util.spec_from_file_location("preprocess_pipeline", REPO / "pipelines" / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
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
        if clip_id == "nanposes":
            poses = np.load(annotations / "poses.npy")
            np.save(annotations / "poses.npy", np.full_like(poses, np.nan))
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
        media = record["image_input"] + record["image_output"]
        # One rule for every JSONL: media paths relative to the JSONL's folder.
        assert all(not Path(p).is_absolute() and (out / p).is_file() for p in media)
        assert rl_record["frame_paths"] == record["image_input"]


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
    nan_reason = per_clip.get_group("nanposes")["reason"].iloc[0]
    assert "ValueError" in nan_reason, nan_reason  # the cause travels with the clip's drop record


def test_a_rerun_of_a_finished_run_is_a_no_op(fresh_run, world):
    out, summary = fresh_run
    before = {p: p.stat().st_mtime_ns for p in (out / CLIPS_DIR).glob("*.json")}
    outputs = _outputs(out)
    assert _pipeline().run(_cfg(world, out)) == summary
    assert {p: p.stat().st_mtime_ns for p in (out / CLIPS_DIR).glob("*.json")} == before
    assert _outputs(out) == outputs


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


def test_a_relative_output_dir_gives_jsonl_files_dift_and_grpo_read_whole(ray_local, world, tmp_path, monkeypatch):
    from fourdthinker.data.dift_dataset import read_dift_jsonl
    from fourdthinker.data.rl_dataset import read_rl_jsonl

    monkeypatch.chdir(tmp_path)
    assert _pipeline().main(["--config", str(REPO / "configs/tiny/preprocess.yaml"), f"input_root={world}",
                             "output_dir=runs/pp", "max_clips=1"]) == 0
    monkeypatch.chdir(REPO)  # read from elsewhere: paths must not depend on the working directory
    out = tmp_path / "runs" / "pp"
    lines = len((out / "dift.jsonl").read_text().splitlines())
    samples, skipped = read_dift_jsonl(out / "dift.jsonl")
    prompts, rl_skipped = read_rl_jsonl(out / "rl.jsonl")
    assert lines > 0 and len(samples) == len(prompts) == lines and not skipped and not rl_skipped


def test_every_output_gets_the_mode_the_users_umask_gives(fresh_run):
    import os

    out, _ = fresh_run
    umask = os.umask(0)
    os.umask(umask)
    paths = list(out.rglob("*"))
    kinds = {p.relative_to(out).parts[0] for p in paths}
    assert kinds >= {"clips", "frames", "masks", "overlays", "dift.jsonl", "rl.jsonl", "manifest.parquet",
                     "summary.json"}
    wrong = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in paths
             if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~umask}
    assert not wrong, wrong
