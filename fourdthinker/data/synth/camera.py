"""Camera motion of a synthetic clip: SpatialVID motion labels -> segments -> a smooth camera path."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# label -> (twist component, axis, sign). Twists are per frame in the camera's own frame: the camera
# centre moves by W v and its camera-to-world rotation W becomes W exp([w]x). Signs follow SpatialVID on
# OpenCV axes: +z forward = Dolly In, +x = Truck Right, +y (down) = Pedestal Down, +rotation about y turns
# the view right (Pan Right), about x turns it up (Tilt Up), about z turns it clockwise seen from behind.
CAMERA_MOTIONS: dict[str, tuple[str, int, int]] = {
    "Dolly In": ("move", 2, +1), "Dolly Out": ("move", 2, -1),
    "Truck Right": ("move", 0, +1), "Truck Left": ("move", 0, -1),
    "Pedestal Down": ("move", 1, +1), "Pedestal Up": ("move", 1, -1),
    "Pan Right": ("turn", 1, +1), "Pan Left": ("turn", 1, -1),
    "Tilt Up": ("turn", 0, +1), "Tilt Down": ("turn", 0, -1),
    "Roll CW": ("turn", 2, +1), "Roll CCW": ("turn", 2, -1),
}
# SpatialVID lists labels per step in this axis order (dolly, truck, pedestal, pan, tilt, roll).
_LABEL_ORDER = ("Dolly", "Truck", "Pedestal", "Pan", "Tilt", "Roll")
STAY = "Stay"

# Per-frame magnitudes: (clip total, per-frame floor, per-frame cap). The floors keep every 2-frame
# step at >= 2x SpatialVID's thresholds (0.02 translation, 0.5 deg rotation); totals keep the scene in view.
_MOVE_RANGE = {0: (1.5, 2.2, 0.025, 0.07), 1: (0.8, 1.0, 0.021, 0.06), 2: (1.5, 2.2, 0.025, 0.07)}
_TURN_RANGE_DEG = {0: (18, 24, 0.55, 1.0), 1: (18, 24, 0.55, 1.0), 2: (25, 35, 0.6, 2.0)}
CAMERA_HEIGHT = 2.0
_MID_CLIP_PITCH_DOWN_DEG = 6.0


def ordered_labels(labels: Sequence[str]) -> list[str]:
    """Labels in SpatialVID's per-step order, so they compare equal to a labeller's output."""
    return sorted(labels, key=lambda label: _LABEL_ORDER.index(label.split()[0]))


@dataclass(frozen=True)
class CameraSegment:
    """One constant camera motion over subsampled steps [first_step, last_step)."""

    labels: tuple[str, ...]
    first_step: int
    last_step: int

    @property
    def key(self) -> str:
        return f"{self.first_step}->{self.last_step}"


def subsampled_steps(num_frames: int) -> int:
    """Number of steps between SpatialVID's every-second pose rows: ceil(N / 2) - 1."""
    return (num_frames + 1) // 2 - 1


def sample_camera_segments(rng: np.random.Generator, num_frames: int) -> list[CameraSegment]:
    """A static, single, combined (two axes at once) or two-segment camera motion."""
    steps = subsampled_steps(num_frames)
    labels = list(CAMERA_MOTIONS)

    def pick(count: int) -> tuple[str, ...]:
        axes = rng.choice(len(_LABEL_ORDER), size=count, replace=False)
        chosen = [rng.choice([x for x in labels if x.startswith(_LABEL_ORDER[a])]) for a in axes]
        return tuple(ordered_labels([str(x) for x in chosen]))

    draw = rng.random()
    if draw < 0.1:
        return [CameraSegment((STAY,), 0, steps)]
    if draw < 0.55:
        return [CameraSegment(pick(1), 0, steps)]
    if draw < 0.8:
        return [CameraSegment(pick(2), 0, steps)]
    first, second = pick(2)
    split = steps // 2
    return [CameraSegment((first,), 0, split), CameraSegment((second,), split, steps)]


def _rotation_about(axis_angle: np.ndarray) -> np.ndarray:
    """Rodrigues: the rotation by |w| radians about w."""
    angle = float(np.linalg.norm(axis_angle))
    if angle < 1e-15:
        return np.eye(3)
    k = axis_angle / angle
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _segment_twist(labels: Sequence[str], rng: np.random.Generator,
                   num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (velocity, angular velocity in radians) in the camera frame for one segment."""
    velocity, spin = np.zeros(3), np.zeros(3)
    for label in labels:
        if label == STAY:
            continue
        kind, axis, sign = CAMERA_MOTIONS[label]
        low, high, floor, cap = (_MOVE_RANGE if kind == "move" else _TURN_RANGE_DEG)[axis]
        per_frame = float(np.clip(rng.uniform(low, high) / (num_frames - 1), floor, cap))
        if kind == "move":
            velocity[axis] = sign * per_frame
        else:
            spin[axis] = sign * math.radians(per_frame)
    return velocity, spin


@dataclass(frozen=True)
class CameraPath:
    """Camera-to-world rotations (N, 3, 3) and centres (N, 3) in the gravity frame (y down)."""

    rotations: np.ndarray
    centres: np.ndarray

    @property
    def world_to_camera(self) -> tuple[np.ndarray, np.ndarray]:
        rotations = np.transpose(self.rotations, (0, 2, 1))
        return rotations, -np.einsum("nij,nj->ni", rotations, self.centres)


def camera_path(segments: Sequence[CameraSegment], num_frames: int, rng: np.random.Generator) -> CameraPath:
    """Integrate the segments' body-frame twists; the frame j -> j+1 belongs to step j // 2."""
    twists = [_segment_twist(s.labels, rng, num_frames) for s in segments]
    step_segment = np.zeros(subsampled_steps(num_frames) + 1, dtype=int)
    for index, segment in enumerate(segments):
        step_segment[segment.first_step:] = index
    moves = [twists[step_segment[min(j // 2, len(step_segment) - 1)]] for j in range(num_frames - 1)]
    # Start pitched so that the pitch is the same mid-clip for every clip: tilting clips sweep around it.
    net_tilt_up = sum(spin[0] for _, spin in moves)
    pitch_down = math.radians(_MID_CLIP_PITCH_DOWN_DEG) + 0.5 * net_tilt_up
    rotations = [_rotation_about(np.array([-pitch_down, 0.0, 0.0]))]
    centres = [np.zeros(3)]
    # A sequential integration over at most 50 frames: each pose depends on the previous one.
    for velocity, spin in moves:
        centres.append(centres[-1] + rotations[-1] @ velocity)
        rotations.append(rotations[-1] @ _rotation_about(spin))
    return CameraPath(np.stack(rotations), np.stack(centres))


def instructions(segments: Sequence[CameraSegment]) -> dict[str, list[str]]:
    """SpatialVID instructions.json content for the generating motion."""
    return {s.key: list(s.labels) for s in segments}
