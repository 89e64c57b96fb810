"""Camera-motion labels: the `spatialvid` rule as SpatialVID defines it, and the `geometric` fixes.

Poses are built here from camera centres and camera-frame rotations (Rodrigues matrices and
axis-angle quaternions written in this file), independently of the library's conversions.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fourdthinker.data.vocab import CAMERA_LABELS, CAMERA_STAY
from fourdthinker.preprocess.camera_motion import (
    InvalidPoses,
    TooFewPoses,
    camera_step_motions,
    extrinsic_yxz_angles,
    label_poses,
    min_poses,
    normalize_camera_label,
    quaternions_to_matrices,
    segment_labels,
)

AXES = {"x": np.array([1.0, 0, 0]), "y": np.array([0, 1.0, 0]), "z": np.array([0, 0, 1.0])}
STEP = 0.05  # translation per subsampled step, 2.5x the 0.02 threshold
TURN = math.radians(2.0)  # rotation per subsampled step, 4x the 0.5 deg threshold
AXIS_ORDER = ("Dolly", "Truck", "Pedestal", "Pan", "Tilt", "Roll")


def rodrigues(axis: np.ndarray, angle: float) -> np.ndarray:
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def axis_angle_quaternion(axis: np.ndarray, angle: float) -> np.ndarray:
    return np.r_[axis * math.sin(angle / 2), math.cos(angle / 2)]


def trajectory(centres, axis: str = "y", angles=None) -> np.ndarray:
    """SpatialVID rows for cameras at `centres` turned by `angles` about their own `axis`
    (camera-to-world = Rot(axis, angle)); stored world-to-camera as SpatialVID does."""
    centres = np.asarray(centres, dtype=np.float64)
    angles = np.zeros(len(centres)) if angles is None else np.asarray(angles, dtype=np.float64)
    rows = []
    for centre, angle in zip(centres, angles):
        w2c = rodrigues(AXES[axis], angle).T
        rows.append(np.r_[-w2c @ centre, axis_angle_quaternion(AXES[axis], -angle)])
    return np.asarray(rows, dtype=np.float32)


def steady_motion(steps: int, direction=(0, 0, 0), axis: str = "y", turn: float = 0.0, interval=2):
    """Constant motion: per subsampled step the centre moves by `direction` (world axes) and the
    camera turns by `turn` about its `axis`; raw rows are sampled `interval` times per step."""
    s = np.arange(steps * interval + 1) / interval
    return trajectory(np.outer(s, direction), axis, s * turn)


def key_range(instructions: dict) -> list[tuple[int, int]]:
    return [tuple(map(int, key.split("->"))) for key in instructions]


# (label, centre direction per step, camera axis, turn per step): signs as REFERENCE.md states them
# for a camera starting at identity.
SINGLE_MOTIONS = [
    ("Dolly In", (0, 0, STEP), "y", 0.0),
    ("Dolly Out", (0, 0, -STEP), "y", 0.0),
    ("Truck Right", (STEP, 0, 0), "y", 0.0),
    ("Truck Left", (-STEP, 0, 0), "y", 0.0),
    ("Pedestal Down", (0, STEP, 0), "y", 0.0),
    ("Pedestal Up", (0, -STEP, 0), "y", 0.0),
    # Turning right: the optical axis (z) swings toward +x, a positive turn about the down axis y.
    ("Pan Right", (0, 0, 0), "y", TURN),
    ("Pan Left", (0, 0, 0), "y", -TURN),
    # Turning up: z swings toward -y, a positive turn about x.
    ("Tilt Up", (0, 0, 0), "x", TURN),
    ("Tilt Down", (0, 0, 0), "x", -TURN),
    # Clockwise seen from behind: x (right) swings toward +y (down), a positive turn about z.
    ("Roll CW", (0, 0, 0), "z", TURN),
    ("Roll CCW", (0, 0, 0), "z", -TURN),
]


# --- rotation conventions ----------------------------------------------------------------------


def test_extrinsic_yxz_recovers_composed_angles():
    rng = np.random.default_rng(0)
    yaw = rng.uniform(-math.pi, math.pi, 200)
    pitch = rng.uniform(-math.pi / 2 + 1e-3, math.pi / 2 - 1e-3, 200)
    roll = rng.uniform(-math.pi, math.pi, 200)
    # Extrinsic y, then x, then z: each later rotation acts on the fixed frame, so it multiplies on the left.
    matrices = np.stack(
        [
            rodrigues(AXES["z"], c) @ rodrigues(AXES["x"], b) @ rodrigues(AXES["y"], a)
            for a, b, c in zip(yaw, pitch, roll)
        ]
    )
    np.testing.assert_allclose(extrinsic_yxz_angles(matrices), np.stack([yaw, pitch, roll], 1), atol=1e-9)


@pytest.mark.parametrize("pitch", [math.pi / 2, -math.pi / 2])
def test_extrinsic_yxz_at_gimbal_lock_still_reconstructs_the_rotation(pitch):
    matrix = rodrigues(AXES["z"], 0.4) @ rodrigues(AXES["x"], pitch) @ rodrigues(AXES["y"], -0.3)
    yaw, got_pitch, roll = extrinsic_yxz_angles(matrix)
    assert roll == 0.0 and got_pitch == pytest.approx(pitch)
    rebuilt = rodrigues(AXES["z"], roll) @ rodrigues(AXES["x"], got_pitch) @ rodrigues(AXES["y"], yaw)
    np.testing.assert_allclose(rebuilt, matrix, atol=1e-9)


def test_quaternions_to_matrices_matches_rodrigues_and_normalises():
    rng = np.random.default_rng(1)
    axes = rng.normal(size=(50, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = rng.uniform(-math.pi, math.pi, 50)
    scales = rng.uniform(0.5, 3.0, (50, 1))  # non-unit quaternions describe the same rotation
    quaternions = np.stack([axis_angle_quaternion(a, t) for a, t in zip(axes, angles)]) * scales
    expected = np.stack([rodrigues(a, t) for a, t in zip(axes, angles)])
    np.testing.assert_allclose(quaternions_to_matrices(quaternions), expected, atol=1e-12)


# --- the spatialvid rule -----------------------------------------------------------------------


@pytest.mark.parametrize(("label", "direction", "axis", "turn"), SINGLE_MOTIONS)
def test_spatialvid_labels_each_axis_and_sign(label, direction, axis, turn):
    instructions = label_poses(steady_motion(12, direction, axis, turn), rule="spatialvid")
    labels = list(instructions.values())
    # The cold EMA may open with Stay; every other segment is the one movement.
    assert labels[-1] == [label]
    assert all(segment in ([label], [CAMERA_STAY]) for segment in labels)
    assert labels.count([CAMERA_STAY]) <= 1 and labels[1:].count([CAMERA_STAY]) == 0


@pytest.mark.parametrize(("label", "direction", "axis", "turn"), SINGLE_MOTIONS)
def test_geometric_labels_each_axis_and_sign_from_the_first_step(label, direction, axis, turn):
    assert label_poses(steady_motion(12, direction, axis, turn)) == {"0->12": [label]}


def test_cold_ema_opens_spatialvid_clips_with_stay():
    steps = 15
    poses = steady_motion(steps, (0, 0, STEP))
    # EMA of positions starting at p[0]: the k-th smoothed increment is STEP * (1 - 0.9**k).
    first_moving = next(k for k in range(1, steps + 1) if STEP * (1 - 0.9**k) > 0.02) - 1
    assert first_moving > 0
    assert label_poses(poses, rule="spatialvid") == {
        f"0->{first_moving}": [CAMERA_STAY],
        f"{first_moving}->{steps}": ["Dolly In"],
    }
    assert label_poses(poses, rule="geometric") == {f"0->{steps}": ["Dolly In"]}


def test_dolly_in_with_pan_right_gives_both_labels_in_axis_order():
    steps = 12
    angles = np.arange(2 * steps + 1) / 2 * TURN
    # Each half step moves the centre along the camera's current optical axis.
    forward = np.stack([rodrigues(AXES["y"], a) @ AXES["z"] for a in angles[:-1]]) * STEP / 2
    centres = np.concatenate([np.zeros((1, 3)), np.cumsum(forward, axis=0)])
    poses = trajectory(centres, "y", angles)
    assert list(label_poses(poses, rule="spatialvid").values())[-1] == ["Dolly In", "Pan Right"]
    assert label_poses(poses, rule="geometric") == {f"0->{steps}": ["Dolly In", "Pan Right"]}


def test_spatialvid_translation_just_above_and_below_threshold_after_smoothing():
    # Target smoothed increments; invert the EMA (f_k - f_{k-1} = 0.9 (f_{k-1} - f_{k-2}) + 0.1 (p_k -
    # p_{k-1})) to find the raw positions that produce them.
    wanted = np.array([0.0206, 0.0194, 0.0205, 0.0205, 0.0196, 0.0204, 0.0195])
    previous = np.r_[0.0, wanted[:-1]]
    raw_steps = (wanted - 0.9 * previous) / 0.1
    z = np.r_[0.0, np.cumsum(raw_steps)]
    poses = trajectory(np.outer(z, AXES["z"]))
    expected = [["Dolly In"] if w > 0.02 else [CAMERA_STAY] for w in wanted]
    assert list(label_poses(poses, rule="spatialvid", interval=1).values()) == _merged(expected)
    np.testing.assert_allclose(
        camera_step_motions(poses, rule="spatialvid", interval=1)[:, 2], wanted, atol=1e-5
    )


def test_spatialvid_rotation_just_above_and_below_threshold_after_smoothing():
    # Quaternions about one axis blend like unit vectors at their half angles: with the smoothed
    # half angle s, a raw half angle s + u moves it by v where 0.1 sin(u - v) = 0.9 sin(v).
    wanted_deg = np.array([0.52, 0.48, 0.51, 0.53, 0.47, 0.49, 0.52])
    smoothed_half, raw_angles = 0.0, [0.0]
    for increment in np.radians(wanted_deg):
        v = increment / 2
        raw_angles.append(2 * (smoothed_half + v + math.asin(9 * math.sin(v))))
        smoothed_half += v
    # Positive world-to-camera angles about y: the camera turns left.
    poses = trajectory(np.zeros((len(raw_angles), 3)), "y", -np.asarray(raw_angles))
    expected = [["Pan Left"] if w > 0.5 else [CAMERA_STAY] for w in wanted_deg]
    assert list(label_poses(poses, rule="spatialvid", interval=1).values()) == _merged(expected)


def _merged(step_labels: list[list[str]]) -> list[list[str]]:
    return [labels for i, labels in enumerate(step_labels) if i == 0 or labels != step_labels[i - 1]]


@pytest.mark.parametrize("n_rows", [7, 8])
def test_subsampling_keeps_even_rows_and_keys_cover_every_step(n_rows):
    clean = steady_motion(4, (0, 0, STEP))[:n_rows]
    noisy = clean.copy()
    rng = np.random.default_rng(n_rows)
    noisy[1::2, :3] += rng.normal(scale=5.0, size=noisy[1::2, :3].shape).astype(np.float32)
    for rule in ("spatialvid", "geometric"):
        labels = label_poses(noisy, rule=rule)
        assert labels == label_poses(clean, rule=rule)
        assert key_range(labels)[-1][1] == math.ceil(n_rows / 2) - 1
        assert label_poses(noisy, rule=rule, interval=1) != labels  # the odd rows do count at interval 1


@pytest.mark.parametrize("rule", ["spatialvid", "geometric"])
@pytest.mark.parametrize("n_rows", range(3, 14))
def test_keys_are_contiguous_and_labels_are_well_formed(rule, n_rows):
    rng = np.random.default_rng(n_rows)
    angles = np.cumsum(rng.normal(scale=0.05, size=n_rows))
    poses = trajectory(np.cumsum(rng.normal(scale=0.05, size=(n_rows, 3)), axis=0), "x", angles)
    instructions = label_poses(poses, rule=rule)
    ranges = key_range(instructions)
    assert ranges[0][0] == 0 and ranges[-1][1] == math.ceil(n_rows / 2) - 1
    assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    values = list(instructions.values())
    assert all(x != y for x, y in zip(values, values[1:]))  # runs are merged
    for labels in values:
        full = [normalize_camera_label(label) for label in labels]
        if full != [CAMERA_STAY]:
            assert set(full) <= set(CAMERA_LABELS)
            axes = [AXIS_ORDER.index(label.split()[0]) for label in full]
            assert axes == sorted(set(axes))  # one label per axis, in SpatialVID's order
    assert json.loads(json.dumps(instructions, indent=2, ensure_ascii=False)) == instructions


def test_turned_camera_moving_forward_is_truck_for_spatialvid_and_dolly_for_geometric():
    # Camera turned 90 deg right (looking along world +x) and moving along its own optical axis.
    s = np.arange(25) / 2
    poses = trajectory(np.outer(s * STEP, AXES["x"]), "y", np.full(len(s), math.pi / 2))
    assert list(label_poses(poses, rule="spatialvid").values())[-1] == ["Truck Right"]
    assert label_poses(poses, rule="geometric") == {"0->12": ["Dolly In"]}


def test_pure_pan_away_from_origin_adds_dolly_for_spatialvid_only():
    poses = steady_motion(20, turn=TURN)
    poses_off_origin = trajectory(np.tile([5.0, 0, 0], (41, 1)), "y", np.arange(41) / 2 * TURN)
    # At the world origin SpatialVID's quirk is invisible: only the (cold-started) pan.
    assert list(label_poses(poses, rule="spatialvid").values()) == [[CAMERA_STAY], ["Pan Right"]]
    assert list(label_poses(poses_off_origin, rule="spatialvid").values())[-1] == ["Dolly In", "Pan Right"]
    assert label_poses(poses_off_origin, rule="geometric") == {"0->20": ["Pan Right"]}


def test_fast_rotation_reverses_spatialvid_but_not_geometric():
    # Above ~12.8 deg per step the normalised quaternion blend cannot keep up; once the lag passes
    # 180 deg the hemisphere flip drags the smoothed camera backwards.
    poses = steady_motion(40, turn=math.radians(20))
    spatialvid = set(map(tuple, label_poses(poses, rule="spatialvid").values()))
    assert ("Pan Left",) in spatialvid and ("Pan Right",) in spatialvid
    assert label_poses(poses, rule="geometric") == {"0->40": ["Pan Right"]}


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_rows", [0, 1, 2])
def test_too_few_poses_raise_a_reason_not_an_index_error(n_rows):
    poses = steady_motion(1, (0, 0, STEP))[:n_rows]
    with pytest.raises(TooFewPoses, match=rf"clip has {n_rows} poses; camera-motion labels need >= 3"):
        label_poses(poses, rule="spatialvid")
    assert min_poses(interval=3) == 4
    with pytest.raises(TooFewPoses):
        label_poses(steady_motion(1, interval=3)[:3], interval=3)


def test_malformed_poses_name_the_problem():
    poses = steady_motion(3, (0, 0, STEP))
    with pytest.raises(InvalidPoses, match=r"shape \(7, 6\)"):
        label_poses(poses[:, :6])
    with_nan = poses.copy()
    with_nan[4, 1] = np.nan
    with pytest.raises(InvalidPoses, match=r"rows \[4\] contain NaN"):
        label_poses(with_nan)
    zero_quaternion = poses.copy()
    zero_quaternion[2, 3:] = 0
    with pytest.raises(InvalidPoses, match=r"rows \[2\] have a zero quaternion"):
        label_poses(zero_quaternion)
    with pytest.raises(InvalidPoses, match="dtype"):
        label_poses(poses.astype(str))
    with pytest.raises(ValueError, match="rule="):
        label_poses(poses, rule="opencv")
    with pytest.raises(ValueError, match="alpha="):
        label_poses(poses, alpha=0.0)


# --- helpers -------------------------------------------------------------------------------------


def test_normalize_camera_label_expands_abbreviations_only():
    assert normalize_camera_label("Roll CW") == "Roll Clockwise"
    assert normalize_camera_label("Roll CCW") == "Roll Counter-Clockwise"
    assert [normalize_camera_label(label) for label in CAMERA_LABELS] == list(CAMERA_LABELS)
    assert normalize_camera_label(CAMERA_STAY) == CAMERA_STAY
    with pytest.raises(ValueError, match="Zoom In"):
        normalize_camera_label("Zoom In")


def test_segment_labels_parses_keys_in_order():
    instructions = label_poses(steady_motion(15, (0, 0, STEP)), rule="spatialvid")
    segments = segment_labels(instructions)
    assert [(a, b) for a, b, _ in segments] == key_range(instructions)
    assert [labels for _, _, labels in segments] == list(instructions.values())
    with pytest.raises(ValueError, match="'3->1'"):
        segment_labels({"3->1": ["Stay"]})
    with pytest.raises(ValueError, match="list of label strings"):
        segment_labels({"0->1": "Stay"})
