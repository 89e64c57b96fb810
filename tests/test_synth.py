"""The synthetic 4D world: geometry, labels, benchmark answers, determinism and argument errors."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from fourdthinker.cli import main
from fourdthinker.data.render import Ground, SceneFrame, cast_rays
from fourdthinker.data.spatialvid import (ClipPaths, camera_centres, quaternion_to_rotation, read_indexes,
                                          read_instructions, read_intrinsics, read_poses,
                                          rotation_to_quaternion, rows_to_world_to_camera)
from fourdthinker.data.synth import DSR_KEYS, SynthConfig, answer_from_tracks, build_world
from fourdthinker.errors import UsageError

SMALL = dict(videos=4, width=96, height=72, seconds=3, fps=5)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    build_world(out, SynthConfig(seed=3, **SMALL))
    return out


def clips(root: Path) -> list[ClipPaths]:
    metadata = pd.read_csv(root / "SpatialVID_metadata.csv")
    return [ClipPaths.from_video_path(root, p) for p in metadata["video path"]]


def tracks_of(root: Path, video_id: str) -> dict:
    return json.loads((root / "ground_truth" / video_id / "tracks.json").read_text())


def project(rows: np.ndarray, intrinsics: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) pixel coordinates of per-frame world points (N, 3), from the written files only."""
    rotations, translations = rows_to_world_to_camera(rows)
    cam = np.einsum("nij,nj->ni", rotations, points) + translations
    fx, fy, cx, cy = intrinsics.T
    return np.stack([fx * cam[:, 0] / cam[:, 2] + cx, fy * cam[:, 1] / cam[:, 2] + cy], axis=1)


# --- spatialvid helpers and renderer ---------------------------------------------------------------

def test_quaternions_follow_scalar_last_convention_and_round_trip():
    angle = 0.7
    rot_y = np.array([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    expected = np.array([0.0, math.sin(angle / 2), 0.0, math.cos(angle / 2)])
    np.testing.assert_allclose(rotation_to_quaternion(rot_y), expected, atol=1e-12)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(500, 4))
    q = q / np.linalg.norm(q, axis=1, keepdims=True) * np.sign(q[:, 3:])
    np.testing.assert_allclose(rotation_to_quaternion(quaternion_to_rotation(q)), q, atol=1e-9)


def test_read_indexes_skips_comments_and_malformed_lines(tmp_path):
    (tmp_path / "indexes.txt").write_text("# frame_seq frame_idx\n0 0\n1 4\nbad line here\n2 9\n")
    np.testing.assert_array_equal(read_indexes(tmp_path), [[0, 0], [1, 4], [2, 9]])


def _ground() -> Ground:
    return Ground(np.array([0.0, -1.0, 0.0]), -2.0, np.array([[1.0, 0, 0], [0, 0, 1.0]]), 1.0, np.ones((2, 3)))


def test_nearest_surface_wins_whatever_the_object_order():
    dirs = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    for near_first in (True, False):
        centres = np.array([[0, 0, 4.0], [0, 0, 8.0]])[:: 1 if near_first else -1]
        ids = np.array([1, 2])[:: 1 if near_first else -1]
        scene = SceneFrame(centres, np.array([1.0, 1.0]), np.ones((2, 3)), ids,
                           np.array([[0, 0, 6.0]]), np.eye(3)[None], np.array([[0.5, 0.5, 0.5]]),
                           np.ones((1, 3)), np.array([3]), _ground(), np.array([0, -1.0, 0]), np.ones((2, 3)))
        hits = cast_rays(np.zeros(3), dirs, scene)
        np.testing.assert_array_equal(hits.ids, [1, 1])
        np.testing.assert_allclose(hits.depth, [3.0, 3.0])
    # Without the sphere in front, the box's front face at z = 5.5 is hit.
    scene = SceneFrame(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), np.zeros(0, dtype=int),
                       np.array([[0, 0, 6.0]]), np.eye(3)[None], np.array([[0.5, 0.5, 0.5]]),
                       np.ones((1, 3)), np.array([3]), _ground(), np.array([0, -1.0, 0]), np.ones((2, 3)))
    hits = cast_rays(np.zeros(3), dirs[:1], scene)
    assert hits.ids.tolist() == [3] and hits.depth[0] == pytest.approx(5.5)


# --- the written world ---------------------------------------------------------------------------

def test_layout_and_mp4_decode_to_every_frame(world):
    cfg = SynthConfig(seed=3, **SMALL)
    for clip in clips(world):
        with av.open(str(clip.video)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == cfg.num_frames
        assert frames[0].shape == (cfg.height, cfg.width, 3)
        assert read_poses(clip.annotations).shape == (cfg.num_frames, 7)
        assert read_intrinsics(clip.annotations).shape == (cfg.num_frames, 4)
        np.testing.assert_array_equal(read_indexes(clip.annotations)[:, 0], np.arange(cfg.num_frames))
        assert (world / "dsr" / "videos" / f"{clip.video_id}.mp4").stat().st_size == clip.video.stat().st_size
        # The first camera is the world frame.
        np.testing.assert_allclose(read_poses(clip.annotations)[0], [0, 0, 0, 0, 0, 0, 1], atol=1e-6)


def test_projected_object_centres_land_on_their_rendered_instances(world):
    checked = 0
    for clip in clips(world):
        rows, intrinsics = read_poses(clip.annotations), read_intrinsics(clip.annotations)
        instance_ids = np.load(world / "ground_truth" / clip.video_id / "masks.npz")["instance_ids"]
        for obj in tracks_of(world, clip.video_id)["objects"]:
            pixels = project(rows, intrinsics, np.asarray(obj["centres"]))
            u, v = np.rint(pixels).astype(int).T      # rounding: error <= 0.71 px
            assert np.all(instance_ids[np.arange(len(u)), v, u] == obj["id"]), (clip.video_id, obj["name"])
            checked += len(u)
    assert checked > 100


def _step_labels(rows: np.ndarray) -> list[list[str]]:
    """Unsmoothed geometric labelling of every 2-row step (SpatialVID thresholds and signs)."""
    rotations, _ = rows_to_world_to_camera(rows[::2])
    centres = camera_centres(rows[::2])
    labels = []
    for i in range(len(centres) - 1):
        dx, dy, dz = rotations[i] @ (centres[i + 1] - centres[i])
        m = rotations[i + 1] @ rotations[i].T        # = Rz(roll) Rx(pitch) Ry(yaw), extrinsic "yxz"
        pitch = math.degrees(math.asin(np.clip(m[2, 1], -1, 1)))
        yaw = math.degrees(math.atan2(-m[2, 0], m[2, 2]))
        roll = math.degrees(math.atan2(-m[0, 1], m[1, 1]))
        step = []
        for value, th, positive, negative in ((dz, .02, "Dolly In", "Dolly Out"), (dx, .02, "Truck Right", "Truck Left"),
                                              (dy, .02, "Pedestal Down", "Pedestal Up"), (yaw, .5, "Pan Left", "Pan Right"),
                                              (pitch, .5, "Tilt Down", "Tilt Up"), (roll, .5, "Roll CCW", "Roll CW")):
            if value > th:
                step.append(positive)
            elif value < -th:
                step.append(negative)
        labels.append(step or ["Stay"])
    return labels


def test_motion_labels_match_the_generating_spec_and_the_poses(world):
    metadata = pd.read_csv(world / "SpatialVID_metadata.csv").set_index("id")
    for clip in clips(world):
        spec = tracks_of(world, clip.video_id)["camera"]
        instructions = read_instructions(clip.annotations)
        assert instructions == {f"{a}->{b}": s["labels"] for s in spec["segments"] for a, b in [s["steps"]]}
        assert json.loads(metadata.loc[clip.video_id, "camera motion"]) == spec["motion"]
        steps = _step_labels(read_poses(clip.annotations))
        keys = [tuple(map(int, k.split("->"))) for k in instructions]
        assert keys[0][0] == 0 and keys[-1][1] == len(steps) and all(
            a[1] == b[0] for a, b in zip(keys, keys[1:]))
        for (a, b), labels in zip(keys, instructions.values()):
            assert all(steps[i] == labels for i in range(a, b)), (clip.video_id, labels, steps[a:b])


# Independent recomputations of a few answer kinds, from the written poses and tracks only.

def _camera_distance_answer(distances: np.ndarray, names: dict) -> str | None:
    start, end, scale = distances[0], distances[-1], max(distances[0], distances[-1])
    if distances.min() < min(start, end) - 0.12 * scale:
        return names["dip"]
    if distances.max() > max(start, end) + 0.12 * scale:
        return names["peak"]
    change = (end - start) / scale
    return names["closer"] if change < -0.12 else names["farther"] if change > 0.12 else names["same"]


def _recompute(kind: str, tracks: dict, subjects: list[int], rows: np.ndarray, intrinsics: np.ndarray):
    objects = {o["id"]: o for o in tracks["objects"]}
    centres = {i: np.asarray(o["centres"]) for i, o in objects.items()}
    speed = {i: np.linalg.norm(np.diff(c, axis=0), axis=1).mean() * tracks["fps"] for i, c in centres.items()}
    if kind == "abs_dis":
        d = np.linalg.norm(centres[subjects[0]] - camera_centres(rows), axis=1)
        return _camera_distance_answer(d, {"dip": "First Getting Closer, Then Farther",
                                           "peak": "First Getting Farther, Then Closer",
                                           "closer": "Getting Closer to Camera", "farther": "Getting Farther from Camera",
                                           "same": "Maintaining Roughly the Same Distance"})
    if kind == "rel_dis":
        d = np.linalg.norm(centres[subjects[0]] - centres[subjects[1]], axis=1)
        return _camera_distance_answer(d, {"dip": "They First Get Closer, Then Farther Apart",
                                           "peak": "They First Get Farther Apart, Then Closer",
                                           "closer": "They Get Closer to Each Other", "farther": "They Get Farther Apart",
                                           "same": "Their Distance Stays Roughly the Same"})
    if kind == "non_temp":
        u = [project(rows[:1], intrinsics[:1], centres[s][:1])[0, 0] for s in subjects]
        return f"The {objects[subjects[int(np.argmin(u))]]['name']}"
    if kind == "rel_spd":
        return f"The {objects[max(subjects, key=speed.get)]['name']}"
    if kind == "rel_spd_comp":
        a, b = subjects
        if max(speed[a], speed[b]) < 0.02:
            return "Neither of them moves"
        if abs(math.log(max(speed[a], 1e-9) / max(speed[b], 1e-9))) < math.log(1.1):
            return "They move at about the same speed"
        relation = "faster" if speed[a] > speed[b] else "slower"
        return f"The {objects[a]['name']} is {relation} than the {objects[b]['name']}"
    if kind == "abs_ori":
        # Angle of the front against the line of sight, both flattened onto the ground plane.
        up = np.asarray(tracks["up"])
        sight = centres[subjects[0]][0] - camera_centres(rows)[0]
        front = np.asarray(objects[subjects[0]]["forward"][0])
        flat = [x - (x @ up) * up for x in (sight, front)]
        angle = math.degrees(math.atan2(np.cross(flat[0], flat[1]) @ up, flat[0] @ flat[1]))
        # atan2 with the "up" axis: positive angles turn from the line of sight toward the camera's left.
        return ("Away from the camera" if abs(angle) < 35 else "Toward the camera" if abs(angle) > 145
                else "To the camera's left" if angle > 0 else "To the camera's right")
    return None


def test_every_benchmark_answer_is_recomputed_from_the_ground_truth(world):
    table = pd.read_parquet(world / "dsr" / "benchmark.parquet")
    assert list(table.columns) == ["videoID", "question", "options", "answer", "type"]
    records = [json.loads(line) for line in (world / "ground_truth" / "benchmark.jsonl").read_text().splitlines()]
    assert len(records) == len(table) > 0
    annotations = {c.video_id: c.annotations for c in clips(world)}
    independent = 0
    for row, record in zip(table.itertuples(), records):
        assert row.type in DSR_KEYS and row.answer in "ABCD"
        options = list(row.options)
        assert [o[:3] for o in options] == ["A. ", "B. ", "C. ", "D. "]
        assert len({o[3:] for o in options}) == 4
        gold = options["ABCD".index(row.answer)][3:]
        tracks = tracks_of(world, row.videoID)
        assert gold == answer_from_tracks(row.type, tracks, record["subjects"])
        expected = _recompute(row.type, tracks, record["subjects"], read_poses(annotations[row.videoID]),
                              read_intrinsics(annotations[row.videoID]))
        if expected is not None:
            assert gold == expected, (row.type, row.question)
            independent += 1
        names = [o["name"] for o in tracks["objects"] if o["id"] in record["subjects"]]
        assert all(n in row.question or any(n in o for o in options) for n in names)
    assert independent >= len(table) // 4
    letters = Counter(table["answer"])
    assert max(letters.values()) - min(letters.get(x, 0) for x in "ABCD") <= 1


def test_same_seed_same_world_other_seed_other_world(tmp_path, world):
    again, other = tmp_path / "again", tmp_path / "other"
    build_world(again, SynthConfig(seed=3, **SMALL))
    build_world(other, SynthConfig(seed=4, **SMALL))
    for a, b in zip(clips(world), clips(again)):
        np.testing.assert_array_equal(read_poses(a.annotations), read_poses(b.annotations))
        assert tracks_of(world, a.video_id) == tracks_of(again, b.video_id)
        with av.open(str(a.video)) as ca, av.open(str(b.video)) as cb:
            np.testing.assert_array_equal(next(ca.decode(video=0)).to_ndarray(format="rgb24"),
                                          next(cb.decode(video=0)).to_ndarray(format="rgb24"))
    pd.testing.assert_frame_equal(pd.read_parquet(world / "dsr" / "benchmark.parquet"),
                                  pd.read_parquet(again / "dsr" / "benchmark.parquet"))
    assert tracks_of(world, "clip_0000") != tracks_of(other, "clip_0000")


# --- bad arguments ----------------------------------------------------------------------------------

def test_negative_video_count_exits_2_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--out", str(tmp_path / "w"), "--videos", "-1"])
    assert exit_info.value.code == 2
    assert "--videos" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("argv, flag", [
    (["--width", "97"], "--width"),
    (["--width", "8192"], "--width"),
    (["--seconds", "30"], "--seconds"),
    (["--out", "/proc/fourdthinker-synth-test"], "--out"),
])
def test_impossible_arguments_exit_2_and_write_nothing(tmp_path, capsys, argv, flag):
    out = tmp_path / "w"
    args = ["synth", "--out", str(out), "--videos", "1"] + argv
    assert main(args) == 2
    assert flag in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_non_empty_output_without_overwrite_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["synth", "--out", str(out), "--videos", "1", "--width", "32", "--height", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["w"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_config_rejects_non_positive_counts_with_a_usage_error():
    with pytest.raises(UsageError, match="--videos"):
        SynthConfig(videos=0)
    with pytest.raises(UsageError, match="--fps"):
        SynthConfig(fps=-5)
