"""Motion geometry shared by the scene sampler and the benchmark: directions, speed profiles and
distance trends read from 3D tracks, as a viewer at the camera names them."""

from __future__ import annotations

import math

import numpy as np

from fourdthinker.data.vocab import OBJECT_DIRECTIONS, SPEED_LABELS

DIRECTIONS = OBJECT_DIRECTIONS  # the reference vocabularies (data/vocab.py)
SPEEDS = SPEED_LABELS
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
    right, upward, away = view_basis(anchor, viewer, up) @ displacement
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


def view_basis(anchor: np.ndarray, viewer: np.ndarray, up: np.ndarray) -> np.ndarray:
    """(3, 3) rows: right, up and away directions at `anchor` as seen from `viewer`."""
    away = anchor - viewer
    away = away / np.linalg.norm(away)
    right = np.cross(away, up)
    right = right / np.linalg.norm(right)
    return np.stack([right, np.cross(right, away), away])
