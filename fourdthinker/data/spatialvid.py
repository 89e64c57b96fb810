"""The SpatialVID layout: paths, per-clip annotation files, and pose <-> (N, 7) row conversion.

Per clip, under `annotations/{group}/{video_id}/`:
- `poses.npy`       float32 (N, 7) rows [tx, ty, tz, qx, qy, qz, qw]: world-to-camera
                    (X_cam = R X_world + t), scalar-last unit quaternion of R, OpenCV camera axes
                    (x right, y down, z forward); one row per extracted frame.
- `intrinsics.npy`  float32 (N, 4) rows [fx, fy, cx, cy] in pixels of the clip's frames, with
                    integer pixel coordinates at pixel centres (OpenCV).
- `indexes.txt`     "frame_seq frame_idx" lines ('#' comments allowed): extracted frames.
- `instructions.json` {"a->b": [camera-motion labels]}; key a->b spans pose rows 2a..2b.
- `caption.json`    {"SceneSummary": text, ...}.
Videos live at `videos/{group}/{video_id}.mp4`; `SpatialVID_metadata.csv` lists them in its
'video path' column (relative to the root).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METADATA_CSV = "SpatialVID_metadata.csv"
POSE_COLUMNS = ("tx", "ty", "tz", "qx", "qy", "qz", "qw")
INTRINSICS_COLUMNS = ("fx", "fy", "cx", "cy")


class LayoutError(ValueError):
    """An annotation file that does not follow the SpatialVID layout; the message names the file."""


@dataclass(frozen=True)
class ClipPaths:
    """Where one clip's video and annotations live under a SpatialVID root."""

    root: Path
    group: str
    video_id: str

    @property
    def video(self) -> Path:
        return self.root / "videos" / self.group / f"{self.video_id}.mp4"

    @property
    def annotations(self) -> Path:
        return self.root / "annotations" / self.group / self.video_id

    @property
    def video_path_column(self) -> str:
        """The clip's 'video path' entry in the metadata CSV (relative, forward slashes)."""
        return f"videos/{self.group}/{self.video_id}.mp4"

    @classmethod
    def from_video_path(cls, root: str | Path, video_path: str) -> "ClipPaths":
        """Parse a metadata 'video path' such as "videos/group_0000/clip_0003.mp4"."""
        parts = Path(video_path).parts
        if len(parts) < 2 or Path(video_path).suffix != ".mp4":
            raise LayoutError(f"video path {video_path!r}: expected videos/{{group}}/{{video_id}}.mp4")
        return cls(Path(root), parts[-2], Path(video_path).stem)


# --- rotations ------------------------------------------------------------------------------------

def rotation_to_quaternion(rotations: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 4) unit quaternions [qx, qy, qz, qw] with qw >= 0.

    Shepperd's method: each matrix uses the candidate with the largest squared component, so the
    division never approaches zero.
    """
    m = np.asarray(rotations, dtype=np.float64)
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    squares = 0.25 * np.stack([1 + m00 - m11 - m22, 1 - m00 + m11 - m22,
                               1 - m00 - m11 + m22, 1 + m00 + m11 + m22], axis=-1)
    big = np.sqrt(np.clip(squares, 1e-12, None))            # candidate |q_i| for each pivot i
    s01, s02, s12 = m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1]
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    qx, qy, qz, qw = (big[..., i] for i in range(4))
    candidates = np.stack([
        np.stack([qx, s01 / (4 * qx), s02 / (4 * qx), d21 / (4 * qx)], axis=-1),
        np.stack([s01 / (4 * qy), qy, s12 / (4 * qy), d02 / (4 * qy)], axis=-1),
        np.stack([s02 / (4 * qz), s12 / (4 * qz), qz, d10 / (4 * qz)], axis=-1),
        np.stack([d21 / (4 * qw), d02 / (4 * qw), d10 / (4 * qw), qw], axis=-1),
    ], axis=-2)                                              # (..., pivot, 4)
    pivot = np.argmax(squares, axis=-1)
    q = np.take_along_axis(candidates, pivot[..., None, None], axis=-2)[..., 0, :]
    q = q * np.where(q[..., 3:] < 0, -1.0, 1.0)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def quaternion_to_rotation(quaternions: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions [qx, qy, qz, qw] (normalised here) -> (..., 3, 3) rotation matrices."""
    q = np.asarray(quaternions, dtype=np.float64)
    x, y, z, w = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=-1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=-1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=-1),
    ], axis=-2)


def world_to_camera_rows(rotations: np.ndarray, translations: np.ndarray) -> np.ndarray:
    """World-to-camera (R (N, 3, 3), t (N, 3)) -> float32 (N, 7) rows [tx, ty, tz, qx, qy, qz, qw]."""
    rows = np.concatenate([np.asarray(translations, dtype=np.float64),
                           rotation_to_quaternion(rotations)], axis=-1)
    return rows.astype(np.float32)


def rows_to_world_to_camera(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 7) pose rows -> world-to-camera rotations (N, 3, 3) and translations (N, 3), float64."""
    rows = np.asarray(rows, dtype=np.float64)
    return quaternion_to_rotation(rows[:, 3:]), rows[:, :3]


def camera_centres(rows: np.ndarray) -> np.ndarray:
    """(N, 3) camera centres c = -R^T t of (N, 7) world-to-camera pose rows."""
    rotations, translations = rows_to_world_to_camera(rows)
    return -np.einsum("nji,nj->ni", rotations, translations)


# --- annotation files ------------------------------------------------------------------------------

def _load_table(path: Path, columns: tuple[str, ...]) -> np.ndarray:
    if not path.is_file():
        raise LayoutError(f"{path}: missing")
    table = np.load(path)
    if table.ndim != 2 or table.shape[1] != len(columns):
        raise LayoutError(f"{path}: expected shape (N, {len(columns)}) {list(columns)}, got {table.shape}")
    return table.astype(np.float32)


def read_poses(annotations: Path) -> np.ndarray:
    """float32 (N, 7) world-to-camera rows from `poses.npy`."""
    return _load_table(Path(annotations) / "poses.npy", POSE_COLUMNS)


def read_intrinsics(annotations: Path) -> np.ndarray:
    """float32 (N, 4) rows [fx, fy, cx, cy] from `intrinsics.npy`."""
    return _load_table(Path(annotations) / "intrinsics.npy", INTRINSICS_COLUMNS)


def read_indexes(annotations: Path) -> np.ndarray:
    """int64 (N, 2) rows (frame_seq, frame_idx) of `indexes.txt`; comments and malformed lines skipped."""
    path = Path(annotations) / "indexes.txt"
    if not path.is_file():
        raise LayoutError(f"{path}: missing")
    rows = [line.split() for line in path.read_text().splitlines()]
    pairs = [(int(a), int(b)) for a, b in (r for r in rows if len(r) == 2 and not r[0].startswith("#"))
             if a.lstrip("-").isdigit() and b.lstrip("-").isdigit()]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def parse_instruction_key(key: str) -> tuple[int, int]:
    """"a->b" -> (a, b), in subsampled pose steps."""
    start, sep, end = key.partition("->")
    if not sep or not start.strip().isdigit() or not end.strip().isdigit():
        raise LayoutError(f"instructions key {key!r}: expected 'start->end' with integer steps")
    return int(start), int(end)


def read_instructions(annotations: Path) -> dict[str, list[str]]:
    """{"a->b": labels} from `instructions.json`, keys validated, in file order."""
    path = Path(annotations) / "instructions.json"
    if not path.is_file():
        raise LayoutError(f"{path}: missing")
    instructions = json.loads(path.read_text())
    for key, labels in instructions.items():
        parse_instruction_key(key)
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise LayoutError(f"{path}: value of {key!r} must be a list of label strings")
    return instructions


def read_caption(annotations: Path) -> dict:
    path = Path(annotations) / "caption.json"
    if not path.is_file():
        raise LayoutError(f"{path}: missing")
    return json.loads(path.read_text())


def write_annotations(annotations: Path, *, poses: np.ndarray, intrinsics: np.ndarray,
                      indexes: np.ndarray, instructions: dict[str, list[str]], caption: dict) -> None:
    """Write the five annotation files of one clip in the formats the readers above accept."""
    annotations = Path(annotations)
    annotations.mkdir(parents=True, exist_ok=True)
    np.save(annotations / "poses.npy", np.asarray(poses, dtype=np.float32).reshape(-1, 7))
    np.save(annotations / "intrinsics.npy", np.asarray(intrinsics, dtype=np.float32).reshape(-1, 4))
    lines = ["# frame_seq frame_idx"] + [f"{seq} {idx}" for seq, idx in np.asarray(indexes).tolist()]
    (annotations / "indexes.txt").write_text("\n".join(lines) + "\n")
    with open(annotations / "instructions.json", "w", encoding="utf-8") as f:
        json.dump(instructions, f, indent=2, ensure_ascii=False)
    with open(annotations / "caption.json", "w", encoding="utf-8") as f:
        json.dump(caption, f, indent=2, ensure_ascii=False)
