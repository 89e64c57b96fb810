"""One synthetic clip: camera + objects rendered to frames, its tracks document, written in the SpatialVID layout."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from fourdthinker.data.render import Intrinsics, render
from fourdthinker.data.spatialvid import ClipPaths, world_to_camera_rows, write_annotations
from fourdthinker.data.synth.camera import CameraPath, CameraSegment, camera_path, instructions, sample_camera_segments
from fourdthinker.data.synth.config import SynthConfig
from fourdthinker.data.synth.scene import (
    GRAVITY_UP,
    PALETTE,
    SceneObject,
    gravity_ground,
    rotate,
    sample_objects,
    scene_frame,
)


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
        centres = rotate(self.to_world, self.camera.centres)
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
    ground = gravity_ground(clip.to_world)
    rotations, translations = clip.world_to_camera()
    frames = [render(scene_frame(objects, k, ground, clip.to_world), intrinsics, rotations[k], translations[k])
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
                 "speed_profile": o.speed, "centres": rotate(to_world, o.centres).tolist()}
        if o.shape == "sphere":
            entry["radius"] = float(o.size[0])
        else:
            entry["half_extents"] = {"right": float(o.size[0]), "height": float(o.size[1]),
                                     "front": float(o.size[2])}
            entry["forward"] = rotate(to_world, o.forward).tolist()
        objects.append(entry)
    return {
        "video_id": clip.video_id, "group": clip.group, "fps": clip.fps,
        "num_frames": clip.num_frames, "width": k.width, "height": k.height,
        "up": (to_world @ GRAVITY_UP).tolist(),
        "camera": {
            "motion": [list(s.labels) for s in clip.segments],
            "segments": [{"steps": [s.first_step, s.last_step], "pose_rows": [2 * s.first_step, 2 * s.last_step],
                          "labels": list(s.labels)} for s in clip.segments],
            "intrinsics": {"fx": k.fx, "fy": k.fy, "cx": k.cx, "cy": k.cy},
            "centres": rotate(to_world, clip.camera.centres).tolist(),
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
