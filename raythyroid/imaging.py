"""Images in, model input out: decode, desensitize, CLAHE, resize, and the way back.

`prepare` is the only path from a decoded frame to model input. Preprocess calls it once per
training frame and infer on every archive frame, with the PrepConfig recorded in model.json, so a
model never sees input prepared differently from what it was trained on.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, astuple, dataclass, fields

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .dicom import read as dicom_read
from .pixels import (DEFAULT_MAX_PIXELS, MIN_SIDE, DecodeError, SkipInput,  # noqa: F401
                     check_size, normalize_pixels, to_uint8)

# We check sizes ourselves, from the header, before any pixel buffer is allocated.
Image.MAX_IMAGE_PIXELS = None
cv2.setNumThreads(1)  # Ray runs one task per core; OpenCV's own pool would oversubscribe them.


@dataclass(frozen=True)
class PrepConfig:
    """How a frame becomes model input. Stored in model.json; infer rebuilds it from there."""

    size: int = 256
    desensitize: bool = True
    clahe_clip: float = 2.0
    clahe_tile: int = 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PrepConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Geometry:
    """Where the prepared square came from: original frame size and the crop box in it."""

    height: int
    width: int
    x: int
    y: int
    w: int
    h: int
    size: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Geometry":
        return cls(**{f.name: int(data[f.name]) for f in fields(cls)})

    def to_row(self) -> tuple[int, ...]:
        """As 7 ints in field order: one row of an int array column (Ray Data batches)."""
        return astuple(self)

    @classmethod
    def from_row(cls, values) -> "Geometry":
        return cls(*(int(v) for v in values))

    def to_model(self, mask: np.ndarray) -> np.ndarray:
        """An original-frame mask -> 0/1 uint8 at the prepared size (same crop and resize)."""
        crop = mask[self.y:self.y + self.h, self.x:self.x + self.w].astype(np.float32)
        resized = cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        return (resized >= 0.5).astype(np.uint8)

    def restore(self, values: np.ndarray) -> np.ndarray:
        """A prepared-size map (probabilities or 0/1) -> float32 map in the original frame.

        Outside the crop box (borders, burned-in text) the result is 0.
        """
        resized = cv2.resize(values.astype(np.float32), (self.w, self.h),
                             interpolation=cv2.INTER_LINEAR)
        out = np.zeros((self.height, self.width), np.float32)
        out[self.y:self.y + self.h, self.x:self.x + self.w] = resized
        return out

    def restore_as_infer_keeps(self, prob: np.ndarray) -> np.ndarray:
        """A prepared-size probability map -> the original frame, rounded to float16 first as
        infer keeps probabilities: what validation, compare and reports score is what infer
        would segment."""
        return self.restore(prob.astype(np.float16))


# ---------------------------------------------------------------- decoding

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff_format(data: bytes) -> str | None:
    """The format from the first bytes, never from the file name.

    DICOM is tested first: its 128-byte preamble may legally hold a TIFF header.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if dicom_read.is_dicom(data):
        return "dicom"
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from the header alone; Pillow does not decode pixels on open()."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as exc:
        raise DecodeError(f"corrupt {fmt.upper()} header ({type(exc).__name__})") from None


@dataclass
class RasterFrames:
    """A PNG/JPEG/BMP/TIFF file: one frame, decoded already; the same interface as
    `dicom.read.DicomFrames`, so callers need not know which they hold."""

    pixels: np.ndarray
    count: int = 1
    spacing_mm: tuple[float, float] | None = None
    case_id: str | None = None
    ds: None = None  # no DICOM header (DicomFrames.ds holds one)

    def frame(self, index: int) -> np.ndarray:
        return self.pixels


def open_frames(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The one decoding entry: image bytes of any supported format, DICOM included, ->
    an object with `count`, `spacing_mm`, `case_id` and `frame(index)` (uint8 gray or BGR).

    Raises DecodeError (broken input) or SkipInput (a DICOM object that is not an image) for the
    whole file; `frame` raises DecodeError for one frame of a multi-frame file.
    """
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    if sniff_format(data) == "dicom":
        return dicom_read.open_frames(data, max_pixels)
    return RasterFrames(decode(data, max_pixels))


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Raster bytes (PNG, JPEG, BMP, TIFF; any bit depth, gray, RGB, RGBA, palette) -> uint8.

    Returns (H, W) gray, or (H, W, 3) BGR when the frame has colour (caliper marks), which
    `to_gray` removes. Raises DecodeError with a one-line reason. DICOM goes through
    `open_frames`.
    """
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError("not an image: unrecognised file format")
    if fmt == "dicom":
        raise DecodeError("DICOM file: read it with open_frames")
    if fmt == "jpeg" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise DecodeError("truncated JPEG (no end-of-image marker after the scan data)")
    if fmt == "png" and b"IEND" not in data[-64:]:
        raise DecodeError("truncated PNG (no IEND chunk)")
    width, height = header_size(data, fmt)
    check_size(width, height, max_pixels)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DecodeError(f"undecodable {fmt.upper()} data")
    return normalize_pixels(arr)


def to_gray(img: np.ndarray) -> np.ndarray:
    """uint8 gray; coloured overlays (caliper crosses, measurement labels) are inpainted first.

    Scanners draw calipers in saturated colour on gray tissue; left in, a model learns that
    a cyan '+' means nodule. Inpainting from the surrounding speckle removes that shortcut.
    """
    if img.ndim == 2:
        return img
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    marks = colour_marks(img)
    if marks.any():
        gray = cv2.inpaint(gray, marks, 3, cv2.INPAINT_TELEA)
    return gray


def colour_marks(bgr: np.ndarray) -> np.ndarray:
    """uint8 0/1 mask of saturated coloured pixels, dilated to cover their anti-aliased rims."""
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    marks = ((hsv[:, :, 1] > 60) & (hsv[:, :, 2] > 50)).astype(np.uint8)
    if not marks.any():
        return marks
    return cv2.dilate(marks, np.ones((5, 5), np.uint8))


def encode_png(arr: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes; level 1 is several times faster than the default and only slightly larger."""
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def binarize_mask(arr: np.ndarray) -> np.ndarray:
    """Any mask image -> bool. 0/1 masks keep their ones; 8-bit masks (0/255, or anti-aliased
    or JPEG-damaged 0..255) are nodule where >= 128, after scaling other depths to 8 bits."""
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.dtype != np.uint8 or int(arr.max(initial=0)) > 1:
        return to_uint8(arr) >= 128
    return arr > 0


def decode_mask(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    if len(data) == 0:
        raise DecodeError("empty mask file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None or fmt == "dicom":
        raise DecodeError("mask is not an image: unrecognised file format")
    width, height = header_size(data, fmt)
    if width * height > max_pixels:
        raise DecodeError(f"mask too large: {width}x{height}")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DecodeError(f"undecodable {fmt.upper()} mask")
    return binarize_mask(arr)


def fill_polygons(polygons: list[list[tuple[float, float]]], height: int, width: int) -> np.ndarray:
    """Outlines (lists of x, y points) filled, outline pixels included, into one bool mask.

    Pillow's polygon fill reproduces DDTI's published PNG masks pixel for pixel; OpenCV's
    fillPoly rounds vertices differently and adds about a hundred boundary pixels per frame.
    """
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for points in polygons:
        if len(points) >= 3:
            draw.polygon([(float(x), float(y)) for x, y in points], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


# ---------------------------------------------------------------- desensitize

def _runs(flags: np.ndarray) -> list[list[int]]:
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [[int(s), int(e)] for s, e in zip(starts, ends)]


def _span(flags: np.ndarray, max_gap: int, min_length: int) -> tuple[int, int] | None:
    """First to last long run of True, bridging short gaps (the seam between two views)."""
    merged: list[list[int]] = []
    for run in _runs(flags):
        if merged and run[0] - merged[-1][1] <= max_gap:
            merged[-1][1] = run[1]
        else:
            merged.append(run)
    long_runs = [r for r in merged if r[1] - r[0] >= min_length]
    if not long_runs:
        return None
    return long_runs[0][0], long_runs[-1][1]


def find_scan_region(gray: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the image area the transducer produced.

    Scanner text, scale ticks, gray bars and body-marker icons sit on black around the scan
    area. A column belongs to the scan area when most of its pixels (within the scan rows) are
    lit; glyphs light only a few pixels per row or column, so alternating column and row
    profiles converge on the scan rectangle, and two views side by side stay one region.
    Frames without a dark surround (already cropped) come back whole.
    """
    height, width = gray.shape
    lit = cv2.medianBlur(gray, 5) > 12
    top, bottom, left, right = 0, height, 0, width
    for _ in range(3):
        cols = _span(lit[top:bottom].mean(axis=0) > 0.35, width // 40, width // 10)
        if cols is None:
            return 0, 0, width, height
        left, right = cols
        rows = _span(lit[:, left:right].mean(axis=1) > 0.35, height // 40, height // 10)
        if rows is None:
            return 0, 0, width, height
        top, bottom = rows
    if (right - left) * (bottom - top) < 0.1 * width * height:
        return 0, 0, width, height
    return left, top, right - left, bottom - top


def desensitize(gray: np.ndarray, margin_fraction: float = 0.015
                ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Blank everything outside the scan region and return the crop box around it.

    The box keeps a small margin because annotators' outlines often run a few pixels past the
    scan area's edge; the margin itself is blanked, so no text or marker pixel survives.
    """
    height, width = gray.shape
    x, y, w, h = find_scan_region(gray)
    if (x, y, w, h) == (0, 0, width, height):
        return gray, (x, y, w, h)
    clean = np.zeros_like(gray)
    clean[y:y + h, x:x + w] = gray[y:y + h, x:x + w]
    margin = math.ceil(margin_fraction * max(height, width))
    x0, y0 = max(0, x - margin), max(0, y - margin)
    x1, y1 = min(width, x + w + margin), min(height, y + h + margin)
    return clean, (x0, y0, x1 - x0, y1 - y0)


def clahe(gray: np.ndarray, clip: float, tile: int) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(tile, tile)).apply(gray)


def prepare(img: np.ndarray, config: PrepConfig) -> tuple[np.ndarray, Geometry]:
    """A decoded frame -> (size x size uint8 model input, Geometry to map results back)."""
    gray = to_gray(img)
    height, width = gray.shape
    if config.desensitize:
        gray, (x, y, w, h) = desensitize(gray)
    else:
        x, y, w, h = 0, 0, width, height
    crop = gray[y:y + h, x:x + w]
    if config.clahe_clip > 0:
        crop = clahe(crop, config.clahe_clip, config.clahe_tile)
    shrinking = w > config.size or h > config.size
    out = cv2.resize(crop, (config.size, config.size),
                     interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return out, Geometry(height, width, x, y, w, h, config.size)
