"""Scale/shift alignment of relative (affine-invariant) inverse depth.

Per-frame models (Depth Anything V2) predict disparity up to an unknown scale and shift *per frame*,
so a clip flickers. :func:`align_disparity_sequence` fits each frame to a running reference by least
squares over robust pixels, which makes the whole clip share one scale and shift. The same
least-squares fit stitches Video Depth Anything's windows (:func:`fit_scale_shift`).

numpy only (called on CPU arrays after the network ran).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def fit_scale_shift(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """(s, b) minimising sum over mask of (s * prediction + b - target)^2; (1, 0) when degenerate."""
    p = np.asarray(prediction, dtype=np.float64).ravel()
    t = np.asarray(target, dtype=np.float64).ravel()
    if mask is not None:
        m = np.asarray(mask, dtype=bool).ravel()
        p, t = p[m], t[m]
    n = p.size
    if n < 2:
        return 1.0, 0.0
    sp, st = p.sum(), t.sum()
    spp, spt = (p * p).sum(), (p * t).sum()
    det = n * spp - sp * sp
    if not np.isfinite(det) or abs(det) <= 1e-12 * max(1.0, n * spp):
        return 1.0, 0.0
    s = (n * spt - sp * st) / det
    b = (spp * st - sp * spt) / det
    return float(s), float(b)


@dataclass(frozen=True)
class AlignConfig:
    """Robust temporal alignment settings.

    ``low_quantile``/``high_quantile``: pixels whose disparity lies outside these quantiles in the
    reference or the current frame are left out of the fit (sky / near clutter / edges).
    ``trim_quantile``: after a first fit, pixels whose residual is above this quantile (moving
    objects, occlusions) are dropped and the fit is redone once.
    ``reference_momentum``: the running reference is ``(1 - m) * reference + m * aligned_frame``, so
    it follows slow scene changes while staying anchored to the first frame's scale.
    ``max_pixels``: fits use a regular subsample of at most this many pixels (speed).
    """

    low_quantile: float = 0.05
    high_quantile: float = 0.95
    trim_quantile: float = 0.8
    reference_momentum: float = 0.5
    max_pixels: int = 200_000


def _robust_fit(pred: np.ndarray, ref: np.ndarray, config: AlignConfig) -> tuple[float, float]:
    p, r = pred.ravel(), ref.ravel()
    step = max(1, p.size // max(1, config.max_pixels))
    p, r = p[::step].astype(np.float64), r[::step].astype(np.float64)
    finite = np.isfinite(p) & np.isfinite(r)
    p, r = p[finite], r[finite]
    if p.size < 2:
        return 1.0, 0.0
    p_lo, p_hi = np.quantile(p, [config.low_quantile, config.high_quantile])
    r_lo, r_hi = np.quantile(r, [config.low_quantile, config.high_quantile])
    keep = (p >= p_lo) & (p <= p_hi) & (r >= r_lo) & (r <= r_hi)
    if keep.sum() < 16:  # nearly constant frame: use everything
        keep = np.ones_like(p, dtype=bool)
    s, b = fit_scale_shift(p[keep], r[keep])
    residual = np.abs(s * p + b - r)
    limit = np.quantile(residual[keep], config.trim_quantile)
    inliers = keep & (residual <= limit)
    if inliers.sum() >= 16:
        s, b = fit_scale_shift(p[inliers], r[inliers])
    return s, b


def align_disparity_sequence(disparity: np.ndarray, config: AlignConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Align (T, H, W) per-frame relative disparity to frame 0's scale and shift.

    Returns (aligned (T, H, W) float32, params (T, 2) float64 with each frame's (scale, shift)).
    A frame whose fit comes out non-positive in scale (unusable) keeps the previous frame's params.
    """
    config = config or AlignConfig()
    d = np.asarray(disparity, dtype=np.float32)
    aligned = np.empty_like(d)
    params = np.zeros((d.shape[0], 2), dtype=np.float64)
    aligned[0] = d[0]
    params[0] = (1.0, 0.0)
    reference = d[0].astype(np.float64)
    for t in range(1, d.shape[0]):
        s, b = _robust_fit(d[t], reference, config)
        if not (np.isfinite(s) and np.isfinite(b)) or s <= 0:
            s, b = params[t - 1]
        params[t] = (s, b)
        aligned[t] = (s * d[t].astype(np.float64) + b).astype(np.float32)
        m = config.reference_momentum
        reference = (1.0 - m) * reference + m * aligned[t]
    return aligned, params


def blend_weights(length: int) -> np.ndarray:
    """Linear cross-fade weights 0..1 (inclusive) for ``length`` overlapping frames."""
    if length <= 1:
        return np.ones(max(length, 0))
    return np.linspace(0.0, 1.0, length)
