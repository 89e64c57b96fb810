"""Object-motion labels: mask statistics, camera compensation, and agreement with a synthetic world."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fourdthinker.data.spatialvid import read_indexes, read_intrinsics, read_poses, world_to_camera_rows
from fourdthinker.data.synth import SynthConfig, build_world
from fourdthinker.preprocess.object_motion import (
    CameraTrack,
    direction_label,
    inside_frame,
    mask_statistics,
    object_motion,
    speed_label,
)
from fourdthinker.preprocess.vocab import OBJECT_DIRECTIONS, SPEED_LABELS, STATIONARY

FPS = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion") / "world"
    build_world(root, SynthConfig(videos=20, seed=1, width=224, height=168, seconds=6, fps=FPS))
    return root


def _clip_inputs(world, clip_dir, step):
    tracks = json.loads((clip_dir / "tracks.json").read_text())
    with np.load(clip_dir / "masks.npz") as data:
        ids = data["instance_ids"]
    annotations = world / "annotations" / tracks["group"] / tracks["video_id"]
    frames = np.arange(0, len(ids), step)
    camera = CameraTrack.at_frames(read_poses(annotations), read_intrinsics(annotations),
                                   read_indexes(annotations)[:, 1], frames / FPS, FPS, 1.0)
    return tracks, ids[frames], camera, frames / FPS


@pytest.mark.parametrize("step", [1, 2])  # every frame (5 fps) and every other frame (2.5 fps)
def test_direction_labels_match_ground_truth_for_90_percent_of_moving_objects(world, step):
    right = total = 0
    for clip_dir in sorted((world / "ground_truth").glob("clip_*")):
        tracks, ids, camera, times = _clip_inputs(world, clip_dir, step)
        for obj in tracks["objects"]:
            if not obj["dynamic"]:
                continue
            centroids, areas, boxes = mask_statistics(ids == obj["id"])
            motion = object_motion(centroids, areas, camera, times, 0.85,
                                   inside_frame(boxes, ids.shape[2], ids.shape[1]))
            right += motion.direction == obj["direction"]
            total += 1
    assert total >= 20
    assert right / total >= 0.9, f"{right}/{total} directions agree with the ground truth"


def test_labels_are_in_the_reference_vocabularies(world):
    tracks, ids, camera, times = _clip_inputs(world, sorted((world / "ground_truth").glob("clip_*"))[0], 1)
    for obj in tracks["objects"]:
        centroids, areas, _ = mask_statistics(ids == obj["id"])
        motion = object_motion(centroids, areas, camera, times, 0.85)
        assert motion.direction in OBJECT_DIRECTIONS
        assert (motion.speed is None) == (not motion.dynamic)
        assert motion.speed is None or motion.speed in SPEED_LABELS


def test_mask_statistics_match_a_per_frame_reference():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 9, 13)) > 0.7
    masks[2] = False
    centroids, areas, boxes = mask_statistics(masks)
    for t, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if not len(xs):
            assert areas[t] == 0 and np.isnan(centroids[t]).all() and np.isnan(boxes[t]).all()
            continue
        assert areas[t] == len(xs)
        np.testing.assert_allclose(centroids[t], [xs.mean(), ys.mean()])
        np.testing.assert_array_equal(boxes[t], [xs.min(), ys.min(), xs.max(), ys.max()])


def test_inside_frame_rejects_boxes_touching_the_border():
    boxes = np.array([[1, 1, 8, 8], [0, 3, 5, 5], [2, 2, 9, 5], [np.nan] * 4])
    np.testing.assert_array_equal(inside_frame(boxes, width=10, height=10), [True, False, False, False])


def _project(points, camera: CameraTrack):
    cam = np.einsum("nij,nj->ni", camera.rotations, points - camera.centres)
    k = camera.intrinsics
    return np.stack([k[:, 0] * cam[:, 0] / cam[:, 2] + k[:, 2], k[:, 1] * cam[:, 1] / cam[:, 2] + k[:, 3]], 1), cam[:, 2]


def _panning_camera(frames: int, degrees_per_frame: float, truck_per_frame: float = 0.0) -> CameraTrack:
    angles = np.radians(degrees_per_frame) * np.arange(frames)
    # Camera-to-world rotation about +y (a pan), centres moving along world x.
    c2w = np.stack([np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
                    for a in angles])
    w2c = np.transpose(c2w, (0, 2, 1))
    centres = np.stack([truck_per_frame * np.arange(frames), np.zeros(frames), np.zeros(frames)], 1)
    rows = world_to_camera_rows(w2c, -np.einsum("nij,nj->ni", w2c, centres))
    intrinsics = np.tile([200.0, 200.0, 160.0, 120.0], (frames, 1))
    return CameraTrack.at_frames(rows, intrinsics, np.arange(frames), np.arange(frames) / FPS, FPS, 1.0)


def _object_track(points, camera, size):
    centroids, depth = _project(points, camera)
    focal = camera.intrinsics[:, 0]
    areas = (focal * size / depth) ** 2  # the area an object of size `size` covers at that depth
    return centroids, areas


def test_a_static_object_stays_stationary_while_the_camera_pans_and_trucks():
    camera = _panning_camera(10, degrees_per_frame=2.0, truck_per_frame=0.1)
    point = np.tile([0.5, 0.2, 6.0], (10, 1))
    centroids, areas = _object_track(point, camera, size=1.0)
    assert np.ptp(centroids[:, 0]) > 50  # the image motion is large: only compensation removes it
    motion = object_motion(centroids, areas, camera, np.arange(10) / FPS, object_size=1.0)
    assert not motion.dynamic and motion.direction == STATIONARY


@pytest.mark.parametrize("velocity, expected", [
    ([-0.3, 0.0, 0.0], "Moving Left"), ([0.3, 0.0, 0.0], "Moving Right"), ([0.0, -0.3, 0.0], "Moving Up"),
    ([0.3, 0.3, 0.0], "Moving Right-Down"), ([0.0, 0.0, -0.4], "Moving Toward Camera"),
    ([0.0, 0.0, 0.4], "Moving Away from Camera"),
])
def test_motion_direction_is_measured_against_the_camera_motion(velocity, expected):
    # The camera pans right while the object moves: raw image motion alone would read "Moving Left".
    camera = _panning_camera(10, degrees_per_frame=1.5)
    points = np.array([0.0, 0.0, 8.0]) + np.arange(10)[:, None] * np.array(velocity)
    centroids, areas = _object_track(points, camera, size=1.0)
    motion = object_motion(centroids, areas, camera, np.arange(10) / FPS, object_size=1.0)
    assert motion.dynamic and motion.direction == expected


def test_direction_label_sectors():
    anchor, viewer, up = np.array([0.0, 0.0, 5.0]), np.zeros(3), np.array([0.0, -1.0, 0.0])
    assert direction_label(np.array([1.0, 0, 0]), anchor, viewer, up, 45.0) == "Moving Right"
    assert direction_label(np.array([-1.0, -1.0, 0]), anchor, viewer, up, 45.0) == "Moving Left-Up"
    assert direction_label(np.array([0.2, 0, -1.0]), anchor, viewer, up, 45.0) == "Moving Toward Camera"


@pytest.mark.parametrize("speeds, expected", [
    ([1, 1, 1, 1, 1, 1], "Maintaining a Constant Speed"), ([1, 1, 2, 2, 3, 3], "Speeding Up"),
    ([3, 3, 2, 2, 1, 1], "Slowing Down"), ([1, 1, 3, 3, 1, 1], "First Speeding Up, Then Slowing Down"),
    ([3, 3, 1, 1, 3, 3], "First Slowing Down, Then Speeding Up"), ([1, 1, 1.25, 1.25, 1, 1], "Moving at Varying Speeds"),
])
def test_speed_label_from_thirds(speeds, expected):
    assert speed_label(np.array(speeds, dtype=float)) == expected
