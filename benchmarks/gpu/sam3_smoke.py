"""Smoke run and clip timing of the `sam3` segmenter backend on one GPU (random weights, real size).

Builds the segmenter through `build_segmenter` exactly as the preprocess actors do, segments a
synthetic clip (a red square sliding over a grey background), checks the tracks' structure (one per
prompt, one mask or None per frame, masks of the frames' size), and times whole clips after one
warm-up. Masks and scores of random weights say nothing about quality: this checks that the
backend runs end to end and what a clip costs. Any failure raises.

Random weights score every query alike (about 0.2-0.35), below the trained detection thresholds
(0.5 to detect, 0.7 to start a track), so by default no instance reaches the tracker: that run
times the detector on every frame. `--detection-threshold 0.1` lowers those thresholds (and the
segmenter's `score_threshold`) so that instances are detected, pass NMS and get tracked.

    source benchmarks/gpu/env.sh     # on the lent GPU machine, with the .whl/ wheels in /tmp/site
    python benchmarks/gpu/sam3_smoke.py --frames 8 --size 448
    python benchmarks/gpu/sam3_smoke.py --frames 8 --size 448 --detection-threshold 0.1

Prints one line per prompt and the timings; writes JSON to --out, else to $OUT/ when that is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from fourdthinker.actors.segmenter import ClipFrames, Track, build_segmenter
from fourdthinker.preprocess.config import SegmenterConfig


def sliding_square_clip(frames: int, size: int, fps: float = 2.0) -> ClipFrames:
    """`frames` RGB frames of `size`² pixels: a red square a quarter of the side wide, moving from
    the top-left to the bottom-right corner over a grey background."""
    side = size // 4
    corner = np.linspace(0, size - side, frames).astype(int)[:, None, None]  # (T, 1, 1)
    rows = np.arange(size)[None, :, None]
    cols = np.arange(size)[None, None, :]
    inside = (rows >= corner) & (rows < corner + side) & (cols >= corner) & (cols < corner + side)
    video = np.full((frames, size, size, 3), 110, dtype=np.uint8)
    video[inside] = (215, 35, 30)
    return ClipFrames("sam3-smoke", video, np.arange(frames) / fps)


def check_tracks(tracks: list[Track], prompts: list[str], clip: ClipFrames) -> None:
    """Raise if the tracks break the `Segmenter` contract."""
    frames, height, width = clip.frames.shape[:3]
    if [t.prompt for t in tracks] != prompts:
        raise RuntimeError(f"tracks are for {[t.prompt for t in tracks]}, expected one per prompt {prompts}")
    for track in tracks:
        if len(track.masks) != frames:
            raise RuntimeError(f"{track.prompt!r}: {len(track.masks)} masks for {frames} frames")
        for index, mask in enumerate(track.masks):
            if mask is not None and (mask.shape != (height, width) or mask.dtype != bool):
                raise RuntimeError(f"{track.prompt!r} frame {index}: mask {mask.shape} {mask.dtype}, "
                                   f"expected ({height}, {width}) bool")
        if not np.isfinite(track.score):
            raise RuntimeError(f"{track.prompt!r}: score {track.score}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=448, help="frame height and width in pixels")
    parser.add_argument("--prompts", nargs="+", default=["red cube", "person"])
    parser.add_argument("--repeats", type=int, default=3, help="timed clips after the warm-up")
    parser.add_argument("--checkpoint", default="", help="segmenter.checkpoint ('' = random weights)")
    parser.add_argument("--bpe-path", default="", help="segmenter.bpe_path ('' = byte-level stand-in)")
    parser.add_argument("--detection-threshold", type=float, default=None,
                        help="override the model's detection and new-track thresholds and the segmenter's "
                             "score_threshold (default: the trained ones)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT/sam3_smoke-<gpu>.json if $OUT)")
    args = parser.parse_args()

    import torch

    cfg = SegmenterConfig(backend="sam3", checkpoint=args.checkpoint, bpe_path=args.bpe_path)
    if args.detection_threshold is not None:
        cfg.score_threshold = args.detection_threshold
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    segmenter = build_segmenter(cfg)
    if args.detection_threshold is not None:
        segmenter.model.score_threshold_detection = args.detection_threshold
        segmenter.model.new_det_thresh = args.detection_threshold
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in segmenter.model.parameters())
    print(f"built sam3 video model: {params / 1e6:.0f}M parameters in {build_s:.1f} s "
          f"({torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated)")

    clip = sliding_square_clip(args.frames, args.size)
    t0 = time.perf_counter()
    tracks = segmenter.segment(clip, args.prompts)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    check_tracks(tracks, args.prompts, clip)
    per_prompt = []
    for track in tracks:
        found = [i for i, m in enumerate(track.masks) if m is not None]
        shapes = sorted({tuple(track.masks[i].shape) for i in found})
        pixels = [int(track.masks[i].sum()) for i in found]
        print(f"  {track.prompt!r}: mask on {len(found)}/{args.frames} frames {found}, score {track.score:.3f}, "
              f"mask shapes {shapes}, mask pixels {pixels}")
        per_prompt.append({"prompt": track.prompt, "frames_with_mask": found, "score": track.score,
                           "mask_shapes": shapes, "mask_pixels": pixels})

    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        check_tracks(segmenter.segment(clip, args.prompts), args.prompts, clip)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    device = torch.cuda.get_device_name()
    per_clip = float(np.median(seconds)) if seconds else float("nan")
    print(f"{device}: {args.frames} frames {args.size}x{args.size}, {len(args.prompts)} prompts: warm-up "
          f"{warmup_s:.2f} s, then {per_clip:.2f} s per clip (median of {len(seconds)}; "
          f"{per_clip / args.frames / len(args.prompts) * 1e3:.0f} ms per frame and prompt), "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    result = {"benchmark": "sam3_smoke", "device": device, "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "sam3": version("sam3"), "weights": args.checkpoint or "random",
              "parameters": params, "detection_threshold": args.detection_threshold, "frames": args.frames, "size": args.size, "prompts": args.prompts,
              "build_s": build_s, "warmup_s": warmup_s, "clip_s": seconds, "clip_s_median": per_clip,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "tracks": per_prompt}
    gpu = device.split()[1] if len(device.split()) > 1 else device  # "NVIDIA H100 80GB HBM3" -> H100
    tag = "" if args.detection_threshold is None else f"-det{args.detection_threshold:g}"
    out = args.out or (os.environ.get("OUT") and str(Path(os.environ["OUT"]) / f"sam3_smoke-{gpu}{tag}.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
