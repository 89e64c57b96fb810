"""Per-clip labelling after segmentation: camera-motion segments, object tracks with motion labels,
the QA samples written from them, and the clip's result record (the resume marker).

Camera motion comes from the clip's `instructions.json` when it exists, else from `poses.npy` by
`label_poses`. Pose rows are matched to extracted frames through `indexes.txt` (the source frame
number of each pose row) and the stream's frame rate. Anything a clip lacks becomes a drop reason.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np

from fourdthinker.data.spatialvid import (
    LayoutError,
    read_caption,
    read_indexes,
    read_instructions,
    read_intrinsics,
    read_poses,
)
from fourdthinker.preprocess.camera_motion import InvalidPoses, label_poses, normalize_camera_label, segment_labels
from fourdthinker.preprocess.config import PreprocessConfig
from fourdthinker.preprocess.index import STATUS_DROPPED, STATUS_OK
from fourdthinker.preprocess.llm_writer import OVERLAY_CHECK_FAILED, OVERLAY_CHECK_UNANSWERED, OpenAIWriter
from fourdthinker.preprocess.manifest import dift_format_error, relative_media, write_clip_result
from fourdthinker.preprocess.object_motion import CameraTrack, inside_frame, object_motion
from fourdthinker.preprocess.records import ClipAnnotation, ObjectTrack

log = logging.getLogger(__name__)

OVERLAYS_DIR = "overlays"
# The drop category of a clip whose labelling or question writing raised an unexpected error.
LABELLING_FAILED = "labelling failed"
LLM_CACHE_DIR = "llm_cache"
QUESTION_DROPPED = "question dropped"
# Writer drop reasons that are their own manifest category rather than "question dropped".
_OWN_CATEGORIES = (OVERLAY_CHECK_FAILED, OVERLAY_CHECK_UNANSWERED)
# SpatialVID labels camera motion between every second pose row (camera_motion's default interval).
POSE_INTERVAL = 2


class ClipDropped(Exception):
    """The clip cannot be labelled; the message is the manifest's reason."""


def _annotation_file(reader, annotations: Path, what: str):
    try:
        return reader(annotations)
    except LayoutError as err:
        raise ClipDropped(f"annotation missing or malformed: {what} ({err})") from None


def frames_of_pose_rows(pose_rows: np.ndarray, source_frames: np.ndarray, frame_times: np.ndarray,
                        stream_fps: float) -> np.ndarray:
    """Index of the extracted frame nearest in time to each pose row."""
    row_times = np.asarray(source_frames, dtype=np.float64)[np.asarray(pose_rows)] / stream_fps
    return np.abs(row_times[:, None] - np.asarray(frame_times)[None, :]).argmin(axis=1)


def camera_segments(row: dict, cfg: PreprocessConfig, poses: np.ndarray,
                    source_frames: np.ndarray) -> list[tuple[int, int, list[str]]]:
    """(first frame, last frame, full label names) per camera-motion segment, in frame indices of the
    extracted frames; segments shorter than one extracted frame step are left out."""
    annotations = Path(row["annotations"])
    if (annotations / "instructions.json").is_file():
        instructions = _annotation_file(read_instructions, annotations, "instructions.json")
    else:
        try:
            instructions = label_poses(poses, rule=cfg.camera_rule, interval=POSE_INTERVAL)
        except InvalidPoses as err:
            raise ClipDropped(f"camera poses unusable: {err}") from None
    try:
        segments = segment_labels(instructions)
        named = [[normalize_camera_label(label) for label in labels] for _, _, labels in segments]
    except ValueError as err:
        raise ClipDropped(f"annotation malformed: instructions.json ({err})") from None
    last_row = len(source_frames) - 1
    bounds = np.array([[start, end] for start, end, _ in segments], dtype=np.int64).reshape(-1, 2)
    rows = np.minimum(bounds * POSE_INTERVAL, last_row)
    frames = frames_of_pose_rows(rows.ravel(), source_frames, row["frame_times"], row["stream_fps"]).reshape(-1, 2)
    return [(int(a), int(b), labels) for (a, b), labels in zip(frames, named) if b > a]


def object_tracks(row: dict, cfg: PreprocessConfig, camera: CameraTrack) -> list[ObjectTrack]:
    """The segmenter's kept tracks with dynamic/static decided and motion labelled."""
    times = np.asarray(row["frame_times"], dtype=np.float64)
    objects = []
    for record in json.loads(row["tracks"]):
        centroids = np.array([c if c is not None else [np.nan, np.nan] for c in record["centroids"]], dtype=np.float64)
        boxes = np.array([b if b is not None else [np.nan] * 4 for b in record["boxes"]], dtype=np.float64)
        areas = np.asarray(record["areas"], dtype=np.float64)
        if np.count_nonzero(areas > 0) < 2:
            continue
        usable = inside_frame(boxes, row["frame_width"], row["frame_height"])
        motion = object_motion(centroids, areas, camera, times, cfg.object_size_m, usable)
        objects.append(ObjectTrack(
            name=record["name"], dynamic=motion.dynamic, mask_paths=record["mask_paths"],
            boxes=record["boxes"], areas=record["areas"], direction=motion.direction,
            speed=motion.speed, distance=motion.distance))
    return objects


def annotate(row: dict, cfg: PreprocessConfig) -> ClipAnnotation:
    """The clip's labels; raises ClipDropped with the reason when it cannot be labelled."""
    annotations = Path(row["annotations"])
    indexes = _annotation_file(read_indexes, annotations, "indexes.txt")
    poses = _annotation_file(read_poses, annotations, "poses.npy")
    intrinsics = _annotation_file(read_intrinsics, annotations, "intrinsics.npy")
    if len(indexes) == 0 or len(indexes) != len(poses) or len(poses) != len(intrinsics):
        raise ClipDropped(f"annotation mismatch: {len(indexes)} indexes, {len(poses)} poses, "
                          f"{len(intrinsics)} intrinsics rows")
    order = np.argsort(indexes[:, 0], kind="stable")  # pose rows follow frame_seq order
    source_frames = indexes[order, 1]
    segments = camera_segments(row, cfg, poses, source_frames)
    scale = row["frame_width"] / row["source_width"]
    camera = CameraTrack.at_frames(poses, intrinsics, source_frames, row["frame_times"], row["stream_fps"], scale)
    try:
        caption = read_caption(annotations).get("SceneSummary", "")
    except LayoutError:
        caption = ""
    return ClipAnnotation(
        clip_id=row["clip_id"], group=row["group"], video_path=row["video_path"],
        frame_paths=list(row["frame_paths"]), frame_times=[float(t) for t in row["frame_times"]],
        width=int(row["frame_width"]), height=int(row["frame_height"]), camera_segments=segments,
        objects=object_tracks(row, cfg, camera), caption=caption)


def _object_labels(clip: ClipAnnotation) -> list[dict]:
    return [{"name": o.name, "dynamic": o.dynamic, "direction": o.direction, "speed": o.speed,
             "distance": o.distance} for o in clip.objects]


def drop_reason(reason: str) -> str:
    """A question's drop reason ("<sample id>: <why>") under its manifest category: "question
    dropped", or the overlay check's own category when `why` starts with it ("<category>: ...")."""
    sample_id, _, why = reason.partition(": ")
    for category in _OWN_CATEGORIES:
        if why.startswith(f"{category}: "):
            return f"{category}: {sample_id}: {why.removeprefix(f'{category}: ')}"
    return f"{QUESTION_DROPPED}: {reason}"


def process_clip(row: dict, cfg: PreprocessConfig, writer) -> dict:
    """Label one clip, write its questions and record its result under the output dir.

    `writer` is a QA writer (`fourdthinker.preprocess.qa`); the question rng is seeded by
    (seed, clip id), so a clip's samples do not depend on which other clips run or in what order.
    """
    result = {"clip_id": row["clip_id"], "group": row["group"], "bucket": row["bucket"],
              "video_path": row["video_path"], "frames_dir": row.get("frames_dir", ""),
              "status": row["status"], "reason": row["reason"], "camera_segments": [], "objects": [],
              "samples": [], "drops": []}
    if "concepts" in row:  # the objects were named per clip (see dataset.NameObjects)
        result.update(concepts=[str(c) for c in row["concepts"]], concepts_source=row["concepts_source"],
                      concepts_note=row["concepts_note"])
    if row["status"] == STATUS_OK:
        try:
            result.update(_label_and_ask(row, cfg, writer))
        except ClipDropped as err:
            result.update(status=STATUS_DROPPED, reason=str(err))
        except Exception as err:  # one clip's failure anywhere in labels, motion or QA drops that clip only
            log.warning("clip %s dropped: %s: %s", row["clip_id"], type(err).__name__, err)
            result.update(status=STATUS_DROPPED, reason=f"{LABELLING_FAILED}: {type(err).__name__}: {err}",
                          camera_segments=[], objects=[], samples=[], drops=[])
    write_clip_result(cfg.output_dir, result)
    return result


def _label_and_ask(row: dict, cfg: PreprocessConfig, writer) -> dict:
    """The clip's labels and its questions in the reference format (the result's fields)."""
    from fourdthinker.preprocess.qa import write_clip_questions

    clip = annotate(row, cfg)
    rng = random.Random(f"{cfg.seed}:{row['clip_id']}")
    samples, drops = write_clip_questions(
        clip, writer, rng, overlay_dir=Path(cfg.output_dir) / OVERLAYS_DIR / row["clip_id"])
    kept = []
    for sample in samples:
        dift = sample.to_dift()
        error = dift_format_error(dift)
        if error:
            drops.append(f"{sample.id} {error}")
        else:
            kept.append({"id": sample.id, "kind": sample.kind, "dift": relative_media(dift, cfg.output_dir),
                         "rl": relative_media(sample.to_rl(), cfg.output_dir)})
    return {"camera_segments": clip.camera_segments, "objects": _object_labels(clip), "samples": kept,
            "drops": [drop_reason(reason) for reason in drops]}


def make_llm_writer(cfg: PreprocessConfig) -> OpenAIWriter:
    """The LLM writer for `cfg.llm`, caching replies under the output dir (reruns send no requests)."""
    return OpenAIWriter.from_config(cfg.llm, cache_dir=str(Path(cfg.output_dir) / LLM_CACHE_DIR))


def make_writer(cfg: PreprocessConfig):
    """The QA writer: the offline template writer, or the LLM writer when `llm.base_url` is set."""
    if cfg.llm.base_url:
        return make_llm_writer(cfg)
    from fourdthinker.preprocess.qa import TemplateWriter

    return TemplateWriter(seed=cfg.seed)


class ClipAnnotator:
    """Callable class for Ray Data's `map`: builds the QA writer once (the LLM writer holds a client
    and a cache), then labels clips and records their results. Returns a small status row."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        self.writer = make_writer(cfg)

    def __call__(self, row: dict) -> dict:
        result = process_clip(row, self.cfg, self.writer)
        return {"clip_id": result["clip_id"], "status": result["status"], "reason": result["reason"],
                "samples": len(result["samples"])}
