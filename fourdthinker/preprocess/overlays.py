"""Mental images: a frame with one object's mask highlighted in red (REFERENCE-SPEC §3.2).

These overlays are the DIFT `image_output` images, so their look is part of the training data:
masked pixels are blended with pure red at alpha 0.4 and the mask's edge is drawn as a solid red line
2 pixels wide. Masks covering less than 0.1% of the image are rejected (the object is not visible
enough to be a useful mental image).

Two deliberate differences from the reference: the overlay is rendered at the model's input size
(the one video policy, `fit_to_pixel_budget`), so training does not resample it a second time; and
the edge line follows every boundary of the mask (holes included) where the reference traced outer
contours only, which needs no connected-component pass (and no OpenCV).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fourdthinker.atomic import atomic_write
from fourdthinker.data.video import MAX_PIXELS, fit_to_pixel_budget

HIGHLIGHT_RGB = (255, 0, 0)
HIGHLIGHT_ALPHA = 0.4
CONTOUR_THICKNESS = 2
# Masks below this fraction of the image are rejected (the reference's threshold).
MIN_MASK_FRACTION = 0.001
JPEG_QUALITY = 95


class OverlayRejected(ValueError):
    """The mask cannot make a mental image; the message is a reason fit for a drop list."""


def load_mask(path: str | Path) -> np.ndarray:
    """A boolean (H, W) mask from a PNG/JPEG image (> 127 is inside) or a `.npy` array (uint8 0/255
    as the reference stored them, or 0/1 / bool)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            array = np.load(path)
            threshold = 127 if array.dtype != bool and array.max(initial=0) > 1 else 0
            mask = array > threshold
        else:
            with Image.open(path) as image:
                mask = np.asarray(image.convert("L")) > 127
    except FileNotFoundError:
        raise OverlayRejected(f"mask {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise OverlayRejected(f"mask {path} cannot be read ({type(err).__name__}: {err})") from None
    if mask.ndim != 2:
        raise OverlayRejected(f"mask {path} has shape {mask.shape}; expected a 2-D (H, W) mask")
    return mask


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`mask` resampled to `size` = (width, height): bilinear on 0/1 floats, then > 0.5."""
    height, width = mask.shape
    if (width, height) == tuple(size):
        return mask
    resized = Image.fromarray(mask.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized) > 0.5


def mask_edge(mask: np.ndarray, thickness: int = CONTOUR_THICKNESS) -> np.ndarray:
    """Pixels of a line `thickness` wide centred on the mask's boundary: the outer `thickness // 2`
    rings of the mask and the `thickness - thickness // 2` rings just outside it (8-neighbourhood).
    Outside the image counts as background, so a mask touching the border is outlined there too."""
    inside_rings = thickness // 2
    outside_rings = thickness - inside_rings
    eroded = ~_dilate(~mask, inside_rings, pad_value=True)
    return (mask & ~eroded) | (~mask & _dilate(mask, outside_rings, pad_value=False))


def render_overlay(frame: np.ndarray, mask: np.ndarray, alpha: float = HIGHLIGHT_ALPHA,
                   thickness: int = CONTOUR_THICKNESS) -> np.ndarray:
    """The highlighted copy of an RGB uint8 `frame` (H, W, 3) for a boolean `mask` of the same size.

    Masked pixels become round((1 - alpha) * pixel + alpha * red); edge pixels become solid red;
    every other pixel is unchanged. Raises `OverlayRejected` for a mask under 0.1% of the image.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be an RGB uint8 (H, W, 3) array; got {frame.dtype} {frame.shape}")
    if mask.shape != frame.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from the frame's {frame.shape[:2]}; "
                         "resize it with resize_mask first")
    fraction = float(mask.mean())
    if fraction < MIN_MASK_FRACTION:
        raise OverlayRejected(f"mask covers {fraction:.4%} of the image (< {MIN_MASK_FRACTION:.1%})")
    red = np.asarray(HIGHLIGHT_RGB, dtype=np.float32)
    blended = np.rint(frame[mask].astype(np.float32) * (1.0 - alpha) + red * alpha)
    out = frame.copy()
    out[mask] = np.clip(blended, 0, 255).astype(np.uint8)
    out[mask_edge(mask, thickness)] = HIGHLIGHT_RGB
    return out


def write_overlay(frame_path: str | Path, mask_path: str | Path, out_path: str | Path,
                  max_pixels: int = MAX_PIXELS) -> Path:
    """Render the overlay of one frame and its mask at the model's input size and write it
    (JPEG or PNG by `out_path`'s suffix, atomically). Raises `OverlayRejected` with the reason when
    the frame or mask cannot be read or the mask is too small."""
    out_path = Path(out_path)
    try:
        with Image.open(frame_path) as image:
            frame = fit_to_pixel_budget(image, max_pixels)
    except FileNotFoundError:
        raise OverlayRejected(f"frame {frame_path} does not exist") from None
    except (OSError, ValueError) as err:
        raise OverlayRejected(f"frame {frame_path} cannot be read ({type(err).__name__}: {err})") from None
    mask = resize_mask(load_mask(mask_path), frame.size)
    try:
        overlay = render_overlay(np.asarray(frame), mask)
    except OverlayRejected as err:
        raise OverlayRejected(f"{mask_path}: {err}") from None
    _save_atomically(Image.fromarray(overlay), out_path)
    return out_path


def _dilate(mask: np.ndarray, rings: int, pad_value: bool) -> np.ndarray:
    """Binary dilation by `rings` steps of the 3x3 square; pixels beyond the border read `pad_value`."""
    for _ in range(rings):
        padded = np.pad(mask, 1, constant_values=pad_value)
        height, width = mask.shape
        grown = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                grown |= padded[dy : dy + height, dx : dx + width]
        mask = grown
    return mask


def _save_atomically(image: Image.Image, path: Path) -> None:
    # Readers (training, a resumed pipeline) never see a half-written image.
    is_jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    kwargs = {"format": "JPEG", "quality": JPEG_QUALITY} if is_jpeg else {"format": Image.registered_extensions().get(path.suffix.lower())}
    atomic_write(path, lambda tmp: image.save(tmp, **kwargs))
