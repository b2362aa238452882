"""Decoded pixels of any depth and layout -> what imaging works on (uint8 gray, or BGR), and the
checks every decoder makes before it allocates a frame. The errors every decoder raises live
here too, so imaging (rasters) and dicom share them without importing each other."""
from __future__ import annotations

import numpy as np

DEFAULT_MAX_PIXELS = 40_000_000  # a 6000x6000 frame; ultrasound frames are well under 2 MP
MIN_SIDE = 32  # smaller than this is not an ultrasound frame (and too small for the U-Net)


class DecodeError(ValueError):
    """The bytes are not a usable image; the message is the reason written to the error row."""


class SkipInput(ValueError):
    """The input is valid but holds no image to segment (a DICOM report, plan, waveform...);
    the message is the reason on its `skipped` row. Not an error: it counts in no error rate."""


def check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DecodeError(f"image too large: {width}x{height} exceeds the limit of "
                          f"{max_pixels} pixels")
    if min(width, height) < MIN_SIDE:
        raise DecodeError(f"image too small: {width}x{height} (minimum side {MIN_SIDE} px)")


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any bit depth -> uint8 by scaling 0..max to 0..255 (12- and 16-bit ultrasound alike)."""
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32)
    arr -= min(float(arr.min()), 0.0)
    top = float(arr.max())
    if top <= 0:
        return np.zeros(arr.shape, np.uint8)
    return np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)


def normalize_pixels(arr: np.ndarray) -> np.ndarray:
    """Decoded pixels of any layout -> uint8 gray, or BGR when colour is present."""
    arr = to_uint8(arr)
    if arr.ndim == 2:
        return arr
    channels = arr.shape[2]
    if channels == 1 or channels == 2:  # gray (+ alpha)
        return np.ascontiguousarray(arr[:, :, 0])
    bgr = np.ascontiguousarray(arr[:, :, :3])
    b, g, r = bgr[:, :, 0], bgr[:, :, 1], bgr[:, :, 2]
    if np.array_equal(b, g) and np.array_equal(g, r):
        return np.ascontiguousarray(g)
    return bgr
