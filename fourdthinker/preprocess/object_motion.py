"""Object-motion labels (direction, speed change, distance to camera) from mask tracks, with the
camera's own motion taken out using the clip's poses and intrinsics.

Camera compensation: every mask centroid is lifted to a 3D point in the world frame of the poses,
X_t = c_t + z_t R_t^T K_t^-1 [u, v, 1], and the object's motion is read from those points. The depth
z_t comes from the mask area under an object-size prior S: an object of cross-section ~S^2 covering
A_t pixels lies at z_t = f S / sqrt(A_t). Camera rotation is then removed exactly whatever S is;
camera translation is removed up to the error of S (a static object at the wrong depth moves by
|1 - S/S_true| times the camera's travel), and the toward/away component depends only on the area
ratio, not on S. We prefer this over "subtract the static object's mask motion" because image motion
induced by translation scales with 1/depth, which differs between the two objects.

Labels are in the reference vocabularies (`fourdthinker.preprocess.vocab`); sideways motion is
measured in object sizes and motion along the line of sight as a fraction of the distance, so the
thresholds fit near and far objects alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fourdthinker.data.spatialvid import rows_to_world_to_camera
from fourdthinker.preprocess.vocab import (
    DISTANCE_CLOSER,
    DISTANCE_FARTHER,
    DISTANCE_SAME,
    STATIONARY,
    SPEED_LABELS,
)

# Screen directions by 45-degree sector of the (right, up) motion angle, counter-clockwise from right.
_SECTORS = ("Moving Right", "Moving Right-Up", "Moving Up", "Moving Left-Up", "Moving Left",
            "Moving Left-Down", "Moving Down", "Moving Right-Down")
_TOWARD, _AWAY = "Moving Toward Camera", "Moving Away from Camera"
(_SPEEDING_UP, _SLOWING_DOWN, _CONSTANT, _UP_THEN_DOWN, _DOWN_THEN_UP, _VARYING) = SPEED_LABELS


@dataclass(frozen=True)
class MotionThresholds:
    # An object is dynamic when it moves this many object sizes across the line of sight ...
    sideways: float = 0.75
    # ... or its depth changes by this fraction. Depth from mask area is the noisy axis (a box seen
    # from a new angle shows a new face), so it gets its own, scale-free threshold.
    depth_change: float = 0.1
    along_sight_deg: float = 45.0  # motion this close to the line of sight is toward/away
    distance_ratio: float = 0.1  # relative change of camera distance for closer/farther
    speed_ratio: float = 1.3  # ratio between thirds' mean speeds that counts as a change
    constant_ratio: float = 1.2  # max/min ratio of the thirds' speeds still "constant"


@dataclass(frozen=True)
class CameraTrack:
    """The camera at each extracted frame: world-to-camera rotations (T, 3, 3), centres (T, 3) and
    intrinsics (T, 4) [fx, fy, cx, cy] in pixels of the extracted frames."""

    rotations: np.ndarray
    centres: np.ndarray
    intrinsics: np.ndarray

    @classmethod
    def at_frames(cls, poses: np.ndarray, intrinsics: np.ndarray, source_frames: np.ndarray,
                  frame_times: np.ndarray, stream_fps: float, scale: float) -> "CameraTrack":
        """Pick, for each extracted frame, the pose row whose source frame is nearest in time.

        `source_frames` are the video frame numbers of the pose rows (indexes.txt's frame_idx, sorted);
        `scale` maps intrinsics from the video's pixels to the extracted frames' pixels.
        """
        wanted = np.asarray(frame_times, dtype=np.float64) * stream_fps
        source = np.asarray(source_frames, dtype=np.float64)
        right = np.clip(np.searchsorted(source, wanted), 1, len(source) - 1)
        rows = np.where(np.abs(source[right] - wanted) < np.abs(source[right - 1] - wanted), right, right - 1)
        rows = rows if len(source) > 1 else np.zeros(len(wanted), dtype=np.int64)
        rotations, translations = rows_to_world_to_camera(np.asarray(poses)[rows])
        centres = -np.einsum("nji,nj->ni", rotations, translations)
        k = np.asarray(intrinsics, dtype=np.float64)[rows] * scale
        # Pixel-centre convention: scaling maps centre (i + 0.5) / W, so cx, cy shift by half a pixel.
        k[:, 2:] += 0.5 * (scale - 1.0)
        return cls(rotations, centres, k)


@dataclass(frozen=True)
class ObjectMotion:
    dynamic: bool
    direction: str  # an OBJECT_DIRECTIONS label (STATIONARY for static objects)
    speed: str | None  # a SPEED_LABELS label, None for static objects
    distance: str  # a DISTANCE_LABELS label
    sideways: float  # net motion across the line of sight, in object sizes
    depth_change: float  # net motion along the line of sight, as a fraction of the distance


def mask_statistics(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame of boolean masks (T, H, W): centroids (T, 2) [x, y] (NaN when empty), areas (T,) and
    inclusive boxes (T, 4) [x1, y1, x2, y2] (NaN when empty)."""
    masks = np.asarray(masks, dtype=bool)
    _, height, width = masks.shape
    areas = masks.sum(axis=(1, 2)).astype(np.float64)
    safe = np.where(areas > 0, areas, np.nan)
    cols, rows = masks.sum(axis=1), masks.sum(axis=2)  # (T, W), (T, H)
    cx = cols @ np.arange(width, dtype=np.float64) / safe
    cy = rows @ np.arange(height, dtype=np.float64) / safe
    any_col, any_row = cols > 0, rows > 0
    x1 = np.where(areas > 0, any_col.argmax(axis=1), np.nan)
    x2 = np.where(areas > 0, width - 1 - any_col[:, ::-1].argmax(axis=1), np.nan)
    y1 = np.where(areas > 0, any_row.argmax(axis=1), np.nan)
    y2 = np.where(areas > 0, height - 1 - any_row[:, ::-1].argmax(axis=1), np.nan)
    return np.stack([cx, cy], axis=1), areas, np.stack([x1, y1, x2, y2], axis=1)


def inside_frame(boxes: np.ndarray, width: int, height: int, margin: int = 1) -> np.ndarray:
    """(T,) True where a box keeps `margin` pixels from every image border: a mask cut by the border
    has a shrunken area and a shifted centroid, so those frames would fake motion."""
    boxes = np.asarray(boxes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return ((boxes[:, 0] >= margin) & (boxes[:, 1] >= margin)
                & (boxes[:, 2] <= width - 1 - margin) & (boxes[:, 3] <= height - 1 - margin))


def lift_centroids(centroids: np.ndarray, areas: np.ndarray, camera: CameraTrack,
                   object_size: float) -> np.ndarray:
    """(T, 3) world points of the centroids at the depth the area implies (NaN where not visible)."""
    k = camera.intrinsics
    rays = np.stack([(centroids[:, 0] - k[:, 2]) / k[:, 0], (centroids[:, 1] - k[:, 3]) / k[:, 1],
                     np.ones(len(k))], axis=1)
    focal = np.sqrt(k[:, 0] * k[:, 1])
    depth = focal * object_size / np.sqrt(np.where(areas > 0, areas, np.nan))
    return camera.centres + depth[:, None] * np.einsum("nji,nj->ni", camera.rotations, rays)


def _fill_gaps(times: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Linear interpolation over frames where the object was not found (edges held)."""
    seen = np.isfinite(points).all(axis=1)
    return np.stack([np.interp(times, times[seen], points[seen, d]) for d in range(points.shape[1])], axis=1)


def direction_label(displacement: np.ndarray, anchor: np.ndarray, viewer: np.ndarray, up: np.ndarray,
                    along_sight_deg: float) -> str:
    """The direction of a 3D displacement starting at `anchor`, seen from `viewer` with `up` up."""
    away = anchor - viewer
    away = away / np.linalg.norm(away)
    right = np.cross(away, up)
    right = right / np.linalg.norm(right)
    upward = np.cross(right, away)
    r, u, a = right @ displacement, upward @ displacement, away @ displacement
    if math.degrees(math.atan2(abs(a), math.hypot(r, u))) >= along_sight_deg:
        return _AWAY if a > 0 else _TOWARD
    return _SECTORS[round(math.degrees(math.atan2(u, r)) % 360 / 45) % 8]


def speed_label(speeds: np.ndarray, thresholds: MotionThresholds = MotionThresholds()) -> str:
    """How the speed changes, from the mean speed of each third of the clip."""
    first, middle, last = (float(part.mean()) for part in np.array_split(np.asarray(speeds), 3))
    ratio = thresholds.speed_ratio
    if middle > ratio * max(first, last):
        return _UP_THEN_DOWN
    if middle * ratio < min(first, last):
        return _DOWN_THEN_UP
    if last > ratio * first and middle <= ratio * last:
        return _SPEEDING_UP
    if first > ratio * last and middle <= ratio * first:
        return _SLOWING_DOWN
    if max(first, middle, last) < thresholds.constant_ratio * min(first, middle, last):
        return _CONSTANT
    return _VARYING


def object_motion(centroids: np.ndarray, areas: np.ndarray, camera: CameraTrack, frame_times: np.ndarray,
                  object_size: float, usable: np.ndarray | None = None,
                  thresholds: MotionThresholds = MotionThresholds()) -> ObjectMotion:
    """Camera-compensated motion labels of one object track (needs >= 2 frames where it is seen).

    `usable` (T,) marks the frames to measure (e.g. `inside_frame`); when fewer than two are usable,
    every frame where the object is seen counts. Net motion is the difference of a least-squares line
    through the lifted points at the first and last frame: a line fit averages out the per-frame
    depth noise of mask areas.
    """
    times = np.asarray(frame_times, dtype=np.float64)
    areas = np.asarray(areas, dtype=np.float64)
    if usable is not None and np.count_nonzero(usable & (areas > 0)) >= 2:
        areas = np.where(usable, areas, 0.0)
    points = lift_centroids(np.asarray(centroids, dtype=np.float64), areas, camera, object_size)
    seen = np.isfinite(points).all(axis=1)
    if seen.sum() < 2:
        raise ValueError(f"object seen in {int(seen.sum())} frames; motion needs at least 2")
    design = np.stack([np.ones(seen.sum()), times[seen]], axis=1)
    (origin, velocity), *_ = np.linalg.lstsq(design, points[seen], rcond=None)
    start, end = origin + velocity * times[0], origin + velocity * times[-1]
    displacement = end - start
    sight = start - camera.centres[0]
    distance_0 = float(np.linalg.norm(sight))
    along = float(displacement @ sight) / distance_0
    sideways = float(np.linalg.norm(displacement - along * sight / distance_0)) / object_size
    depth_change = along / distance_0
    camera_up = camera.rotations[0].T @ np.array([0.0, -1.0, 0.0])  # OpenCV y points down
    distances = np.linalg.norm(points[seen] - camera.centres[seen], axis=1)
    (d0, d_rate), *_ = np.linalg.lstsq(design, distances, rcond=None)
    change = (d_rate * (times[-1] - times[0])) / max(d0 + d_rate * times[0], 1e-9)
    distance = (DISTANCE_CLOSER if change < -thresholds.distance_ratio
                else DISTANCE_FARTHER if change > thresholds.distance_ratio else DISTANCE_SAME)
    if sideways <= thresholds.sideways and abs(depth_change) <= thresholds.depth_change:
        return ObjectMotion(False, STATIONARY, None, distance, sideways, depth_change)
    direction = direction_label(displacement, start, camera.centres[0], camera_up, thresholds.along_sight_deg)
    path = _fill_gaps(times, points)
    speeds = np.linalg.norm(np.diff(path, axis=0), axis=1) / np.diff(times)
    return ObjectMotion(True, direction, speed_label(speeds, thresholds), distance, sideways, depth_change)
