"""Synthetic thyroid ultrasound frames with known nodule masks, for the demo, tests and benchmarks.

Each frame imitates a scanner export: a scan region of Rayleigh speckle over layered tissue with
depth attenuation, a hypoechoic nodule with an irregular outline, a dark halo and posterior
shadowing, sometimes a second view side by side, and outside the scan region the clutter that
desensitize must remove (text columns, a gray bar, depth ticks, a body-marker icon), plus cyan
caliper crosses on some frames. Everything is a function of (seed, case number).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from . import imaging, storage

TEXT_LINES = ("P100", "12L6", "9.0", "31fps", "DR65", "2DG", "92")
SIDE_LABELS = ("IZQ", "DER", "ITSMO", "LONG", "TRANS")
CYAN = (255, 255, 0)  # BGR


@dataclass
class Frame:
    key: str
    case_id: str
    image: np.ndarray  # (H, W, 3) uint8 BGR: gray frame, colour only in caliper marks
    mask: np.ndarray  # (H, W) uint8 0/255
    scan_box: tuple[int, int, int, int]  # x, y, w, h of the scan region: everything else is clutter


@dataclass
class _Nodule:
    cx: float  # centre as fractions of the view
    cy: float
    rx: float  # radii as fractions of the view's smaller side
    ry: float
    angle: float
    harmonics: np.ndarray  # (k, 2): amplitude and phase of outline wobble
    echo: float  # echogenicity relative to parenchyma
    shadow: float


def _nodule(rng: np.random.Generator) -> _Nodule:
    k = np.arange(2, 6)
    return _Nodule(
        cx=rng.uniform(0.3, 0.7), cy=rng.uniform(0.35, 0.6),
        rx=rng.uniform(0.12, 0.26), ry=rng.uniform(0.1, 0.22), angle=rng.uniform(0, math.pi),
        harmonics=np.stack([rng.uniform(0, 0.09, k.size) / np.sqrt(k - 1),
                            rng.uniform(0, 2 * math.pi, k.size)], axis=1),
        echo=rng.uniform(0.3, 0.55), shadow=rng.uniform(0.55, 0.85))


def _outline_mask(nodule: _Nodule, vh: int, vw: int, dx: float, dy: float, scale: float) -> np.ndarray:
    """Signed radial distance field: < 1 inside the wobbly ellipse, in units of its radius."""
    side = min(vh, vw)
    yy, xx = np.mgrid[0:vh, 0:vw].astype(np.float32)
    cx, cy = (nodule.cx + dx) * vw, (nodule.cy + dy) * vh
    x, y = xx - cx, yy - cy
    ca, sa = math.cos(nodule.angle), math.sin(nodule.angle)
    u, v = x * ca + y * sa, -x * sa + y * ca
    rx, ry = nodule.rx * side * scale, nodule.ry * side * scale
    theta = np.arctan2(v / ry, u / rx)
    wobble = 1.0 + sum(a * np.cos(k * theta + p)
                       for k, (a, p) in zip(range(2, 2 + len(nodule.harmonics)), nodule.harmonics))
    return np.sqrt((u / rx) ** 2 + (v / ry) ** 2) / wobble


def _view(rng: np.random.Generator, vh: int, vw: int, nodule: _Nodule, layers: dict,
          jitter: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """One scan view: float echo image in [0, 1] and its bool nodule mask."""
    depth = np.linspace(0, 1, vh, dtype=np.float32)[:, None]
    echo = np.full((vh, vw), layers["parenchyma"], np.float32)
    # skin and strap muscles above the gland: a bright line and darker bands
    echo = np.where(depth < layers["skin"], 0.95, echo)
    muscle = (depth > layers["skin"] + 0.02) & (depth < layers["muscle"])
    echo = np.where(muscle, layers["parenchyma"] * 0.6, echo)
    echo = np.where(np.abs(depth - layers["muscle"]) < 0.008, 0.85, echo)
    if layers["vessel"]:  # carotid: anechoic disc beside the gland, not a nodule
        yy, xx = np.mgrid[0:vh, 0:vw]
        vx, vy, vr = layers["vessel"]
        echo = np.where((xx - vx * vw) ** 2 + (yy - vy * vh) ** 2 < (vr * min(vh, vw)) ** 2,
                        0.06, echo)
    dist = _outline_mask(nodule, vh, vw, *jitter)
    inside = dist < 1.0
    halo = (dist >= 0.9) & (dist < 1.0)
    echo = np.where(inside, layers["parenchyma"] * nodule.echo, echo)
    echo = np.where(halo, layers["parenchyma"] * 0.18, echo)
    # posterior acoustic shadow: columns under the nodule lose energy below it
    cols = inside.any(axis=0)
    if cols.any():
        bottom = np.where(inside.any(axis=1))[0].max()
        shade = np.ones((vh, vw), np.float32)
        shade[bottom:, cols] = nodule.shadow
        shade = cv2.GaussianBlur(shade, (0, 0), max(2.0, vw / 80))
        echo *= shade
    echo *= np.exp(-layers["attenuation"] * depth)
    # tissue is not uniform: slow variations in echogenicity, inside the nodule too
    texture = cv2.GaussianBlur(rng.standard_normal((vh, vw)).astype(np.float32), (0, 0),
                               max(3.0, min(vh, vw) / 25))
    echo *= 1.0 + 0.2 * texture / max(1e-6, float(np.abs(texture).max()))
    # fully developed speckle: Rayleigh amplitude, correlated over a couple of pixels
    speckle = rng.rayleigh(1.0, size=(vh, vw)).astype(np.float32)
    speckle = cv2.GaussianBlur(speckle, (0, 0), 0.8) / math.sqrt(math.pi / 2)
    return np.clip(echo * speckle * layers["gain"], 0, 1), inside


def _case_params(rng: np.random.Generator) -> dict:
    return {
        "two_views": rng.random() < 0.45,
        "layers": {
            "parenchyma": rng.uniform(0.42, 0.55), "skin": rng.uniform(0.02, 0.05),
            "muscle": rng.uniform(0.12, 0.22), "attenuation": rng.uniform(0.3, 0.9),
            "gain": rng.uniform(0.85, 1.1),
            "vessel": (rng.uniform(0.08, 0.2), rng.uniform(0.3, 0.6), rng.uniform(0.07, 0.1))
            if rng.random() < 0.3 else None,
        },
        "nodules": [_nodule(rng), _nodule(rng)],
        "calipers": rng.random() < 0.12,
        "label": SIDE_LABELS[rng.integers(len(SIDE_LABELS))],
    }


def _draw_clutter(canvas: np.ndarray, rng: np.random.Generator, box: tuple[int, int, int, int],
                  label: str) -> None:
    """Scanner text, gray bar, depth ticks and body marker, all outside the scan box."""
    height, width = canvas.shape[:2]
    x, y, w, h = box
    scale = max(0.22, height / 1000)
    thick = 1
    text_x = min(width - int(40 * scale / 0.36), x + w + max(4, width // 40))
    for i, line in enumerate(TEXT_LINES):
        cv2.putText(canvas, line, (text_x, int((i + 1) * 14 * scale / 0.36)),
                    cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), thick, cv2.LINE_AA)
    cv2.putText(canvas, label, (max(2, x), min(height - 4, y + h + int(22 * scale / 0.36))),
                cv2.FONT_HERSHEY_SIMPLEX, scale * 1.1, (230, 230, 230), thick, cv2.LINE_AA)
    bar_x, bar_w = max(1, width // 70), max(2, width // 80)
    bar_top, bar_bottom = int(height * 0.42), int(height * 0.7)
    for row in range(bar_top, bar_bottom):
        level = int(255 * (bar_bottom - row) / (bar_bottom - bar_top))
        canvas[row, bar_x:bar_x + bar_w] = level
    tick_x = max(0, x - max(4, width // 30))
    for ty in range(y, y + h, max(6, h // 6)):
        cv2.circle(canvas, (tick_x, ty), max(1, width // 400), (255, 255, 255), -1)
    icon_x, icon_y = width - max(10, width // 10), height - max(8, height // 14)
    radius = max(3, width // 60)
    cv2.ellipse(canvas, (icon_x, icon_y), (radius * 2, radius), 0, 180, 360, (220, 220, 220), 1)
    cv2.circle(canvas, (icon_x, icon_y), radius // 2 + 1, (220, 220, 220), 1)


def _draw_calipers(canvas: np.ndarray, mask: np.ndarray) -> None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return
    arm = max(2, canvas.shape[1] // 120)
    for px, py in ((xs.min(), int(ys.mean())), (xs.max(), int(ys.mean())),
                   (int(xs.mean()), ys.min()), (int(xs.mean()), ys.max())):
        cv2.line(canvas, (int(px) - arm, int(py)), (int(px) + arm, int(py)), CYAN, 1)
        cv2.line(canvas, (int(px), int(py) - arm), (int(px), int(py) + arm), CYAN, 1)


def render(rng: np.random.Generator, params: dict, height: int, width: int
           ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """One frame of a case: (BGR uint8 image, uint8 0/255 mask, scan box)."""
    canvas = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    views = 2 if params["two_views"] else 1
    view_w = int(width * (rng.uniform(0.38, 0.43) if views == 2 else rng.uniform(0.45, 0.58)))
    view_h = int(height * rng.uniform(0.78, 0.86))
    x0 = int((width - views * view_w) * rng.uniform(0.2, 0.6))
    y0 = int(height * rng.uniform(0.01, 0.05))
    for v in range(views):
        jitter = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(0.9, 1.1))
        echo, inside = _view(rng, view_h, view_w, params["nodules"][v], params["layers"], jitter)
        vx = x0 + v * view_w
        canvas[y0:y0 + view_h, vx:vx + view_w] = (echo * 255).astype(np.uint8)[:, :, None]
        mask[y0:y0 + view_h, vx:vx + view_w][inside] = 255
    box = (x0, y0, views * view_w, view_h)
    _draw_clutter(canvas, rng, box, params["label"])
    if params["calipers"]:
        _draw_calipers(canvas, mask)
    return canvas, mask, box


def generate(n_frames: int, seed: int = 0, height: int = 360, width: int = 560,
             max_frames_per_case: int = 3) -> Iterator[Frame]:
    """n_frames frames in cases of 1..max_frames_per_case frames, keyed `<case>_<frame>`."""
    produced, case = 0, 1
    while produced < n_frames:
        rng = np.random.default_rng([seed, case])
        params = _case_params(rng)
        for frame in range(1, int(rng.integers(1, max_frames_per_case + 1)) + 1):
            if produced >= n_frames:
                return
            image, mask, box = render(rng, params, height, width)
            yield Frame(f"{case}_{frame}", str(case), image, mask, box)
            produced += 1
        case += 1


def write_folders(root: str, n_frames: int, seed: int = 0, height: int = 360, width: int = 560,
                  image_format: str = "jpg") -> list[str]:
    """A `folders` dataset (images/*.jpg, masks/*.png) under a local path or S3 prefix."""
    keys = []
    for frame in generate(n_frames, seed, height, width):
        if image_format == "jpg":
            ok, buf = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, 92])
            data = buf.tobytes()
        else:
            data = imaging.encode_png(frame.image)
        storage.write_bytes(storage.join(root, "images", f"{frame.key}.{image_format}"), data)
        storage.write_bytes(storage.join(root, "masks", f"{frame.key}.png"),
                            imaging.encode_png(frame.mask))
        keys.append(frame.key)
    return keys
