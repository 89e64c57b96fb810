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

The package, one concern a module: `config` (SynthConfig), `camera` (motion labels -> camera path),
`geometry` (directions, speeds, distances read from 3D tracks), `scene` (objects and their paths),
`clip` (render one clip, write it in the SpatialVID layout), `benchmark` (the 13 DSR sub-tasks'
questions answered from tracks) and `world` (all of it, written whole or not at all).
"""

from fourdthinker.data.synth.benchmark import DSR_KEYS, answer_from_tracks
from fourdthinker.data.synth.config import SynthConfig, SynthConfigError
from fourdthinker.data.synth.world import build_world

__all__ = ["DSR_KEYS", "SynthConfig", "SynthConfigError", "answer_from_tracks", "build_world"]
