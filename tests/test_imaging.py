import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from raythyroid import imaging, phantom
from raythyroid.imaging import DecodeError, PrepConfig


def gradient(h=48, w=64):
    return (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 255 // (h * w - 1)).astype(np.uint8)


def png_bytes(arr):
    return imaging.encode_png(arr)


def pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_decode_bit_depths_and_colour_layouts_to_uint8_gray():
    gray = gradient()
    assert np.array_equal(imaging.decode(png_bytes(gray)), gray)
    sixteen = gray.astype(np.uint16) * 257
    assert np.array_equal(imaging.decode(png_bytes(sixteen)), gray)
    twelve = gray.astype(np.uint16) * 16  # 12-bit data in a 16-bit container keeps its contrast
    decoded = imaging.decode(png_bytes(twelve))
    assert decoded.max() == 255 and np.corrcoef(decoded.ravel(), gray.ravel())[0, 1] > 0.999
    rgb_gray = np.repeat(gray[:, :, None], 3, axis=2)
    assert np.array_equal(imaging.decode(png_bytes(rgb_gray)), gray)
    rgba = np.dstack([rgb_gray, np.full_like(gray, 255)])
    assert np.array_equal(imaging.decode(png_bytes(rgba)), gray)
    palette = Image.fromarray(gray, "L").convert("P")
    assert np.array_equal(imaging.decode(pil_bytes(palette, "PNG")), gray)
    for fmt in ("BMP", "TIFF"):
        assert np.array_equal(imaging.decode(pil_bytes(Image.fromarray(gray), fmt)), gray)
    jpeg = imaging.decode(pil_bytes(Image.fromarray(gray), "JPEG", quality=95))
    assert jpeg.shape == gray.shape and np.abs(jpeg.astype(int) - gray).mean() < 3
    colour = rgb_gray.copy()
    colour[10:12, 10:20] = (255, 255, 0)
    assert imaging.decode(png_bytes(colour)).shape == (48, 64, 3)  # kept for to_gray


def ihdr_png(width, height):
    """A PNG whose header declares width x height, with a tiny (wrong) body: decoding it
    for real would try to allocate width*height bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "not an image"),
    (ihdr_png(100_000, 100_000), "image too large: 100000x100000"),
    (png_bytes(np.zeros((1, 1), np.uint8)), "image too small: 1x1"),
])
def test_bad_bytes_have_specific_reasons(data, reason):
    with pytest.raises(DecodeError, match=reason):
        imaging.decode(data)


def test_truncated_files_are_rejected_not_half_decoded():
    frame = next(phantom.generate(1, seed=3)).image
    ok, jpg = cv2.imencode(".jpg", frame)
    jpg = jpg.tobytes()
    with pytest.raises(DecodeError, match="truncated JPEG"):
        imaging.decode(jpg[: len(jpg) * 2 // 3])
    png = png_bytes(frame)
    with pytest.raises(DecodeError, match="truncated PNG"):
        imaging.decode(png[: len(png) // 2])
    assert imaging.decode(jpg).shape[:2] == frame.shape[:2]


def test_caliper_marks_are_inpainted_from_surrounding_tissue():
    rng = np.random.default_rng(0)
    tissue = cv2.GaussianBlur(rng.integers(40, 120, (120, 160)).astype(np.uint8), (5, 5), 0)
    marked = cv2.cvtColor(tissue, cv2.COLOR_GRAY2BGR)
    for x, y in ((40, 50), (110, 70)):
        cv2.line(marked, (x - 5, y), (x + 5, y), (255, 255, 0), 1)
        cv2.line(marked, (x, y - 5), (x, y + 5), (255, 255, 0), 1)
    cross = (marked != cv2.cvtColor(tissue, cv2.COLOR_GRAY2BGR)).any(axis=2)
    inpainted = imaging.colour_marks(marked) > 0
    assert inpainted[cross].all()
    plain = cv2.cvtColor(marked, cv2.COLOR_BGR2GRAY)
    cleaned = imaging.to_gray(marked)
    assert np.abs(plain[cross].astype(int) - tissue[cross]).mean() > 60  # the mark stands out
    assert np.abs(cleaned[cross].astype(int) - tissue[cross]).mean() < 20  # and is gone
    assert np.array_equal(cleaned[~inpainted], plain[~inpainted])


def test_desensitize_blanks_every_pixel_outside_the_scan_region():
    for frame in phantom.generate(12, seed=5):
        gray = imaging.to_gray(frame.image)
        clean, (x, y, w, h) = imaging.desensitize(gray)
        sx, sy, sw, sh = frame.scan_box
        outside = np.ones(gray.shape, bool)
        outside[sy:sy + sh, sx:sx + sw] = False
        assert gray[outside].max() > 200, "the phantom draws text and markers outside"
        assert clean[outside].max() == 0, frame.key
        assert x <= sx and y <= sy and x + w >= sx + sw - 2 and y + h >= sy + sh - 2
        mask = frame.mask > 0
        assert mask[y:y + h, x:x + w].sum() == mask.sum()


def test_desensitize_on_real_frames_keeps_nodules_and_drops_borders(ddti):
    areas = []
    for image_path in sorted((ddti / "images").glob("*.jpg")):
        gray = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(ddti / "masks" / f"{image_path.stem}.png"), 0) > 0
        _, (x, y, w, h) = imaging.desensitize(gray)
        kept = mask[y:y + h, x:x + w].sum() / mask.sum()
        assert kept >= 0.995, f"{image_path.name}: crop keeps only {kept:.3%} of the nodule"
        areas.append(w * h / gray.size)
    assert np.mean(areas) < 0.85
    assert len(areas) == 300


def test_prepare_and_geometry_round_trip():
    frame = next(phantom.generate(1, seed=11))
    config = PrepConfig(size=128)
    image, geometry = imaging.prepare(frame.image, config)
    assert image.shape == (128, 128) and image.dtype == np.uint8
    mask = frame.mask > 0
    small = geometry.to_model(mask)
    assert set(np.unique(small)) <= {0, 1}
    restored = geometry.restore(small) >= 0.5
    assert restored.shape == mask.shape
    iou = (restored & mask).sum() / (restored | mask).sum()
    assert iou > 0.9
    assert imaging.Geometry.from_dict(geometry.to_dict()) == geometry
    plain, whole = imaging.prepare(frame.image, PrepConfig(size=128, desensitize=False))
    assert (whole.x, whole.y, whole.w, whole.h) == (0, 0, 560, 360)


def test_binarize_mask_rules():
    assert imaging.binarize_mask(np.array([[0, 1]], np.uint8)).tolist() == [[False, True]]
    assert imaging.binarize_mask(np.array([[0, 127, 128, 255]], np.uint8)).tolist() == \
        [[False, False, True, True]]
    sixteen = np.array([[0, 65535]], np.uint16)
    assert imaging.binarize_mask(sixteen).tolist() == [[False, True]]
