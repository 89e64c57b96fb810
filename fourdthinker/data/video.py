"""The one video policy: how every stage (DIFT, 4DRL rollouts, evaluation, serving) turns a clip into
the frames the model sees.

Frames are sampled at `VIDEO_FPS`, at most `MAX_FRAMES` spread evenly over the clip, each fit to at
most `MAX_PIXELS` with both sides multiples of `PATCH_FACTOR`. The processor is told the frame rate
through video metadata so that M-RoPE's temporal step (`second_per_grid_ts`) is the same everywhere;
the reference used three different policies across its stages (REFERENCE-SPEC §12).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from transformers.video_utils import VideoMetadata

from fourdthinker.errors import UsageError

MAX_PIXELS = 256 * 28 * 28
MAX_FRAMES = 50
VIDEO_FPS = 1.0
# Qwen2.5-VL's ViT patch (14) times its 2x2 token merge: a frame side must be a multiple of it.
PATCH_FACTOR = 28
_MIN_PIXELS = PATCH_FACTOR * PATCH_FACTOR
# Frames whose timestamps fall this close before a sampling instant still count as "at" it
# (container timestamps are rounded to the stream's time base).
_TIMESTAMP_TOLERANCE_S = 1e-3


class FrameLoadError(UsageError):
    """A frame image or a video file that cannot be read."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read {self.path}: {reason}; check that the file exists and is a "
                         "valid image/video")

    def __reduce__(self):  # rebuilt from its fields: Ray pickles exceptions between processes
        return type(self), (self.path, self.reason)


def fit_to_pixel_budget(image: Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """RGB copy of `image` with sides multiples of 28 and at most `max_pixels` pixels.

    Qwen's own `smart_resize` rule (round each side to the factor, scale down to the budget if
    over it), so the processor's resize afterwards is the identity.
    """
    if max_pixels < _MIN_PIXELS:
        raise UsageError(f"max_pixels={max_pixels} is below one {PATCH_FACTOR}x{PATCH_FACTOR} patch; "
                         f"use at least {_MIN_PIXELS}")
    image = image.convert("RGB")
    height, width = smart_resize(image.height, image.width, factor=PATCH_FACTOR,
                                 min_pixels=_MIN_PIXELS, max_pixels=max_pixels)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def spread_indices(num_frames: int, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """Indices of at most `max_frames` frames spread evenly over `num_frames` (first and last kept)."""
    if max_frames < 1:
        raise UsageError(f"max_frames={max_frames}: must be at least 1")
    if num_frames <= max_frames:
        return np.arange(num_frames)
    return np.linspace(0, num_frames - 1, max_frames).astype(np.int64)


def fit_frames(frames: Sequence[Image.Image], max_frames: int = MAX_FRAMES,
               max_pixels: int = MAX_PIXELS) -> list[Image.Image]:
    """Apply the policy to already-decoded frames (idempotent on frames that already follow it).

    A video is one tensor, so every frame takes the size the first frame fits to.
    """
    if not frames:
        raise UsageError("a video needs at least one frame; got none")
    chosen = [frames[i] for i in spread_indices(len(frames), max_frames)]
    first = fit_to_pixel_budget(chosen[0], max_pixels)
    fitted = [first]
    for frame in chosen[1:]:
        frame = frame.convert("RGB")
        if frame.size != first.size:
            frame = frame.resize(first.size, Image.Resampling.LANCZOS)
        fitted.append(frame)
    return fitted


def load_frames(paths: Sequence[str | Path], max_frames: int = MAX_FRAMES,
                max_pixels: int = MAX_PIXELS) -> list[Image.Image]:
    """Read a clip stored as frame images (one per second), keeping at most `max_frames` of them."""
    if not paths:
        raise UsageError("load_frames: no frame paths given; a clip needs at least one frame")
    frames = []
    for i in spread_indices(len(paths), max_frames):
        frames.append(_open_image(paths[i]))
    return fit_frames(frames, max_frames, max_pixels)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """One image (e.g. a DIFT mental image) under the same per-frame pixel budget."""
    return fit_to_pixel_budget(_open_image(path), max_pixels)


def _open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # forces the decode while the file is open
    except FileNotFoundError:
        raise FrameLoadError(path, "no such file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise FrameLoadError(path, f"{type(err).__name__}: {err}") from None


def decode_video(path: str | Path, fps: float = VIDEO_FPS, max_frames: int = MAX_FRAMES,
                 max_pixels: int = MAX_PIXELS) -> list[Image.Image]:
    """Decode a video file with PyAV: the frames at t = 0, 1/fps, 2/fps, ... (from the first frame's
    timestamp), then at most `max_frames` of them spread evenly, each fit to the pixel budget."""
    import av

    if fps <= 0:
        raise UsageError(f"fps={fps}: must be positive")
    # Each kept frame is shrunk right away: a long clip at full resolution would not fit in memory.
    picked: list[Image.Image] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise FrameLoadError(path, "the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
            start, next_instant = None, 0.0
            for index, frame in enumerate(container.decode(stream)):
                time = frame.time if frame.time is not None else (index / rate if rate else None)
                if time is None:
                    raise FrameLoadError(path, "frames carry no timestamps and the stream has no rate")
                start = time if start is None else start
                if time - start + _TIMESTAMP_TOLERANCE_S >= next_instant:
                    picked.append(fit_to_pixel_budget(frame.to_image(), max_pixels))
                    next_instant = len(picked) / fps
    except FileNotFoundError:
        raise FrameLoadError(path, "no such file") from None
    except av.FFmpegError as err:
        raise FrameLoadError(path, f"{type(err).__name__}: {err}") from None
    if not picked:
        raise FrameLoadError(path, "no decodable frames")
    return fit_frames(picked, max_frames, max_pixels)


def video_chat_item(frames: Sequence[Image.Image]) -> dict:
    """The user-turn content item of a clip, in the Qwen2.5-VL chat format (also what
    `qwen-vl-utils` and vLLM read the frame rate from)."""
    return {"type": "video", "video": list(frames), "fps": VIDEO_FPS}


def video_processor_kwargs(videos: Sequence[Sequence[Image.Image]], fps: float = VIDEO_FPS) -> dict:
    """Keyword arguments for a Qwen2.5-VL processor call on these (already policy-fit) videos.

    Without metadata the processor assumes 24 fps for a frame list, which sets M-RoPE's temporal
    step to 2/24 s instead of 2/fps; sampling is off because the frames are already the samples.
    """
    return {
        "video_metadata": [VideoMetadata(total_num_frames=len(v), fps=fps) for v in videos],
        "do_sample_frames": False,
        # The per-frame budget above is far below the processor's whole-video cap; saying so
        # silences its warning without changing any size.
        "cap_pixels_per_frame": False,
    }
