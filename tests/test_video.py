"""The one video policy: frame sizes, frame choice, decoding, and what the processor is told."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from fourdthinker.data.video import (MAX_FRAMES, MAX_PIXELS, VIDEO_FPS, FrameLoadError, decode_video,
                                     fit_frames, fit_to_pixel_budget, load_frames, spread_indices,
                                     video_chat_item, video_processor_kwargs)
from fourdthinker.errors import UsageError


def _solid(value: int, height: int = 56, width: int = 84) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8))


@pytest.mark.parametrize("height,width", [(1080, 1920), (720, 1280), (480, 640), (30, 50), (300, 29),
                                          (56, 84), (1000, 1000)])
def test_fit_sizes_are_multiples_of_28_within_budget(height, width):
    fitted = fit_to_pixel_budget(_solid(0, height, width))
    assert fitted.width % 28 == 0 and fitted.height % 28 == 0
    assert fitted.width * fitted.height <= MAX_PIXELS
    assert fitted.mode == "RGB"
    # aspect ratio kept up to the rounding to 28
    assert abs(fitted.width / fitted.height - width / height) <= 28 / min(fitted.height, fitted.width) + 0.05


def test_fit_shrinks_large_frames_to_the_budget_and_keeps_conforming_ones():
    big = fit_to_pixel_budget(_solid(0, 1080, 1920))
    # sqrt(MAX_PIXELS / (1080*1920)) scale, each side floored to 28
    assert (big.height, big.width) == (336, 588)
    small = _solid(7, 112, 168)
    assert fit_to_pixel_budget(small).size == small.size
    assert fit_to_pixel_budget(_solid(0, 1000, 1000), max_pixels=28 * 28 * 4).size == (56, 56)
    with pytest.raises(UsageError, match="max_pixels"):
        fit_to_pixel_budget(small, max_pixels=100)


def test_spread_indices_keeps_short_clips_and_spreads_long_ones():
    np.testing.assert_array_equal(spread_indices(7, 50), np.arange(7))
    np.testing.assert_array_equal(spread_indices(50, 50), np.arange(50))
    idx = spread_indices(101, 50)
    assert len(idx) == 50 and idx[0] == 0 and idx[-1] == 100
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(spread_indices(10, 4), [0, 3, 6, 9])
    assert len(spread_indices(0)) == 0
    with pytest.raises(UsageError):
        spread_indices(5, 0)


def test_load_frames_keeps_max_frames_in_order(tmp_path):
    paths = []
    for i in range(60):
        paths.append(tmp_path / f"frame_{i:04d}.png")
        _solid(i * 4).save(paths[-1])
    frames = load_frames(paths, max_frames=MAX_FRAMES)
    assert len(frames) == MAX_FRAMES
    values = [int(np.asarray(f)[0, 0, 0]) for f in frames]
    assert values == [i * 4 for i in spread_indices(60, MAX_FRAMES)]
    assert {f.size for f in frames} == {(84, 56)}


def test_load_frames_reports_the_bad_path(tmp_path):
    good = tmp_path / "a.png"
    _solid(1).save(good)
    missing = tmp_path / "missing.png"
    with pytest.raises(FrameLoadError) as err:
        load_frames([good, missing])
    assert err.value.path == str(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    with pytest.raises(FrameLoadError, match="corrupt.png"):
        load_frames([corrupt])


def test_fit_frames_gives_every_frame_the_first_frames_size():
    frames = fit_frames([_solid(0, 300, 400), _solid(1, 200, 200), _solid(2, 600, 800)])
    assert {f.size for f in frames} == {frames[0].size}
    assert frames[0].size == fit_to_pixel_budget(_solid(0, 300, 400)).size
    with pytest.raises(UsageError):
        fit_frames([])


def _write_mp4(path, num_frames: int, rate: int, height: int = 64, width: int = 96):
    """Frame i is a flat grey of value 10*i, so a decoded frame tells which source frame it was."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 10 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _source_index(frame: Image.Image) -> int:
    return round(float(np.asarray(frame).mean()) / 10)


def test_decode_video_samples_one_frame_per_second(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_mp4(path, num_frames=20, rate=4)  # 5 s at 4 fps
    frames = decode_video(path)
    assert [_source_index(f) for f in frames] == [0, 4, 8, 12, 16]
    assert all(f.width % 28 == 0 and f.height % 28 == 0 for f in frames)
    assert frames[0].size == fit_to_pixel_budget(_solid(0, 64, 96)).size

    spread = decode_video(path, max_frames=3)
    assert [_source_index(f) for f in spread] == [0, 8, 16]
    assert [_source_index(f) for f in decode_video(path, fps=2.0)] == list(range(0, 20, 2))


def test_decode_video_reports_unreadable_files(tmp_path):
    with pytest.raises(FrameLoadError):
        decode_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(FrameLoadError, match="bad.mp4"):
        decode_video(bad)


def test_processor_sees_the_policy_frame_rate(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    frames = fit_frames([_solid(v) for v in (0, 50, 100, 150)])
    item = video_chat_item(frames)
    assert item["type"] == "video" and item["fps"] == VIDEO_FPS and len(item["video"]) == 4
    out = processor.video_processor(videos=[frames], **video_processor_kwargs([frames]))
    video = processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[frames],
                      **video_processor_kwargs([frames]))
    # M-RoPE's temporal step: temporal_patch_size frames per grid step, at VIDEO_FPS frames a second
    temporal = processor.video_processor.temporal_patch_size
    assert video["second_per_grid_ts"] == [temporal / VIDEO_FPS]
    # the processor does not resize policy-fit frames: grid = frame size / patch
    patch = processor.video_processor.patch_size
    assert out["video_grid_thw"].tolist() == [[4 // temporal, 56 // patch, 84 // patch]]
