"""A synthetic 4D world: rendered clips with exact cameras, object tracks, masks and a DSR benchmark.

Each clip is a ground plane with a few boxes and spheres, some static, some moving along known
(straight or gently curved) paths with known speed profiles, filmed by a pinhole camera that
performs one SpatialVID camera motion (or a combination, or two motions in sequence). The world
is written in the SpatialVID layout (see `fourdthinker.data.spatialvid`) plus ground truth:

    ground_truth/{video_id}/masks.npz     instance_ids (N, H, W) uint8 (0 = ground/sky, k = object k)
    ground_truth/{video_id}/tracks.json   camera (segments, centres, rotation_c2w, intrinsics), world
                                          up vector, objects (name, colour, shape, size, per-frame
                                          centres, box forward vectors, generating motion)
    ground_truth/benchmark.jsonl          the benchmark rows with the object ids they are about
    dsr/benchmark.parquet                 DSR columns videoID, question, options, answer, type
    dsr/videos/{video_id}.mp4             the clips (hard links where possible)

World frame = the first camera's OpenCV frame (its pose is the identity); the ground lies below.
Every answer in the benchmark is computed by `answer_from_tracks` from a tracks.json dict.
Everything is a function of `SynthConfig`: the same config gives the same files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import av
import numpy as np
import pandas as pd

from fourdthinker.atomic import atomic_output_dir
from fourdthinker.data.render import Ground, Intrinsics, SceneFrame, cast_rays, render
from fourdthinker.data.spatialvid import METADATA_CSV, ClipPaths, world_to_camera_rows, write_annotations
from fourdthinker.data.vocab import OBJECT_DIRECTIONS, SPEED_LABELS
from fourdthinker.dsr import SUBTASKS
from fourdthinker.errors import UsageError

MAX_FRAMES = 50     # SpatialVID preprocessing skips clips with more extracted frames
MIN_FRAMES = 6      # two subsampled camera steps and three thirds for the speed questions
MAX_SIDE = 4096


class SynthConfigError(UsageError):
    """A `fourdthinker synth` argument outside what the world can be built with."""


@dataclass(frozen=True)
class SynthConfig:
    """What world to build. Field names mirror the CLI flags the errors name."""

    videos: int = 20
    seed: int = 0
    width: int = 224
    height: int = 168
    seconds: float = 6
    fps: int = 5
    videos_per_group: int = 8
    questions_per_clip: int = 6
    horizontal_fov_degrees: float = 70.0

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise SynthConfigError(message)

        need(self.videos > 0, f"--videos must be positive, got {self.videos}")
        need(self.videos <= 100_000, f"--videos {self.videos} is too many; use at most 100000")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        for name, side in (("--width", self.width), ("--height", self.height)):
            need(16 <= side <= MAX_SIDE, f"{name} must be between 16 and {MAX_SIDE} pixels, got {side}")
            need(side % 2 == 0, f"{name} must be even (H.264 with 4:2:0 chroma), got {side}")
        need(self.fps > 0, f"--fps must be positive, got {self.fps}")
        need(self.seconds > 0, f"--seconds must be positive, got {self.seconds}")
        need(MIN_FRAMES <= self.num_frames <= MAX_FRAMES,
             f"--seconds {self.seconds} x --fps {self.fps} gives {self.num_frames} frames per clip; "
             f"choose values giving {MIN_FRAMES} to {MAX_FRAMES} (SpatialVID preprocessing skips longer clips)")
        need(self.videos_per_group > 0, f"videos_per_group must be positive, got {self.videos_per_group}")
        need(self.questions_per_clip >= 0, f"questions_per_clip must be >= 0, got {self.questions_per_clip}")
        need(20.0 <= self.horizontal_fov_degrees <= 120.0,
             f"horizontal_fov_degrees must be within 20..120, got {self.horizontal_fov_degrees}")

    @property
    def num_frames(self) -> int:
        return int(round(self.seconds * self.fps))

    def intrinsics(self) -> Intrinsics:
        focal = 0.5 * self.width / math.tan(math.radians(self.horizontal_fov_degrees) / 2)
        return Intrinsics(focal, focal, self.width / 2, self.height / 2, self.width, self.height)


# --- camera motion ----------------------------------------------------------------------------------

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
_CAMERA_HEIGHT = 2.0
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


# --- objects -----------------------------------------------------------------------------------------

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12), "green": (0.15, 0.65, 0.2), "blue": (0.15, 0.3, 0.9),
    "yellow": (0.95, 0.85, 0.15), "orange": (1.0, 0.5, 0.05), "purple": (0.5, 0.2, 0.7),
    "cyan": (0.1, 0.8, 0.85), "magenta": (0.9, 0.25, 0.65), "black": (0.08, 0.08, 0.08),
    "brown": (0.45, 0.27, 0.1),
}

DIRECTIONS = OBJECT_DIRECTIONS  # the reference vocabularies (data/vocab.py)
SPEEDS = SPEED_LABELS
# Normalised distance travelled s(tau), tau in [0, 1], for each generated speed profile.
_SPEED_PROFILES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Maintaining a Constant Speed": lambda t: t,
    "Speeding Up": lambda t: (t + 1.5 * t**2) / 2.5,
    "Slowing Down": lambda t: (4 * t - 1.5 * t**2) / 2.5,
    "First Speeding Up, Then Slowing Down":
        lambda t: (0.5 * t + 3 / math.pi * (1 - np.cos(math.pi * t))) / (0.5 + 6 / math.pi),
    "First Slowing Down, Then Speeding Up":
        lambda t: (3.5 * t - 3 / math.pi * (1 - np.cos(math.pi * t))) / (3.5 - 6 / math.pi),
}
_GROUND_DIRECTIONS = ("Moving Left", "Moving Right", "Moving Toward Camera", "Moving Away from Camera")
_GRAVITY_UP = np.array([0.0, -1.0, 0.0])


@dataclass
class SceneObject:
    """One object in the gravity frame (y down, ground at y = camera height)."""

    id: int
    colour: str
    shape: str                       # "sphere" | "box"
    size: np.ndarray                 # (1,) radius or (3,) half extents (right, height, front)
    centres: np.ndarray              # (N, 3)
    forward: np.ndarray | None       # (N, 3) box front direction, horizontal
    direction: str                   # generating motion
    speed: str | None

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def bound(self) -> float:
        return float(np.linalg.norm(self.size))


def _view_basis(anchor: np.ndarray, viewer: np.ndarray, up: np.ndarray) -> np.ndarray:
    """(3, 3) rows: right, up and away directions at `anchor` as seen from `viewer`."""
    away = anchor - viewer
    away = away / np.linalg.norm(away)
    right = np.cross(away, up)
    right = right / np.linalg.norm(right)
    return np.stack([right, np.cross(right, away), away])


def _direction_vector(label: str, basis: np.ndarray, on_ground: bool) -> np.ndarray:
    right, up, away = basis
    if label in ("Moving Toward Camera", "Moving Away from Camera"):
        if on_ground:
            away = away - (away @ _GRAVITY_UP) * _GRAVITY_UP
            away = away / np.linalg.norm(away)
        return -away if "Toward" in label else away
    horizontal = -right if "Left" in label else right if "Right" in label else np.zeros(3)
    vertical = up if "Up" in label else -up if "Down" in label else np.zeros(3)
    vector = horizontal + vertical
    return vector / np.linalg.norm(vector)


def _rotate(rotation: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Rows rotated by `rotation`; einsum rather than BLAS so results are bit-identical run to run."""
    return np.einsum("ij,nj->ni", rotation, points)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _sample_object(rng: np.random.Generator, object_id: int, colour: str, shape: str, dynamic: bool,
                   camera: CameraPath, intrinsics: Intrinsics, num_frames: int) -> SceneObject | None:
    """One candidate object; None when the drawn placement is geometrically impossible."""
    frame = int(rng.integers(num_frames))
    pixel = np.array([rng.uniform(0.2, 0.8) * intrinsics.width, rng.uniform(0.35, 0.75) * intrinsics.height])
    ray = camera.rotations[frame] @ np.array([(pixel[0] - intrinsics.cx) / intrinsics.fx,
                                              (pixel[1] - intrinsics.cy) / intrinsics.fy, 1.0])
    origin = camera.centres[frame]
    floating = shape == "sphere" and dynamic
    if shape == "sphere":
        size = np.array([rng.uniform(0.35, 0.6)])
        rest_height = size[0]
    else:
        size = np.array([rng.uniform(0.3, 0.45), rng.uniform(0.3, 0.45), rng.uniform(0.5, 0.7)])
        rest_height = size[1]
    if floating:
        middle = origin + rng.uniform(4.5, 9.0) * ray
        if not _CAMERA_HEIGHT - 3.5 < middle[1] < _CAMERA_HEIGHT - size[0] - 0.3:
            return None
    else:
        resting_y = _CAMERA_HEIGHT - rest_height
        if ray[1] <= 1e-6:
            return None
        middle = origin + (resting_y - origin[1]) / ray[1] * ray
        if not 3.5 < np.linalg.norm(middle - origin) < 11.0:
            return None

    times = np.linspace(0.0, 1.0, num_frames)
    if dynamic:
        direction = str(rng.choice(DIRECTIONS[:-1] if floating else _GROUND_DIRECTIONS))
        speed = str(rng.choice(list(_SPEED_PROFILES)))
        heading = _direction_vector(direction, _view_basis(middle, camera.centres[0], _GRAVITY_UP), not floating)
        length = rng.uniform(1.2, 2.6)
        side = np.cross(heading, _GRAVITY_UP)
        side = side / np.linalg.norm(side) if np.linalg.norm(side) > 1e-6 else np.array([1.0, 0.0, 0.0])
        bend = rng.uniform(-0.06, 0.06) * length if rng.random() < 0.5 else 0.0
        s = _SPEED_PROFILES[speed](times)[:, None]
        centres = middle + (s - 0.5) * length * heading + 4 * s * (1 - s) * bend * side
        tangent = length * heading + 4 * (1 - 2 * s) * bend * side
    else:
        direction, speed = "Stationary", None
        centres = np.repeat(middle[None], num_frames, axis=0)
        yaw = rng.uniform(0, 2 * math.pi)
        tangent = np.repeat(np.array([[math.sin(yaw), 0.0, math.cos(yaw)]]), num_frames, axis=0)
    forward = None
    if shape == "box":
        horizontal = tangent - np.einsum("ni,i->n", tangent, _GRAVITY_UP)[:, None] * _GRAVITY_UP
        forward = _unit(horizontal)
    return SceneObject(object_id, colour, shape, size, centres, forward, direction, speed)


def _in_view(obj: SceneObject, camera: CameraPath, intrinsics: Intrinsics, margin_px: float = 3.0) -> bool:
    rotations, translations = camera.world_to_camera
    points = np.einsum("nij,nj->ni", rotations, obj.centres) + translations
    if np.any(points[:, 2] < 1.0 + obj.bound):
        return False
    u = intrinsics.fx * points[:, 0] / points[:, 2] + intrinsics.cx
    v = intrinsics.fy * points[:, 1] / points[:, 2] + intrinsics.cy
    return bool(np.all((u >= margin_px) & (u <= intrinsics.width - 1 - margin_px)
                       & (v >= margin_px) & (v <= intrinsics.height - 1 - margin_px)))


def _centres_unoccluded(objects: Sequence[SceneObject], camera: CameraPath, ground: Ground) -> bool:
    """Every object's centre is seen on that object in every frame (no other object in front of it)."""
    expected = np.array([o.id for o in objects])
    for frame in range(len(camera.centres)):
        scene = _scene_frame(objects, frame, ground, np.eye(3))
        dirs = np.stack([o.centres[frame] for o in objects]) - camera.centres[frame]
        if not np.array_equal(cast_rays(camera.centres[frame], dirs, scene).ids, expected):
            return False
    return True


def _motion_recovered(obj: SceneObject, camera: CameraPath, fps: int) -> bool:
    """The generating labels are what the benchmark's rules read back from the track."""
    if obj.speed is None:
        return True
    direction = classify_direction(obj.centres[-1] - obj.centres[0], obj.centres[0], camera.centres[0],
                                   _GRAVITY_UP)
    return direction == obj.direction and speed_profile(track_speeds(obj.centres, fps)) == obj.speed


def _gravity_ground(offset_axes: np.ndarray = np.eye(3)) -> Ground:
    return Ground(normal=offset_axes @ _GRAVITY_UP, offset=-_CAMERA_HEIGHT,
                  axes=np.stack([offset_axes[:, 0], offset_axes[:, 2]]), cell=1.0,
                  colours=np.array([[0.62, 0.58, 0.5], [0.36, 0.33, 0.28]]))


def _scene_frame(objects: Sequence[SceneObject], frame: int, ground: Ground, to_world: np.ndarray) -> SceneFrame:
    """The objects at one frame, mapped into a frame whose coordinates are `to_world @ X`."""
    spheres = [o for o in objects if o.shape == "sphere"]
    boxes = [o for o in objects if o.shape == "box"]

    def box_rotation(o: SceneObject) -> np.ndarray:
        front = o.forward[frame]
        right = np.cross(front, _GRAVITY_UP)          # local x = right, y = down, z = front
        return to_world @ np.stack([right, -_GRAVITY_UP, front], axis=1)

    return SceneFrame(
        sphere_centres=np.array([to_world @ o.centres[frame] for o in spheres]).reshape(-1, 3),
        sphere_radii=np.array([o.size[0] for o in spheres]),
        sphere_colours=np.array([PALETTE[o.colour] for o in spheres]).reshape(-1, 3),
        sphere_ids=np.array([o.id for o in spheres], dtype=np.int64),
        box_centres=np.array([to_world @ o.centres[frame] for o in boxes]).reshape(-1, 3),
        box_rotations=np.array([box_rotation(o) for o in boxes]).reshape(-1, 3, 3),
        box_half_extents=np.array([o.size for o in boxes]).reshape(-1, 3),
        box_colours=np.array([PALETTE[o.colour] for o in boxes]).reshape(-1, 3),
        box_ids=np.array([o.id for o in boxes], dtype=np.int64),
        ground=ground,
        light=to_world @ _unit(np.array([-0.35, -1.0, -0.45])),
        sky_colours=np.array([[0.78, 0.85, 0.95], [0.35, 0.55, 0.9]]),
    )


def sample_objects(rng: np.random.Generator, camera: CameraPath, intrinsics: Intrinsics, num_frames: int,
                   fps: int, attempts: int = 120) -> list[SceneObject] | None:
    """2-3 moving and 2-3 static objects (at least one box), all visible and apart in every frame."""
    n_dynamic, n_static = int(rng.integers(2, 4)), int(rng.integers(2, 4))
    colours = [str(c) for c in rng.choice(list(PALETTE), size=n_dynamic + n_static, replace=False)]
    shapes = ["box"] + [str(rng.choice(["sphere", "box"])) for _ in range(n_dynamic + n_static - 1)]
    dynamic_flags = [False] + [True] * n_dynamic + [False] * (n_static - 1)
    ground = _gravity_ground()
    objects: list[SceneObject] = []
    for index, (colour, shape, dynamic) in enumerate(zip(colours, shapes, dynamic_flags)):
        for _ in range(attempts):
            candidate = _sample_object(rng, index + 1, colour, shape, dynamic, camera, intrinsics, num_frames)
            if candidate is None or not _in_view(candidate, camera, intrinsics):
                continue
            apart = all(np.min(np.linalg.norm(candidate.centres - o.centres, axis=1)) > candidate.bound + o.bound + 0.25
                        for o in objects)
            if (apart and _motion_recovered(candidate, camera, fps)
                    and _centres_unoccluded(objects + [candidate], camera, ground)):
                objects.append(candidate)
                break
        else:
            return None
    return objects


# --- one clip ----------------------------------------------------------------------------------------

@dataclass
class Clip:
    group: str
    video_id: str
    segments: list[CameraSegment]
    camera: CameraPath                 # gravity frame
    objects: list[SceneObject]         # gravity frame
    to_world: np.ndarray               # gravity -> world (first camera) rotation
    num_frames: int
    fps: int
    intrinsics: Intrinsics
    frames_rgb: np.ndarray = field(default=None, repr=False)
    instance_ids: np.ndarray = field(default=None, repr=False)

    def world_to_camera(self) -> tuple[np.ndarray, np.ndarray]:
        """World-to-camera rotations and translations in the world (= first camera) frame."""
        c2w = np.einsum("ij,njk->nik", self.to_world, self.camera.rotations)
        rotations = np.transpose(c2w, (0, 2, 1))
        centres = _rotate(self.to_world, self.camera.centres)
        return rotations, -np.einsum("nij,nj->ni", rotations, centres)


def make_clip(cfg: SynthConfig, index: int, scene_attempts: int = 50) -> Clip:
    """Sample and render clip `index`; its randomness depends only on (cfg.seed, index)."""
    rng = np.random.default_rng([cfg.seed, index])
    n, intrinsics = cfg.num_frames, cfg.intrinsics()
    for _ in range(scene_attempts):
        segments = sample_camera_segments(rng, n)
        camera = camera_path(segments, n, rng)
        objects = sample_objects(rng, camera, intrinsics, n, cfg.fps)
        if objects is not None:
            break
    else:
        raise RuntimeError(f"clip {index}: no valid scene in {scene_attempts} attempts; "
                           f"try a wider horizontal_fov_degrees or fewer frames")
    group = f"group_{index // cfg.videos_per_group:04d}"
    clip = Clip(group, f"clip_{index:04d}", segments, camera, objects,
                to_world=camera.rotations[0].T, num_frames=n, fps=cfg.fps, intrinsics=intrinsics)
    ground = _gravity_ground(clip.to_world)
    rotations, translations = clip.world_to_camera()
    frames = [render(_scene_frame(objects, k, ground, clip.to_world), intrinsics, rotations[k], translations[k])
              for k in range(n)]
    clip.frames_rgb = np.stack([f.rgb for f in frames])
    clip.instance_ids = np.stack([f.instance_ids for f in frames])
    return clip


def tracks_document(clip: Clip) -> dict:
    """The clip's ground truth in world coordinates, as written to tracks.json."""
    to_world = clip.to_world
    k = clip.intrinsics
    objects = []
    for o in clip.objects:
        entry = {"id": o.id, "name": o.name, "colour": o.colour, "rgb": list(PALETTE[o.colour]),
                 "shape": o.shape, "dynamic": o.speed is not None, "direction": o.direction,
                 "speed_profile": o.speed, "centres": _rotate(to_world, o.centres).tolist()}
        if o.shape == "sphere":
            entry["radius"] = float(o.size[0])
        else:
            entry["half_extents"] = {"right": float(o.size[0]), "height": float(o.size[1]),
                                     "front": float(o.size[2])}
            entry["forward"] = _rotate(to_world, o.forward).tolist()
        objects.append(entry)
    return {
        "video_id": clip.video_id, "group": clip.group, "fps": clip.fps,
        "num_frames": clip.num_frames, "width": k.width, "height": k.height,
        "up": (to_world @ _GRAVITY_UP).tolist(),
        "camera": {
            "motion": [list(s.labels) for s in clip.segments],
            "segments": [{"steps": [s.first_step, s.last_step], "pose_rows": [2 * s.first_step, 2 * s.last_step],
                          "labels": list(s.labels)} for s in clip.segments],
            "intrinsics": {"fx": k.fx, "fy": k.fy, "cx": k.cx, "cy": k.cy},
            "centres": _rotate(to_world, clip.camera.centres).tolist(),
            "rotation_c2w": np.einsum("ij,njk->nik", to_world, clip.camera.rotations).tolist(),
        },
        "objects": objects,
    }


def caption(clip: Clip) -> dict:
    names = ", ".join(f"a {o.name}" for o in clip.objects)
    motion = " then ".join(" and ".join(s.labels) for s in clip.segments).lower()
    moving = " ".join(f"The {o.name} is {o.direction.lower()}, {o.speed.lower()}."
                      for o in clip.objects if o.speed is not None)
    return {"SceneSummary": f"A checkered ground with {names}. Camera: {motion}. {moving}"}


def encode_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Lossless H.264 (libx264, yuv420p) at `fps`, one encoded frame per array frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # Lossless (qp 0): x264's lossy decisions varied now and then between runs, which made the
        # decoded pixels differ; lossless output decodes to the same yuv420p pixels every time.
        stream.options = {"qp": "0", "preset": "veryfast"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def write_clip(root: Path, clip: Clip) -> dict:
    """Write one clip's video, annotations and ground truth under `root`; return its tracks document."""
    paths = ClipPaths(root, clip.group, clip.video_id)
    encode_mp4(paths.video, clip.frames_rgb, clip.fps)
    rotations, translations = clip.world_to_camera()
    k = clip.intrinsics
    frame_numbers = np.arange(clip.num_frames)
    write_annotations(
        paths.annotations,
        poses=world_to_camera_rows(rotations, translations),
        intrinsics=np.tile(np.array([k.fx, k.fy, k.cx, k.cy], dtype=np.float32), (clip.num_frames, 1)),
        indexes=np.stack([frame_numbers, frame_numbers], axis=1),
        instructions=instructions(clip.segments),
        caption=caption(clip),
    )
    truth = root / "ground_truth" / paths.video_id
    truth.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(truth / "masks.npz", instance_ids=clip.instance_ids,
                        object_ids=np.array([o.id for o in clip.objects], dtype=np.uint8))
    document = tracks_document(clip)
    (truth / "tracks.json").write_text(json.dumps(document))
    return document


# --- benchmark geometry (all on tracks.json dicts) ---------------------------------------------------

DSR_KEYS = tuple(SUBTASKS)  # the benchmark's 13 sub-task keys, in the published order
STILL = 0.15            # world units: displacements below this are "Stationary"
RESTING_SPEED = 0.02    # world units per second: below this an object "does not move"
_SECTOR_TOLERANCE_DEG = 12.5
_FACING_COS = math.cos(math.radians(35))
_SCREEN_SECTORS = ("Moving Right", "Moving Right-Up", "Moving Up", "Moving Left-Up", "Moving Left",
                   "Moving Left-Down", "Moving Down", "Moving Right-Down")


def classify_direction(displacement: np.ndarray, anchor: np.ndarray, viewer: np.ndarray,
                       up: np.ndarray) -> str | None:
    """One of DIRECTIONS for a 3D displacement starting at `anchor`, seen from `viewer`; None if ambiguous.

    Toward/away when the along-sight part is at least twice the sideways part; otherwise one of eight
    45-degree screen sectors (right, right-up, ...) when the sideways part dominates by 2x and the angle is
    clear of a sector boundary.
    """
    magnitude = float(np.linalg.norm(displacement))
    if magnitude < STILL:
        return "Stationary"
    if magnitude < 2 * STILL:
        return None
    right, upward, away = _view_basis(anchor, viewer, up) @ displacement
    sideways = math.hypot(right, upward)
    if abs(away) >= 2 * sideways:
        return "Moving Away from Camera" if away > 0 else "Moving Toward Camera"
    if sideways < 2 * abs(away):
        return None
    angle = math.degrees(math.atan2(upward, right)) % 360
    sector = round(angle / 45)
    if abs(angle - 45 * sector) > _SECTOR_TOLERANCE_DEG:
        return None
    return _SCREEN_SECTORS[sector % 8]


def track_speeds(centres: np.ndarray, fps: float) -> np.ndarray:
    """(N-1,) speeds in world units per second between consecutive frames."""
    return np.linalg.norm(np.diff(centres, axis=0), axis=1) * fps


def speed_profile(speeds: np.ndarray) -> str | None:
    """One of SPEEDS from the mean speed of each third of the clip; None if not moving or unclear."""
    first, middle, last = (float(chunk.mean()) for chunk in np.array_split(speeds, 3))
    if max(first, middle, last) < RESTING_SPEED:
        return None
    if middle > 1.3 * max(first, last):
        return "First Speeding Up, Then Slowing Down"
    if middle < min(first, last) / 1.3:
        return "First Slowing Down, Then Speeding Up"
    if last > 1.4 * first and first <= 1.05 * middle <= 1.1 * last:
        return "Speeding Up"
    if first > 1.4 * last and last <= 1.05 * middle <= 1.1 * first:
        return "Slowing Down"
    if max(first, middle, last) < 1.2 * min(first, middle, last):
        return "Maintaining a Constant Speed"
    return None


def distance_trend(distances: np.ndarray) -> str | None:
    """"closer", "farther", "same", "closer-then-farther", "farther-then-closer" or None if unclear."""
    start, end = float(distances[0]), float(distances[-1])
    scale = max(start, end)
    dip = distances.min() < min(start, end) - 0.12 * scale
    peak = distances.max() > max(start, end) + 0.12 * scale
    if dip and peak:
        return None
    if dip:
        return "closer-then-farther"
    if peak:
        return "farther-then-closer"
    change = (end - start) / scale
    if change < -0.12:
        return "closer"
    if change > 0.12:
        return "farther"
    if (distances.max() - distances.min()) / scale < 0.05:
        return "same"
    return None


def _horizontal_unit(vector: np.ndarray, up: np.ndarray) -> np.ndarray | None:
    flat = vector - (vector @ up) * up
    norm = np.linalg.norm(flat)
    return flat / norm if norm > 1e-6 else None


def facing_side(forward: np.ndarray, toward: np.ndarray, up: np.ndarray) -> str | None:
    """Where `toward` lies for something facing `forward`: "front", "back", "left", "right" or None."""
    f, w = _horizontal_unit(forward, up), _horizontal_unit(toward, up)
    if f is None or w is None:
        return None
    right = np.cross(f, up)
    for side, cosine in (("front", w @ f), ("back", -(w @ f)), ("right", w @ right), ("left", -(w @ right))):
        if cosine > _FACING_COS:
            return side
    return None


class _Tracks:
    """Array views of a tracks.json document."""

    def __init__(self, doc: Mapping):
        self.doc = doc
        self.fps = float(doc["fps"])
        self.up = np.asarray(doc["up"], dtype=np.float64)
        self.camera_centres = np.asarray(doc["camera"]["centres"], dtype=np.float64)
        self.camera_c2w = np.asarray(doc["camera"]["rotation_c2w"], dtype=np.float64)
        self.objects = {o["id"]: o for o in doc["objects"]}

    def centres(self, object_id: int) -> np.ndarray:
        return np.asarray(self.objects[object_id]["centres"], dtype=np.float64)

    def name(self, object_id: int) -> str:
        return self.objects[object_id]["name"]

    def mean_speed(self, object_id: int) -> float:
        return float(track_speeds(self.centres(object_id), self.fps).mean())

    def final_velocity(self, object_id: int) -> np.ndarray:
        """Mean velocity (units per second) over the last quarter of the clip."""
        centres = self.centres(object_id)
        span = max(2, (len(centres) - 1) // 4)
        return (centres[-1] - centres[-1 - span]) * self.fps / span


_DISTANCE_TO_CAMERA = {"closer": "Getting Closer to Camera", "farther": "Getting Farther from Camera",
                       "same": "Maintaining Roughly the Same Distance",
                       "closer-then-farther": "First Getting Closer, Then Farther",
                       "farther-then-closer": "First Getting Farther, Then Closer"}
_DISTANCE_BETWEEN = {"closer": "They Get Closer to Each Other", "farther": "They Get Farther Apart",
                     "same": "Their Distance Stays Roughly the Same",
                     "closer-then-farther": "They First Get Closer, Then Farther Apart",
                     "farther-then-closer": "They First Get Farther Apart, Then Closer"}
_CAMERA_FACING = {"back": "Toward the camera", "front": "Away from the camera",
                  "right": "To the camera's right", "left": "To the camera's left"}
_RELATIVE_PLACE = {"front": "In front of it", "back": "Behind it", "right": "To its right", "left": "To its left"}
_HALVES = ("In the first half", "In the second half", "About equally fast in both halves",
           "It does not move at all")
_PREDICTED_GAP = ("They will get closer to each other", "They will get farther apart",
                  "Their distance will stay about the same", "They will first get closer, then farther apart")


def _abs_dis(t: _Tracks, a: int) -> str | None:
    trend = distance_trend(np.linalg.norm(t.centres(a) - t.camera_centres, axis=1))
    return _DISTANCE_TO_CAMERA.get(trend)


def _abs_dir(t: _Tracks, a: int) -> str | None:
    c = t.centres(a)
    return classify_direction(c[-1] - c[0], c[0], t.camera_centres[0], t.up)


def _abs_ori(t: _Tracks, a: int) -> str | None:
    forward = t.objects[a].get("forward")
    if forward is None:
        return None
    # Classify the front against the camera's line of sight: along it is facing away, against it toward.
    line_of_sight = t.centres(a)[0] - t.camera_centres[0]
    return _CAMERA_FACING.get(facing_side(line_of_sight, np.asarray(forward[0]), t.up))


def _abs_spd(t: _Tracks, a: int) -> str | None:
    return speed_profile(track_speeds(t.centres(a), t.fps))


def _abs_spd_comp(t: _Tracks, a: int) -> str | None:
    first, second = (float(h.mean()) for h in np.array_split(track_speeds(t.centres(a), t.fps), 2))
    if max(first, second) < RESTING_SPEED:
        return _HALVES[3]
    if first > 1.25 * second:
        return _HALVES[0]
    if second > 1.25 * first:
        return _HALVES[1]
    if max(first, second) < 1.1 * min(first, second):
        return _HALVES[2]
    return None


def _abs_dir_pred(t: _Tracks, a: int) -> str | None:
    # Extrapolated over one clip length, seen from where the camera ends.
    duration = (len(t.camera_centres) - 1) / t.fps
    return classify_direction(t.final_velocity(a) * duration, t.centres(a)[-1], t.camera_centres[-1], t.up)


def _rel_dis(t: _Tracks, a: int, b: int) -> str | None:
    return _DISTANCE_BETWEEN.get(distance_trend(np.linalg.norm(t.centres(a) - t.centres(b), axis=1)))


def _rel_dir(t: _Tracks, a: int, b: int) -> str | None:
    ca, cb = t.centres(a), t.centres(b)
    if np.linalg.norm(ca[-1] - ca[0]) < STILL:      # "a relative to b" is asked about a moving a
        return None
    return classify_direction((ca[-1] - cb[-1]) - (ca[0] - cb[0]), ca[0], t.camera_centres[0], t.up)


def _rel_ori(t: _Tracks, a: int, b: int) -> str | None:
    forward = t.objects[a].get("forward")
    if forward is None:
        return None
    side = facing_side(np.asarray(forward[0]), t.centres(b)[0] - t.centres(a)[0], t.up)
    return _RELATIVE_PLACE.get(side)


def _rel_spd(t: _Tracks, *candidates: int) -> str | None:
    speeds = sorted(((t.mean_speed(c), c) for c in candidates), reverse=True)
    if speeds[0][0] < 1.3 * speeds[1][0]:
        return None
    return f"The {t.name(speeds[0][1])}"


def _rel_spd_comp(t: _Tracks, a: int, b: int) -> str | None:
    sa, sb = t.mean_speed(a), t.mean_speed(b)
    options = _rel_spd_comp_options(t, a, b)
    if max(sa, sb) < RESTING_SPEED:
        return options[3]
    if min(sa, sb) < RESTING_SPEED or max(sa, sb) >= 1.3 * min(sa, sb):
        return options[0] if sa > sb else options[1]
    return options[2] if max(sa, sb) < 1.1 * min(sa, sb) else None


def _rel_spd_comp_options(t: _Tracks, a: int, b: int) -> tuple[str, ...]:
    na, nb = t.name(a), t.name(b)
    return (f"The {na} is faster than the {nb}", f"The {na} is slower than the {nb}",
            "They move at about the same speed", "Neither of them moves")


def _rel_dir_pred(t: _Tracks, a: int, b: int) -> str | None:
    gap = t.centres(a)[-1] - t.centres(b)[-1]
    relative_velocity = t.final_velocity(a) - t.final_velocity(b)
    if np.linalg.norm(relative_velocity) < RESTING_SPEED:
        return _PREDICTED_GAP[2]
    rate = float(gap @ relative_velocity / np.linalg.norm(gap))
    if rate < -0.1:
        return _PREDICTED_GAP[0]
    if rate > 0.1:
        return _PREDICTED_GAP[1]
    return None


def _non_temp(t: _Tracks, *candidates: int) -> str | None:
    """The candidate seen furthest left in the first frame (smallest x/z in camera coordinates)."""
    w2c = t.camera_c2w[0].T
    points = np.stack([w2c @ (t.centres(c)[0] - t.camera_centres[0]) for c in candidates])
    slopes = points[:, 0] / points[:, 2]
    order = np.argsort(slopes)
    if slopes[order[1]] - slopes[order[0]] < 0.05:
        return None
    return f"The {t.name(candidates[order[0]])}"


@dataclass(frozen=True)
class QuestionFamily:
    key: str
    arity: int                         # objects the question names (4: pick one among four)
    subject: str                       # what the first object must be: "any", "moving" or "box"
    template: str
    answer: Callable[..., str | None]
    options: tuple[str, ...] | Callable[..., tuple[str, ...]] | None = None   # None: the candidates


FAMILIES: dict[str, QuestionFamily] = {f.key: f for f in (
    QuestionFamily("abs_dis", 1, "any", "How does the distance between the camera and the {a} change "
                   "during the video?", _abs_dis, tuple(_DISTANCE_TO_CAMERA.values())),
    QuestionFamily("abs_dir", 1, "moving", "Seen from where the camera starts, in which direction does the "
                   "{a} move over the video?", _abs_dir, DIRECTIONS),
    QuestionFamily("abs_ori", 1, "box", "In the first frame, which way is the {a} facing? (Its lighter "
                   "face is its front.)", _abs_ori, tuple(_CAMERA_FACING.values())),
    QuestionFamily("abs_spd", 1, "moving", "How does the speed of the {a} change during the video?",
                   _abs_spd, SPEEDS),
    QuestionFamily("abs_spd_comp", 1, "any", "When does the {a} move faster: in the first half or in the "
                   "second half of the video?", _abs_spd_comp, _HALVES),
    QuestionFamily("abs_dir_pred", 1, "moving", "If the {a} keeps moving as it does at the end of the video, "
                   "in which direction will it move next, seen from where the camera ends?",
                   _abs_dir_pred, DIRECTIONS),
    QuestionFamily("rel_dis", 2, "any", "How does the distance between the {a} and the {b} change during "
                   "the video?", _rel_dis, tuple(_DISTANCE_BETWEEN.values())),
    QuestionFamily("rel_dir", 2, "moving", "Seen from where the camera starts, in which direction does the "
                   "{a} move relative to the {b}?", _rel_dir, DIRECTIONS),
    QuestionFamily("rel_ori", 2, "box", "In the first frame, where is the {b} from the point of view of the "
                   "{a}? (The {a}'s lighter face is its front.)", _rel_ori, tuple(_RELATIVE_PLACE.values())),
    QuestionFamily("rel_spd", 4, "any", "Which of these objects moves fastest on average during the video?",
                   _rel_spd),
    QuestionFamily("rel_spd_comp", 2, "any", "How does the average speed of the {a} compare with that of "
                   "the {b}?", _rel_spd_comp, _rel_spd_comp_options),
    QuestionFamily("rel_dir_pred", 2, "moving", "If the {a} and the {b} keep moving as they do at the end of "
                   "the video, what happens to the distance between them next?", _rel_dir_pred, _PREDICTED_GAP),
    QuestionFamily("non_temp", 4, "any", "In the first frame, which of these objects appears furthest to "
                   "the left?", _non_temp),
)}


def answer_from_tracks(kind: str, tracks: Mapping, subjects: Sequence[int]) -> str | None:
    """The correct option text of a `kind` question about object ids `subjects`; None if ambiguous."""
    if kind not in FAMILIES:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {DSR_KEYS}")
    return FAMILIES[kind].answer(_Tracks(tracks), *subjects)


def option_texts(kind: str, tracks: Mapping, subjects: Sequence[int]) -> tuple[str, ...]:
    """Every option a `kind` question about `subjects` may offer (the answer among them)."""
    family, t = FAMILIES[kind], _Tracks(tracks)
    if family.options is None:
        return tuple(f"The {t.name(s)}" for s in subjects)
    if callable(family.options):
        return family.options(t, *subjects)
    return family.options


@dataclass(frozen=True)
class Question:
    video_id: str
    kind: str
    question: str
    subjects: tuple[int, ...]
    answer: str
    distractors: tuple[str, ...]


def _subject_candidates(family: QuestionFamily, t: _Tracks, rng: np.random.Generator) -> list[tuple[int, ...]]:
    ids = list(t.objects)
    eligible = {"any": ids, "moving": [i for i in ids if t.objects[i]["dynamic"]],
                "box": [i for i in ids if t.objects[i]["shape"] == "box"]}[family.subject]
    if family.arity == 1:
        candidates = [(a,) for a in eligible]
    elif family.arity == 2:
        candidates = [(a, b) for a in eligible for b in ids if b != a]
    else:
        candidates = list(combinations(ids, family.arity))
    return [candidates[i] for i in rng.permutation(len(candidates))]


def clip_questions(tracks: Mapping, rng: np.random.Generator, count: int, first_key: int) -> list[Question]:
    """Up to `count` unambiguous questions, trying keys in DSR order from `first_key` (for balance)."""
    t = _Tracks(tracks)
    questions: list[Question] = []
    for offset in range(len(DSR_KEYS)):
        if len(questions) == count:
            break
        family = FAMILIES[DSR_KEYS[(first_key + offset) % len(DSR_KEYS)]]
        for subjects in _subject_candidates(family, t, rng):
            answer = family.answer(t, *subjects)
            if answer is None:
                continue
            pool = [o for o in option_texts(family.key, tracks, subjects) if o != answer]
            distractors = tuple(pool[i] for i in rng.permutation(len(pool))[:3])
            names = {"a": t.name(subjects[0]), "b": t.name(subjects[1]) if len(subjects) > 1 else ""}
            questions.append(Question(tracks["video_id"], family.key, family.template.format(**names),
                                      tuple(int(s) for s in subjects), answer, distractors))
            break
    return questions


def benchmark_rows(questions: Sequence[Question], rng: np.random.Generator) -> list[dict]:
    """DSR rows; gold letters are dealt from shuffled ABCD blocks so that each letter is as common."""
    letters = "ABCD"
    gold = np.concatenate([rng.permutation(4) for _ in range(-(-len(questions) // 4))])
    rows = []
    for q, slot in zip(questions, gold):
        texts = list(q.distractors)
        texts.insert(int(slot), q.answer)
        rows.append({"videoID": q.video_id, "question": q.question,
                     "options": [f"{letter}. {text}" for letter, text in zip(letters, texts)],
                     "answer": letters[slot], "type": q.kind})
    return rows


# --- the world ----------------------------------------------------------------------------------------

def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:        # another filesystem or no hard links: a copy is equally valid
        shutil.copyfile(source, target)


def build_world(out: str | Path, cfg: SynthConfig, overwrite: bool = False) -> str:
    """Render `cfg.videos` clips into `out` (atomically) and return a one-line summary."""
    rows = _write_world(out, cfg, overwrite)
    kinds = len({row["type"] for row in rows})
    groups = -(-cfg.videos // cfg.videos_per_group)
    return (f"synthetic world: {cfg.videos} clips in {groups} groups ({cfg.num_frames} frames, "
            f"{cfg.width}x{cfg.height} at {cfg.fps} fps), {len(rows)} benchmark questions over "
            f"{kinds} sub-tasks -> {Path(out)}")


def _write_world(out: str | Path, cfg: SynthConfig, overwrite: bool) -> list[dict]:
    with atomic_output_dir(out, overwrite) as root:
        metadata, questions = [], []
        (root / "dsr" / "videos").mkdir(parents=True)
        for index in range(cfg.videos):
            clip = make_clip(cfg, index)
            tracks = write_clip(root, clip)
            paths = ClipPaths(root, clip.group, clip.video_id)
            _link_or_copy(paths.video, root / "dsr" / "videos" / f"{paths.video_id}.mp4")
            metadata.append({"id": paths.video_id, "video path": paths.video_path_column,
                             "group": paths.group, "num frames": clip.num_frames, "fps": cfg.fps,
                             "width": cfg.width, "height": cfg.height,
                             "duration": (clip.num_frames) / cfg.fps,
                             "camera motion": json.dumps([list(s.labels) for s in clip.segments])})
            rng = np.random.default_rng([cfg.seed, index, 1])
            questions += clip_questions(tracks, rng, cfg.questions_per_clip,
                                        first_key=index * cfg.questions_per_clip)
        pd.DataFrame(metadata).to_csv(root / METADATA_CSV, index=False)
        rows = benchmark_rows(questions, np.random.default_rng([cfg.seed, cfg.videos, 2]))
        pd.DataFrame(rows, columns=["videoID", "question", "options", "answer", "type"]).to_parquet(
            root / "dsr" / "benchmark.parquet", index=False)
        with open(root / "ground_truth" / "benchmark.jsonl", "w", encoding="utf-8") as f:
            for q, row in zip(questions, rows):
                f.write(json.dumps({**row, "subjects": list(q.subjects), "answer_text": q.answer}) + "\n")
    return rows
