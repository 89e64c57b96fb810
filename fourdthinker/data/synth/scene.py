"""Objects of a synthetic clip: boxes and spheres, static or moving along known paths, kept in view and unoccluded."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fourdthinker.data.render import Ground, Intrinsics, SceneFrame, cast_rays
from fourdthinker.data.synth.camera import CAMERA_HEIGHT, CameraPath
from fourdthinker.data.synth.geometry import DIRECTIONS, classify_direction, speed_profile, track_speeds, view_basis

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12), "green": (0.15, 0.65, 0.2), "blue": (0.15, 0.3, 0.9),
    "yellow": (0.95, 0.85, 0.15), "orange": (1.0, 0.5, 0.05), "purple": (0.5, 0.2, 0.7),
    "cyan": (0.1, 0.8, 0.85), "magenta": (0.9, 0.25, 0.65), "black": (0.08, 0.08, 0.08),
    "brown": (0.45, 0.27, 0.1),
}

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
GRAVITY_UP = np.array([0.0, -1.0, 0.0])


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


def _direction_vector(label: str, basis: np.ndarray, on_ground: bool) -> np.ndarray:
    right, up, away = basis
    if label in ("Moving Toward Camera", "Moving Away from Camera"):
        if on_ground:
            away = away - (away @ GRAVITY_UP) * GRAVITY_UP
            away = away / np.linalg.norm(away)
        return -away if "Toward" in label else away
    horizontal = -right if "Left" in label else right if "Right" in label else np.zeros(3)
    vertical = up if "Up" in label else -up if "Down" in label else np.zeros(3)
    vector = horizontal + vertical
    return vector / np.linalg.norm(vector)


def rotate(rotation: np.ndarray, points: np.ndarray) -> np.ndarray:
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
        if not CAMERA_HEIGHT - 3.5 < middle[1] < CAMERA_HEIGHT - size[0] - 0.3:
            return None
    else:
        resting_y = CAMERA_HEIGHT - rest_height
        if ray[1] <= 1e-6:
            return None
        middle = origin + (resting_y - origin[1]) / ray[1] * ray
        if not 3.5 < np.linalg.norm(middle - origin) < 11.0:
            return None

    times = np.linspace(0.0, 1.0, num_frames)
    if dynamic:
        direction = str(rng.choice(DIRECTIONS[:-1] if floating else _GROUND_DIRECTIONS))
        speed = str(rng.choice(list(_SPEED_PROFILES)))
        heading = _direction_vector(direction, view_basis(middle, camera.centres[0], GRAVITY_UP), not floating)
        length = rng.uniform(1.2, 2.6)
        side = np.cross(heading, GRAVITY_UP)
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
        horizontal = tangent - np.einsum("ni,i->n", tangent, GRAVITY_UP)[:, None] * GRAVITY_UP
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
        scene = scene_frame(objects, frame, ground, np.eye(3))
        dirs = np.stack([o.centres[frame] for o in objects]) - camera.centres[frame]
        if not np.array_equal(cast_rays(camera.centres[frame], dirs, scene).ids, expected):
            return False
    return True


def _motion_recovered(obj: SceneObject, camera: CameraPath, fps: int) -> bool:
    """The generating labels are what the benchmark's rules read back from the track."""
    if obj.speed is None:
        return True
    direction = classify_direction(obj.centres[-1] - obj.centres[0], obj.centres[0], camera.centres[0],
                                   GRAVITY_UP)
    return direction == obj.direction and speed_profile(track_speeds(obj.centres, fps)) == obj.speed


def gravity_ground(offset_axes: np.ndarray = np.eye(3)) -> Ground:
    return Ground(normal=offset_axes @ GRAVITY_UP, offset=-CAMERA_HEIGHT,
                  axes=np.stack([offset_axes[:, 0], offset_axes[:, 2]]), cell=1.0,
                  colours=np.array([[0.62, 0.58, 0.5], [0.36, 0.33, 0.28]]))


def scene_frame(objects: Sequence[SceneObject], frame: int, ground: Ground, to_world: np.ndarray) -> SceneFrame:
    """The objects at one frame, mapped into a frame whose coordinates are `to_world @ X`."""
    spheres = [o for o in objects if o.shape == "sphere"]
    boxes = [o for o in objects if o.shape == "box"]

    def box_rotation(o: SceneObject) -> np.ndarray:
        front = o.forward[frame]
        right = np.cross(front, GRAVITY_UP)          # local x = right, y = down, z = front
        return to_world @ np.stack([right, -GRAVITY_UP, front], axis=1)

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
    ground = gravity_ground()
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
