"""Mental-image overlays: red alpha-0.4 highlight + edge line, tiny masks rejected (REFERENCE-SPEC §3.2)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fourdthinker.data.video import fit_to_pixel_budget
from fourdthinker.preprocess.overlays import (
    HIGHLIGHT_ALPHA,
    MIN_MASK_FRACTION,
    OverlayRejected,
    load_mask,
    render_overlay,
    write_overlay,
)


def _frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _chebyshev_distance_to_edge(mask: np.ndarray) -> np.ndarray:
    """Brute force: for each pixel, the Chebyshev distance to the nearest pixel of the other class
    (outside the image counts as background)."""
    height, width = mask.shape
    padded = np.pad(mask, 1, constant_values=False)
    out = np.zeros(mask.shape, dtype=int)
    for y in range(height):
        for x in range(width):
            mine = mask[y, x]
            best = 10**6
            for yy in range(height + 2):
                for xx in range(width + 2):
                    if padded[yy, xx] != mine:
                        best = min(best, max(abs(yy - 1 - y), abs(xx - 1 - x)))
            out[y, x] = best
    return out


def test_highlight_is_exact_blend_inside_unchanged_outside_and_red_edge():
    frame = _frame(20, 24)
    mask = np.zeros((20, 24), dtype=bool)
    mask[4:15, 6:19] = True
    mask[8:11, 10:13] = False  # a hole: its boundary is outlined too
    out = render_overlay(frame, mask)
    distance = _chebyshev_distance_to_edge(mask)

    interior = mask & (distance >= 2)
    expected = np.rint(frame.astype(np.float64) * (1 - HIGHLIGHT_ALPHA)
                       + np.array([255, 0, 0]) * HIGHLIGHT_ALPHA).astype(np.uint8)
    np.testing.assert_array_equal(out[interior], expected[interior])
    assert interior.sum() > 30

    far_outside = ~mask & (distance >= 2)
    np.testing.assert_array_equal(out[far_outside], frame[far_outside])
    # The 2-pixel edge line: the mask's outer ring and the ring just outside it are solid red.
    edge = distance == 1
    assert np.all(out[edge] == [255, 0, 0])
    assert edge.sum() > 0


def test_mask_touching_the_border_is_outlined_there():
    frame = _frame(10, 10)
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :5] = True
    out = render_overlay(frame, mask)
    assert np.all(out[:, 0] == [255, 0, 0])  # the image border is the mask's edge
    assert np.all(out[:, 4:6] == [255, 0, 0])  # one ring inside, one outside the inner edge
    np.testing.assert_array_equal(out[1:-1, 7:], frame[1:-1, 7:])


def test_tiny_mask_rejected_and_threshold_mask_accepted():
    frame = _frame(100, 100)
    at_threshold = np.zeros((100, 100), dtype=bool)
    at_threshold.flat[: int(MIN_MASK_FRACTION * 100 * 100)] = True  # exactly 0.1%
    render_overlay(frame, at_threshold)
    below = at_threshold.copy()
    below.flat[0] = False
    with pytest.raises(OverlayRejected, match="0.1%"):
        render_overlay(frame, below)
    with pytest.raises(OverlayRejected):
        render_overlay(frame, np.zeros((100, 100), dtype=bool))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="resize_mask"):
        render_overlay(_frame(10, 10), np.ones((10, 12), dtype=bool))


def test_write_overlay_renders_at_model_input_size(tmp_path):
    frame = _frame(420, 560, seed=1)  # over the pixel budget: the model sees it smaller
    frame_path, mask_path = tmp_path / "frame.png", tmp_path / "mask.png"
    Image.fromarray(frame).save(frame_path)
    mask = np.zeros((420, 560), dtype=bool)
    mask[100:300, 200:400] = True
    Image.fromarray(mask).save(mask_path)

    out = write_overlay(frame_path, mask_path, tmp_path / "out" / "overlay.png")
    written = np.asarray(Image.open(out))
    model_frame = np.asarray(fit_to_pixel_budget(Image.fromarray(frame)))
    assert written.shape == model_frame.shape
    scale_y, scale_x = written.shape[0] / 420, written.shape[1] / 560
    # Well inside the (resized) mask: the exact blend of the resized frame; well outside: untouched.
    y, x = int(200 * scale_y), int(300 * scale_x)
    expected = np.rint(model_frame[y, x] * (1 - HIGHLIGHT_ALPHA) + np.array([255, 0, 0]) * HIGHLIGHT_ALPHA)
    np.testing.assert_array_equal(written[y, x], expected.astype(np.uint8))
    np.testing.assert_array_equal(written[10, 10], model_frame[10, 10])


def test_write_overlay_jpeg_and_npy_mask(tmp_path):
    frame = _frame(56, 84)
    Image.fromarray(frame).save(tmp_path / "frame.jpg")
    mask = np.zeros((56, 84), dtype=np.uint8)
    mask[10:40, 20:60] = 255  # the reference's .npy masks: uint8 0/255
    np.save(tmp_path / "mask.npy", mask)
    out = write_overlay(tmp_path / "frame.jpg", tmp_path / "mask.npy", tmp_path / "o.jpg")
    with Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (84, 56)
        written = np.asarray(image, dtype=float)
    source = frame.astype(float)
    inner = (slice(14, 36), slice(24, 56))
    # Lossy, so compare region means with the expected blend: red up, green and blue down by alpha.
    expected = source[inner].mean((0, 1)) * (1 - HIGHLIGHT_ALPHA) + np.array([255, 0, 0]) * HIGHLIGHT_ALPHA
    np.testing.assert_allclose(written[inner].mean((0, 1)), expected, atol=4)
    assert list(tmp_path.glob(".o.*")) == []  # no temporary file left behind


def test_load_mask_variants(tmp_path):
    bool_mask = np.zeros((8, 8), dtype=bool)
    bool_mask[2:5, 3:6] = True
    np.save(tmp_path / "b.npy", bool_mask)
    np.save(tmp_path / "u.npy", bool_mask.astype(np.uint8))  # 0/1
    Image.fromarray(bool_mask).save(tmp_path / "m.png")  # 1-bit PNG
    for name in ("b.npy", "u.npy", "m.png"):
        np.testing.assert_array_equal(load_mask(tmp_path / name), bool_mask)


def test_unreadable_inputs_are_rejected_with_the_path(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    Image.fromarray(_frame(8, 8)).save(tmp_path / "f.png")
    with pytest.raises(OverlayRejected, match="bad.png"):
        write_overlay(tmp_path / "f.png", tmp_path / "bad.png", tmp_path / "o.png")
    with pytest.raises(OverlayRejected, match="missing.png"):
        write_overlay(tmp_path / "missing.png", tmp_path / "f.png", tmp_path / "o.png")
    np.save(tmp_path / "three_d.npy", np.ones((2, 8, 8)))
    with pytest.raises(OverlayRejected, match="2-D"):
        load_mask(tmp_path / "three_d.npy")
