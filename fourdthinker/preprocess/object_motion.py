"""Object-motion labels (direction, speed change, distance to camera) from mask tracks, with the
camera's own motion taken out using the clip's poses and intrinsics.

Static or dynamic is decided by testing the hypothesis "this object is a fixed point in the world",
which hardly depends on an object-size prior (wrong for most objects): under the known cameras a
static point's image track is fully determined, so the point is triangulated from the centroids'
sight rays (linear least squares) and the object is static when
- the rays pass close to that point (`offset`, RMS distance in object sizes), and
- the object's apparent size follows the range to that point (`growth`, net log change of
  apparent size x range between the first and last third of the clip).
The two are combined elliptically: each alone may be small while both together reveal motion. Without
parallax (a camera that only turns) the rays constrain only a direction; a weak pull towards the depth
the size prior implies then fixes the range, and a badly wrong prior merely weighs less than the rays
whenever the camera travels. (Hence the test's blind spot: an object moving steadily parallel to the
camera's travel looks like a static one at another depth.) A static object's distance label is read
off the fitted point. Apparent size is corrected for perspective foreshortening (a solid angle
covers 1/cos^3 more pixels off-axis) and compared by the upper envelope of each third, because
occlusion and border cuts only ever remove pixels.

Dynamic objects are then labelled from lifted points: every mask centroid becomes a 3D point in the
world frame of the poses, X_t = c_t + d_t r_t with unit sight ray r_t and range d_t = f S / sqrt(A_t
cos^3), from the mask area A_t under the object-size prior S. Camera rotation is removed exactly
whatever S is; camera translation up to the error of S; the toward/away component depends only on the
area ratio. We prefer this over "subtract the static object's mask motion" because image motion
induced by translation scales with 1/depth, which differs between the two objects.

Labels are in the reference vocabularies (`fourdthinker.data.vocab`); sideways motion is
measured in object sizes and motion along the line of sight as a fraction of the distance, so the
thresholds fit near and far objects alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fourdthinker.data.spatialvid import rows_to_world_to_camera
from fourdthinker.data.vocab import DISTANCE_CLOSER, DISTANCE_FARTHER, DISTANCE_SAME, SPEED_LABELS, STATIONARY

# Screen directions by 45-degree sector of the (right, up) motion angle, counter-clockwise from right.
_SECTORS = ("Moving Right", "Moving Right-Up", "Moving Up", "Moving Left-Up", "Moving Left",
            "Moving Left-Down", "Moving Down", "Moving Right-Down")
_TOWARD, _AWAY = "Moving Toward Camera", "Moving Away from Camera"
(_SPEEDING_UP, _SLOWING_DOWN, _CONSTANT, _UP_THEN_DOWN, _DOWN_THEN_UP, _VARYING) = SPEED_LABELS


@dataclass(frozen=True)
class MotionThresholds:
    # The static hypothesis is rejected when (offset / static_offset)^2 + (growth / size_growth)^2 > 1.
    # Calibrated on the synthetic world with exact masks (boxes show new faces as the view turns,
    # objects occlude each other): 99% of static objects pass, 95% of moving ones fail.
    static_offset: float = 0.1  # RMS distance of the sight rays from the fitted point, object sizes
    size_growth: float = 0.14  # net log change of apparent size not explained by the range
    # Weight of the object-size prior against the rays, as the spread of log range it allows; it
    # decides the range only where the camera barely travels.
    prior_spread: float = 2.0
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
    sideways: float  # net motion across the line of sight, in object sizes (lifted under the prior)
    depth_change: float  # net motion along the line of sight, as a fraction of the distance
    static_offset: float  # `StaticFit.offset` of the track
    size_growth: float  # `StaticFit.growth` of the track


@dataclass(frozen=True)
class StaticFit:
    """The best explanation of a track as a fixed world point, and how far the track departs from it."""

    point: np.ndarray  # (3,) world point
    ranges: np.ndarray  # (T,) distance from each camera centre to `point`, NaN where not measured
    in_front: bool  # the point lies ahead of every camera that saw the object
    offset: float  # RMS distance between the sight rays and `point`, in object sizes
    growth: float  # net log change of apparent size x range, last third vs first third (upper envelopes)

    def rejects(self, thresholds: MotionThresholds) -> bool:
        """Whether the track is too far from a static point to be one (the elliptical test)."""
        if not self.in_front:  # the only static explanation is a point no camera could have seen
            return True
        return math.hypot(self.offset / thresholds.static_offset, self.growth / thresholds.size_growth) > 1.0


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


def sight_rays(centroids: np.ndarray, camera: CameraTrack) -> tuple[np.ndarray, np.ndarray]:
    """Unit world directions (T, 3) through the centroids, and 1 / cos of each ray's angle to the
    optical axis (T,); NaN where a centroid is NaN."""
    k = camera.intrinsics
    rays = np.stack([(centroids[:, 0] - k[:, 2]) / k[:, 0], (centroids[:, 1] - k[:, 3]) / k[:, 1],
                     np.ones(len(k))], axis=1)
    length = np.linalg.norm(rays, axis=1)
    return np.einsum("nji,nj->ni", camera.rotations, rays) / length[:, None], length


def angular_sizes(centroids: np.ndarray, areas: np.ndarray, camera: CameraTrack) -> np.ndarray:
    """(T,) square root of each mask's solid angle (radians; NaN where empty). A solid angle covers
    1/cos^3 more pixels off-axis, so raw areas would make objects near the border look closer."""
    _, secant = sight_rays(centroids, camera)
    focal_area = camera.intrinsics[:, 0] * camera.intrinsics[:, 1]
    return np.sqrt(np.where(areas > 0, areas, np.nan) / (focal_area * secant**3))


def lift_centroids(centroids: np.ndarray, areas: np.ndarray, camera: CameraTrack,
                   object_size: float) -> np.ndarray:
    """(T, 3) world points of the centroids at the range the area implies (NaN where not visible)."""
    directions, _ = sight_rays(centroids, camera)
    ranges = object_size / angular_sizes(centroids, areas, camera)
    return camera.centres + ranges[:, None] * directions


def fit_static_point(centroids: np.ndarray, areas: np.ndarray, camera: CameraTrack, object_size: float,
                     prior_spread: float = MotionThresholds.prior_spread) -> StaticFit:
    """The world point nearest to every sight ray (frames with area > 0), and the track's departure.

    Minimises sum_t |(I - r_t r_t^T)(P - c_t)|^2 (squared distances of P from the rays) plus
    (a (s . (P - c) - d) / prior_spread)^2, which pulls the range of P along the mean ray s from the
    mean centre c towards d = object_size / a, the range the prior implies at the median angular size
    a. Both terms are squared world lengths, so the prior weighs as a log-range error of
    `prior_spread` would. Closed form: one 3x3 linear solve.
    """
    centroids = np.asarray(centroids, dtype=np.float64)
    sizes = angular_sizes(centroids, np.asarray(areas, dtype=np.float64), camera)
    seen = np.isfinite(sizes) & np.isfinite(centroids).all(axis=1)
    if seen.sum() < 2:
        raise ValueError(f"object seen in {int(seen.sum())} frames; a static fit needs at least 2")
    directions = sight_rays(centroids, camera)[0][seen]
    centres, angular = camera.centres[seen], sizes[seen]
    projectors = np.eye(3) - directions[:, :, None] * directions[:, None, :]  # onto each ray's normal plane
    mean_ray = directions.mean(axis=0)
    mean_ray /= np.linalg.norm(mean_ray)
    mean_centre = centres.mean(axis=0)
    typical_size = float(np.median(angular))
    weight = (typical_size / prior_spread) ** 2
    normal = projectors.sum(axis=0) + weight * np.outer(mean_ray, mean_ray)
    target = (np.einsum("nij,nj->i", projectors, centres)
              + weight * mean_ray * (mean_ray @ mean_centre + object_size / typical_size))
    point = np.linalg.solve(normal, target)
    offsets = point - centres
    distances = np.linalg.norm(offsets, axis=1)
    # angular size x range is the object's world size, constant for a static object; new faces turning
    # into view and occlusion make it wobble, a sustained change means the range changes unlike the
    # camera's motion predicts.
    log_size = np.log(angular * distances)
    world_size = math.exp(float(np.median(log_size)))
    miss = np.linalg.norm(np.einsum("nij,nj->ni", projectors, offsets), axis=1)
    third = max(1, len(log_size) // 3)
    ranges = np.full(len(centroids), np.nan)
    ranges[seen] = distances
    return StaticFit(point=point, ranges=ranges,
                     in_front=bool(np.all(np.einsum("ni,ni->n", offsets, directions) > 0)),
                     offset=float(np.sqrt(np.mean(miss**2))) / world_size,
                     growth=float(log_size[-third:].max() - log_size[:third].max()))


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
    every frame where the object is seen counts. Static vs dynamic is `fit_static_point`'s test.
    A dynamic object's net motion is the difference of a least-squares line through the lifted points
    at the first and last frame: a line fit averages out the per-frame depth noise of mask areas.
    """
    times = np.asarray(frame_times, dtype=np.float64)
    centroids = np.asarray(centroids, dtype=np.float64)
    areas = np.asarray(areas, dtype=np.float64)
    if usable is not None and np.count_nonzero(usable & (areas > 0)) >= 2:
        areas = np.where(usable, areas, 0.0)
    points = lift_centroids(centroids, areas, camera, object_size)
    seen = np.isfinite(points).all(axis=1)
    if seen.sum() < 2:
        raise ValueError(f"object seen in {int(seen.sum())} frames; motion needs at least 2")
    static = fit_static_point(centroids, areas, camera, object_size, thresholds.prior_spread)
    dynamic = static.rejects(thresholds)
    design = np.stack([np.ones(seen.sum()), times[seen]], axis=1)
    (origin, velocity), *_ = np.linalg.lstsq(design, points[seen], rcond=None)
    start, end = origin + velocity * times[0], origin + velocity * times[-1]
    displacement = end - start
    sight = start - camera.centres[0]
    distance_0 = float(np.linalg.norm(sight))
    along = float(displacement @ sight) / distance_0
    sideways = float(np.linalg.norm(displacement - along * sight / distance_0)) / object_size
    depth_change = along / distance_0
    # A static object's distance changes only through the camera: the fitted point measures it exactly.
    distances = np.linalg.norm(points[seen] - camera.centres[seen], axis=1) if dynamic else static.ranges[seen]
    (d0, d_rate), *_ = np.linalg.lstsq(design, distances, rcond=None)
    change = (d_rate * (times[-1] - times[0])) / max(d0 + d_rate * times[0], 1e-9)
    distance = (DISTANCE_CLOSER if change < -thresholds.distance_ratio
                else DISTANCE_FARTHER if change > thresholds.distance_ratio else DISTANCE_SAME)
    measures = dict(distance=distance, sideways=sideways, depth_change=depth_change,
                    static_offset=static.offset, size_growth=static.growth)
    if not dynamic:
        return ObjectMotion(False, STATIONARY, None, **measures)
    camera_up = camera.rotations[0].T @ np.array([0.0, -1.0, 0.0])  # OpenCV y points down
    direction = direction_label(displacement, start, camera.centres[0], camera_up, thresholds.along_sight_deg)
    path = _fill_gaps(times, points)
    speeds = np.linalg.norm(np.diff(path, axis=0), axis=1) / np.diff(times)
    return ObjectMotion(True, direction, speed_label(speeds, thresholds), **measures)
