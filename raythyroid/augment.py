"""Online augmentation on the CPU, seeded: the same (seed, epoch, rank, batch) gives the same batch.

nnU-Net-style 2D augmentation. Geometry (rotation, scaling, translation, left-right mirror, a
smooth grid distortion) warps image, mask and loss weight together; intensity changes (gamma,
contrast, brightness, blur, speckle noise) touch the image only. No vertical flips: ultrasound
depth has a direction (near field on top, shadows below).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    probability: float = 0.8  # chance that a sample is warped at all
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.08  # fraction of the side
    mirror: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness: float = 20.0  # +- gray levels
    speckle: float = 0.15  # std of multiplicative noise
    distort: float = 0.03  # grid distortion: largest displacement, as a fraction of the side
    distort_probability: float = 0.3
    blur_probability: float = 0.15
    blur_sigma: tuple[float, float] = (0.5, 1.5)

    def to_dict(self) -> dict:
        return asdict(self)


def _warp_matrix(rng: np.random.Generator, side: int, cfg: AugmentConfig) -> np.ndarray:
    angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
    scale = rng.uniform(*cfg.scale)
    matrix = cv2.getRotationMatrix2D((side / 2 - 0.5, side / 2 - 0.5), angle, scale)
    matrix[:, 2] += rng.uniform(-cfg.translate, cfg.translate, 2) * side
    if rng.random() < cfg.mirror:
        matrix = np.array([[-1, 0, side - 1], [0, 1, 0]], np.float64) @ np.vstack(
            [matrix, [0, 0, 1]])
    return matrix


def _distortion_maps(rng: np.random.Generator, side: int, cfg: AugmentConfig):
    """A smooth random displacement field: a coarse grid of offsets, upsampled."""
    coarse = rng.uniform(-1, 1, (2, 5, 5)).astype(np.float32) * cfg.distort * side
    dx = cv2.resize(coarse[0], (side, side), interpolation=cv2.INTER_CUBIC)
    dy = cv2.resize(coarse[1], (side, side), interpolation=cv2.INTER_CUBIC)
    grid = np.arange(side, dtype=np.float32)
    return grid[None, :] + dx, grid[:, None] + dy


def _intensity(rng: np.random.Generator, image: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    if rng.random() < cfg.blur_probability:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(*cfg.blur_sigma))
    x = image.astype(np.float32) / 255.0
    x = np.power(x, rng.uniform(*cfg.gamma))
    x = (x - 0.5) * rng.uniform(*cfg.contrast) + 0.5 + rng.uniform(-1, 1) * cfg.brightness / 255
    if cfg.speckle > 0:
        x = x * (1.0 + rng.normal(0.0, cfg.speckle * rng.random(), x.shape).astype(np.float32))
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def augment_batch(images: np.ndarray, masks: np.ndarray, weights: np.ndarray | None,
                  rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
                  soft: np.ndarray | None = None):
    """(N, S, S) uint8 images and masks (+ float weights) -> augmented copies; with `soft`
    (a teacher's uint8 probabilities) the same warps applied to it too, as a fourth array.
    The random draws do not depend on `soft`: with or without it a batch is warped alike."""
    images, masks = images.copy(), masks.copy()
    weights = None if weights is None else weights.astype(np.float32, copy=True)
    soft = None if soft is None else soft.copy()
    side = images.shape[-1]
    for i in range(images.shape[0]):
        if rng.random() < cfg.probability:
            matrix = _warp_matrix(rng, side, cfg)
            images[i] = cv2.warpAffine(images[i], matrix, (side, side), flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            masks[i] = cv2.warpAffine(masks[i], matrix, (side, side), flags=cv2.INTER_NEAREST,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            if weights is not None:
                weights[i] = cv2.warpAffine(weights[i], matrix, (side, side),
                                            flags=cv2.INTER_LINEAR,
                                            borderMode=cv2.BORDER_REPLICATE)
            if soft is not None:
                soft[i] = cv2.warpAffine(soft[i], matrix, (side, side), flags=cv2.INTER_LINEAR,
                                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if cfg.distort > 0 and rng.random() < cfg.distort_probability:
            map_x, map_y = _distortion_maps(rng, side, cfg)
            images[i] = cv2.remap(images[i], map_x, map_y, cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            masks[i] = cv2.remap(masks[i], map_x, map_y, cv2.INTER_NEAREST,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            if weights is not None:
                weights[i] = cv2.remap(weights[i], map_x, map_y, cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_REPLICATE)
            if soft is not None:
                soft[i] = cv2.remap(soft[i], map_x, map_y, cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        images[i] = _intensity(rng, images[i], cfg)
    return (images, masks, weights) if soft is None else (images, masks, weights, soft)


PRESETS = ("none", "basic", "strong")


def preset(name: str) -> AugmentConfig | None:
    """none: no augmentation; basic: affine, mirror and intensity; strong: basic plus grid
    distortion and blur (the default recipe)."""
    if name == "none":
        return None
    if name == "basic":
        return AugmentConfig(distort=0.0, blur_probability=0.0)
    if name == "strong":
        return AugmentConfig()
    raise ValueError(f"unknown augmentation preset {name!r}")


def batch_rng(seed: int, epoch: int, rank: int, batch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank, batch])

