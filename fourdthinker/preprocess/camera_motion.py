"""Camera-motion labels (SpatialVID's `instructions.json`) from per-frame camera poses.

Poses use the SpatialVID layout: float rows `[tx, ty, tz, qx, qy, qz, qw]`, world-to-camera
(X_cam = R X_world + t), OpenCV camera axes (x right, y down, z forward). Labels are computed per step
between consecutive *subsampled* poses (every `interval`-th row) and runs of equal label lists merge
into keys "a->b" counted in subsampled steps (key a->b spans pose rows interval*a ... interval*b).

Two rules:
- `spatialvid` reproduces SpatialVID's `utils/get_instructions.py`, quirks included, so labels match
  the released annotations: EMA smoothing of absolute positions and quaternions (float32, cold start),
  translation from the world-to-camera t columns, relative rotation of the smoothed orientations.
- `geometric` (default) labels the true camera-frame motion: translation R_i (c_{i+1} - c_i) of the
  camera centres c = -R^T t, relative rotation R_{i+1} R_i^T of the raw poses, and smooths these
  per-step motions with a symmetric exponential kernel (no lag, no cold start, no wrap-around on
  fast rotation).
"""

from __future__ import annotations

import math
import re
from typing import Literal

import numpy as np

from fourdthinker.data.vocab import CAMERA_LABEL_ABBREVIATIONS, CAMERA_LABELS, CAMERA_STAY

Rule = Literal["geometric", "spatialvid"]
RULES: tuple[Rule, ...] = ("geometric", "spatialvid")

# Motion components, the column order of `camera_step_motions`.
MOTION_COMPONENTS = ("dx", "dy", "dz", "yaw", "pitch", "roll")

# (component column, label when > +threshold, label when < -threshold), in SpatialVID's label order.
# Labels are written as in instructions.json (abbreviated rolls); `normalize_camera_label` expands them.
_COMPONENT_LABELS = (
    (2, "Dolly In", "Dolly Out"),
    (0, "Truck Right", "Truck Left"),
    (1, "Pedestal Down", "Pedestal Up"),
    (3, "Pan Left", "Pan Right"),
    (4, "Tilt Down", "Tilt Up"),
    (5, "Roll CCW", "Roll CW"),
)

# Below this |cos(pitch)| the yaw and roll axes coincide (gimbal lock); roll is then reported as 0.
_GIMBAL_EPS = 1e-9
# Pose quaternions are (near) unit; one this short carries no orientation and cannot be normalised.
_MIN_QUATERNION_NORM = 1e-6

_SEGMENT_KEY = re.compile(r"^(\d+)->(\d+)$")


class InvalidPoses(ValueError):
    """The poses cannot be labelled; the message is a reason fit for a preprocessing manifest."""


class TooFewPoses(InvalidPoses):
    """The clip has too few poses to form one labelled step after subsampling."""


# Steps in the geometric rule's running median (odd).
GEOMETRIC_MEDIAN_WINDOW = 3


def min_poses(interval: int = 2) -> int:
    """Fewest pose rows that give two subsampled poses, i.e. one labelled step."""
    return interval + 1


def label_poses(
    poses: np.ndarray,
    rule: Rule = "geometric",
    interval: int = 2,
    alpha: float = 0.1,
    translation_threshold: float = 0.02,
    rotation_threshold_deg: float = 0.5,
) -> dict[str, list[str]]:
    """Camera-motion labels of a clip in the `instructions.json` format.

    Returns {"a->b": labels} with contiguous keys from 0 to ceil(N/interval)-1; each label list holds
    at most one label per axis in the order Dolly, Truck, Pedestal, Pan, Tilt, Roll, or is ["Stay"].
    `alpha` is the smoothing factor of `spatialvid`'s EMA over absolute poses (smaller = smoother);
    `geometric` instead takes a 3-step running median of the per-step motions, which removes
    single-step noise without moving motion boundaries. Thresholds are strict and per
    subsampled step (translation in pose units, rotation in degrees).
    Raises TooFewPoses below `min_poses(interval)` rows and InvalidPoses for malformed poses.
    """
    _check_thresholds(translation_threshold, rotation_threshold_deg)
    motions = camera_step_motions(poses, rule=rule, interval=interval, alpha=alpha)
    thresholds = np.array([translation_threshold] * 3 + [math.radians(rotation_threshold_deg)] * 3)
    # Per component: +1 above +threshold, -1 below -threshold, 0 otherwise (strict, as SpatialVID).
    codes = (motions > thresholds).astype(np.int8) - (motions < -thresholds).astype(np.int8)
    return _merge_runs(codes)


def camera_step_motions(
    poses: np.ndarray, rule: Rule = "geometric", interval: int = 2, alpha: float = 0.1
) -> np.ndarray:
    """Per-step motion (S, 6) between consecutive subsampled poses, columns `MOTION_COMPONENTS`:
    translation (dx, dy, dz) and rotation angles (yaw, pitch, roll) in radians, as the rule sees them."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not a camera-motion rule; use one of {RULES}")
    if not isinstance(interval, (int, np.integer)) or isinstance(interval, bool) or interval < 1:
        raise ValueError(f"interval={interval!r} must be a positive integer (SpatialVID uses 2)")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be in (0, 1] (1 disables smoothing; SpatialVID uses 0.1)")
    poses = validate_poses(poses, interval)
    subsampled = poses[::interval]
    if rule == "spatialvid":
        return _spatialvid_motions(subsampled, alpha)
    return _geometric_motions(subsampled, alpha)


def validate_poses(poses: np.ndarray, interval: int = 2) -> np.ndarray:
    """`poses` as a float64 (N, 7) array, or InvalidPoses/TooFewPoses naming what is wrong."""
    array = np.asarray(poses)
    if array.dtype.kind not in "fiu":
        raise InvalidPoses(
            f"poses have dtype {array.dtype}; expected real numbers (float32 in SpatialVID)"
        )
    if array.ndim != 2 or array.shape[1] != 7:
        raise InvalidPoses(
            f"poses have shape {array.shape}; expected (N, 7) rows [tx, ty, tz, qx, qy, qz, qw]"
        )
    if len(array) < min_poses(interval):
        raise TooFewPoses(
            f"clip has {len(array)} poses; camera-motion labels need >= {min_poses(interval)}"
            f" (rows 0 and {interval} make the first step)"
        )
    array = array.astype(np.float64)
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad_rows.size:
        raise InvalidPoses(f"poses rows {bad_rows[:5].tolist()} contain NaN or infinity")
    zero_rows = np.flatnonzero(np.linalg.norm(array[:, 3:], axis=1) < _MIN_QUATERNION_NORM)
    if zero_rows.size:
        raise InvalidPoses(f"poses rows {zero_rows[:5].tolist()} have a zero quaternion (qx, qy, qz, qw)")
    return array


def quaternions_to_matrices(quaternions: np.ndarray) -> np.ndarray:
    """Scalar-last quaternions (..., 4) -> rotation matrices (..., 3, 3) in float64 (normalised first)."""
    q = np.asarray(quaternions, dtype=np.float64)
    x, y, z, w = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)),
        (2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)),
        (2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)),
    )
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def extrinsic_yxz_angles(rotations: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> extrinsic "yxz" Euler angles (..., 3) = (yaw, pitch, roll).

    R = Rz(roll) @ Rx(pitch) @ Ry(yaw); yaw and roll in [-pi, pi], pitch in [-pi/2, pi/2] (the
    convention of scipy's `as_euler("yxz")`, which SpatialVID uses). At gimbal lock roll is 0.
    """
    r = np.asarray(rotations, dtype=np.float64)
    # Row 2 of Rz(c) Rx(b) Ry(a) is (-cos b sin a, sin b, cos b cos a); column 1 is (-sin c cos b,
    # cos c cos b, sin b).
    cos_pitch = np.hypot(r[..., 2, 0], r[..., 2, 2])
    pitch = np.arctan2(r[..., 2, 1], cos_pitch)
    locked = cos_pitch < _GIMBAL_EPS
    yaw = np.where(
        locked, np.arctan2(r[..., 0, 2], r[..., 0, 0]), np.arctan2(-r[..., 2, 0], r[..., 2, 2])
    )
    roll = np.where(locked, 0.0, np.arctan2(-r[..., 0, 1], r[..., 1, 1]))
    return np.stack([yaw, pitch, roll], axis=-1)


def _spatialvid_motions(poses: np.ndarray, alpha: float) -> np.ndarray:
    # SpatialVID's poses.npy is float32 and its filter runs in the input dtype.
    smoothed = _spatialvid_smooth(poses.astype(np.float32), alpha)
    translations = smoothed[:, :3]
    rotations = quaternions_to_matrices(smoothed[:, 3:])
    # SpatialVID subtracts the float32 t columns, then rotates in float64: R_i^T (t_i - t_{i+1}).
    delta_t = (translations[:-1] - translations[1:]).astype(np.float64)
    steps = np.einsum("sji,sj->si", rotations[:-1], delta_t)
    relative = rotations[1:] @ np.swapaxes(rotations[:-1], -1, -2)
    return np.concatenate([steps, extrinsic_yxz_angles(relative)], axis=1)


def _spatialvid_smooth(poses: np.ndarray, alpha: float) -> np.ndarray:
    """SpatialVID's causal filter in float32: EMA of positions; normalised blend of quaternions with
    the current one negated when it lies in the other hemisphere. The first row is kept as is."""
    keep, take = np.float32(1.0 - alpha), np.float32(alpha)
    smoothed = poses.copy()
    for i in range(1, len(poses)):  # the filter is sequential by definition
        smoothed[i, :3] = take * poses[i, :3] + keep * smoothed[i - 1, :3]
        last_q, current_q = smoothed[i - 1, 3:], poses[i, 3:]
        if np.dot(last_q, current_q) < 0:
            current_q = -current_q
        blended = keep * last_q + take * current_q
        smoothed[i, 3:] = blended / np.linalg.norm(blended)
    return smoothed


def _geometric_motions(poses: np.ndarray, alpha: float) -> np.ndarray:
    rotations = quaternions_to_matrices(poses[:, 3:])
    centres = -np.einsum("nji,nj->ni", rotations, poses[:, :3])
    steps = np.einsum("sij,sj->si", rotations[:-1], centres[1:] - centres[:-1])
    relative = rotations[1:] @ np.swapaxes(rotations[:-1], -1, -2)
    motions = np.concatenate([steps, extrinsic_yxz_angles(relative)], axis=1)
    return _running_median(motions, GEOMETRIC_MEDIAN_WINDOW)


def _running_median(signal: np.ndarray, window: int) -> np.ndarray:
    """Per-column median over `window` consecutive steps (edges replicated). A median removes an
    isolated noisy step yet keeps a change of motion exactly where it happens; a mean (or EMA)
    would smear it across the neighbouring steps and mislabel both sides of the boundary."""
    half = window // 2
    if half == 0 or len(signal) < 3:
        return signal
    padded = np.pad(signal, ((half, half), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)  # (n, C, window)
    return np.median(windows, axis=-1)


def _merge_runs(codes: np.ndarray) -> dict[str, list[str]]:
    """Runs of equal per-step label codes (S, 6) -> {"a->b": labels} with b exclusive."""
    changes = np.flatnonzero(np.any(codes[1:] != codes[:-1], axis=1)) + 1
    starts = np.concatenate([[0], changes])
    ends = np.concatenate([changes, [len(codes)]])
    return {f"{start}->{end}": _labels_of(codes[start]) for start, end in zip(starts, ends)}


def _labels_of(code: np.ndarray) -> list[str]:
    labels = [
        positive if code[column] > 0 else negative
        for column, positive, negative in _COMPONENT_LABELS
        if code[column] != 0
    ]
    return labels or [CAMERA_STAY]


def _check_thresholds(translation_threshold: float, rotation_threshold_deg: float) -> None:
    if not translation_threshold >= 0:
        raise ValueError(f"translation_threshold={translation_threshold!r} must be >= 0")
    if not rotation_threshold_deg >= 0:
        raise ValueError(f"rotation_threshold_deg={rotation_threshold_deg!r} must be >= 0")


def segment_labels(instructions: dict[str, list[str]]) -> list[tuple[int, int, list[str]]]:
    """`instructions.json` content -> [(start, end, labels)] in key order, labels as written.

    Raises ValueError for a key that is not "a->b" with a < b, or labels that are not a list of strings.
    """
    segments = []
    for key, labels in instructions.items():
        match = _SEGMENT_KEY.match(key)
        if match is None or int(match[1]) >= int(match[2]):
            raise ValueError(f"instructions key {key!r} is not 'start->end' with start < end")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise ValueError(f"instructions[{key!r}] = {labels!r} is not a list of label strings")
        segments.append((int(match[1]), int(match[2]), labels))
    return segments


def normalize_camera_label(label: str) -> str:
    """SpatialVID label -> the full vocabulary name ("Roll CW" -> "Roll Clockwise"); "Stay" and full
    names are returned unchanged. Raises ValueError for anything else."""
    label = CAMERA_LABEL_ABBREVIATIONS.get(label, label)
    if label not in CAMERA_LABELS and label != CAMERA_STAY:
        raise ValueError(
            f"camera label {label!r} is not in the vocabulary {CAMERA_LABELS} (or SpatialVID's "
            f"{tuple(CAMERA_LABEL_ABBREVIATIONS)} / {CAMERA_STAY!r})"
        )
    return label
