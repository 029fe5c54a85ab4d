"""Input checks and the release's mask/colour preparation (numpy + OpenCV; no torch).

The release erodes every mask frame with a k x k kernel, k drawn uniformly from 2..8 per frame
(unseeded there; seeded here so the same seed gives the same output), binarises at 0.5, multiplies the
colour by the mask and maps both to [-1, 1] (holes become -1). The second x2-1 mapping of the mask
happens in :mod:`.adapter` (``encode_video_condition``), exactly as the trained weights expect.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import InputError
from .settings import EROSION_MAX, EROSION_MIN, MASK_THRESHOLD, SIZE_MULTIPLE, TIME_FACTOR


def check_inputs(color: np.ndarray, mask: np.ndarray) -> None:
    """Colour (T,H,W,3) uint8 and mask (T,H,W) bool of the same length and size."""
    if not isinstance(color, np.ndarray) or color.ndim != 4 or color.shape[-1] != 3:
        raise InputError(f"colour must be a (T,H,W,3) array, got shape {getattr(color, 'shape', None)}")
    if color.dtype != np.uint8:
        raise InputError(f"colour must be uint8, got {color.dtype}")
    if not isinstance(mask, np.ndarray) or mask.ndim != 3:
        raise InputError(f"mask must be a (T,H,W) array, got shape {getattr(mask, 'shape', None)}")
    if mask.dtype != np.bool_:
        raise InputError(f"mask must be bool (True = valid guide pixel), got {mask.dtype}")
    if color.shape[0] != mask.shape[0]:
        raise InputError(f"colour has {color.shape[0]} frames but the mask has {mask.shape[0]}")
    if color.shape[1:3] != mask.shape[1:3]:
        raise InputError(
            f"colour is {color.shape[2]}x{color.shape[1]} but the mask is {mask.shape[2]}x{mask.shape[1]}"
        )
    if color.shape[0] < 1:
        raise InputError("the clip has no frames")


def mask_from_gray(mask_frames: np.ndarray, threshold: float = MASK_THRESHOLD, strict: bool = False) -> np.ndarray:
    """(T,H,W) or (T,H,W,C) uint8 mask video -> bool, True where valid (value > threshold*255).

    Compressed mask videos always carry some grey pixels; they are binarised at the release's 0.5 with a
    warning that says how many there were, or refused when ``strict``.
    """
    m = np.asarray(mask_frames)
    if m.ndim == 4:
        m = m.mean(axis=-1)
    if m.ndim != 3:
        raise InputError(f"mask video frames must be (T,H,W) or (T,H,W,C), got {m.shape}")
    m = m.astype(np.float32)
    grey = int(np.count_nonzero((m > 16) & (m < 239)))
    if grey:
        share = 100.0 * grey / m.size
        msg = f"the mask is not binary: {grey} grey pixel(s) ({share:.2f}%) between 16 and 239"
        if strict:
            raise InputError(msg + " (drop --strict-mask to binarise at the release's threshold)")
        warnings.warn(msg + f"; binarised at {threshold:g} as the EX-4D release does")
    return m > threshold * 255.0


def erosion_kernels(num_frames: int, seed: int) -> np.ndarray:
    """Per-frame erosion kernel sizes k, uniform in [EROSION_MIN, EROSION_MAX], from ``seed``."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xE4D])
    return rng.integers(EROSION_MIN, EROSION_MAX + 1, size=num_frames)


def erode_masks(mask: np.ndarray, seed: int, kernels: np.ndarray | None = None) -> np.ndarray:
    """Erode each (bool) mask frame with a k x k box, then binarise at 0.5 (the release's order)."""
    if kernels is None:
        kernels = erosion_kernels(mask.shape[0], seed)
    out = np.empty(mask.shape, dtype=np.bool_)
    for t, k in enumerate(kernels):
        eroded = cv2.erode(mask[t].astype(np.uint8) * 255, np.ones((int(k), int(k)), np.uint8), iterations=1)
        out[t] = eroded.astype(np.float32) / 255.0 > MASK_THRESHOLD
    return out


@dataclass
class PreparedClip:
    """Model-ready inputs in [-1, 1], channel-first (3, T, H, W) float32 numpy."""

    color: np.ndarray  # colour * mask mapped to [-1, 1]; holes are -1
    mask: np.ndarray  # mask mapped to [-1, 1], three identical channels
    eroded: np.ndarray  # (T,H,W) bool, the mask actually used


def prepare_clip(color: np.ndarray, mask: np.ndarray, seed: int, erode: bool = True) -> PreparedClip:
    eroded = erode_masks(mask, seed) if erode else mask.copy()
    m = eroded.astype(np.float32)
    c = color.astype(np.float32) / 255.0 * m[..., None]
    color_m11 = np.ascontiguousarray((c * 2.0 - 1.0).transpose(3, 0, 1, 2))
    mask_m11 = np.ascontiguousarray(np.repeat((m * 2.0 - 1.0)[None], 3, axis=0))
    return PreparedClip(color=color_m11, mask=mask_m11, eroded=eroded)


def round_size(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """Nearest multiples of ``multiple``, halves rounded up (at least one multiple)."""
    h = max(multiple, (height + multiple // 2) // multiple * multiple)
    w = max(multiple, (width + multiple // 2) // multiple * multiple)
    return h, w


def round_frames(num_frames: int) -> int:
    """Smallest 4k+1 >= num_frames (Wan's VAE takes 1 + 4k frames)."""
    return ((max(1, num_frames) - 1 + TIME_FACTOR - 1) // TIME_FACTOR) * TIME_FACTOR + 1


def fit_to_model(color: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Resize to the nearest size the model takes (multiples of 16), warning when it had to."""
    t, h, w = mask.shape
    mh, mw = round_size(h, w)
    if (mh, mw) == (h, w):
        return color, mask, (h, w)
    warnings.warn(f"{w}x{h} is not a multiple of {SIZE_MULTIPLE}: generating at {mw}x{mh} and resizing back")
    color = np.stack([cv2.resize(f, (mw, mh), interpolation=cv2.INTER_AREA) for f in color])
    mask = np.stack([cv2.resize(f.astype(np.uint8), (mw, mh), interpolation=cv2.INTER_NEAREST) for f in mask]) > 0
    return color, mask, (h, w)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_CUBIC) for f in frames])
