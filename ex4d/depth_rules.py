"""Which depth maps fit a video, and which intrinsics are usable: numpy-only rules shared by the CLI
(``ex4d.depth.files.check_depth``) and the Blender add-on (bundled into its ``_core/`` by
``ex4d addon build``), so both accept and refuse the same files with the same messages.

Keep this module free of anything but numpy and ``.errors``: Blender's Python has no torch, cv2 or av.
"""

from __future__ import annotations

import numpy as np

from .errors import DepthError

ASPECT_TOLERANCE = 0.01  # relative difference of width/height ratios still taken as "the same picture"


def same_aspect(w: int, h: int, W: int, H: int) -> bool:
    return abs((w / h) / (W / H) - 1.0) <= ASPECT_TOLERANCE


def turn_words(rotation: int) -> str:
    """Counter-clockwise degrees (FFmpeg's sense) as a person says them: phones mostly turn clockwise."""
    return {90: "90 degrees counter-clockwise", 180: "180 degrees", 270: "90 degrees clockwise"}.get(
        rotation % 360, f"{rotation % 360} degrees"
    )


def check_frame_count(T: int, num_frames: int, source: str = "depth", allow_longer: bool = False) -> None:
    """One depth map per video frame (``allow_longer``: extra frames at the end are dropped later)."""
    if T < num_frames or (T > num_frames and not allow_longer):
        raise DepthError(
            f"{source}: depth has {T} frame{'s' * (T != 1)} but the video has {num_frames}; "
            "give one depth map per video frame"
        )


def check_aspect(
    w: int,
    h: int,
    size: tuple[int, int],
    source: str = "depth",
    *,
    stored_size: tuple[int, int] | None = None,
    rotation: int = 0,
) -> None:
    """Depth of ``w`` x ``h`` must show the picture of a video of ``size`` = (height, width) as displayed:
    the same aspect ratio (any resolution), or, for an anamorphic video, that of ``stored_size`` =
    (height, width) of its stored pixel grid. ``rotation`` (degrees the video is turned for display)
    adds an orientation hint to the error."""
    H, W = size
    anamorphic = stored_size is not None and tuple(stored_size) != (H, W)
    if same_aspect(w, h, W, H) or (anamorphic and same_aspect(w, h, stored_size[1], stored_size[0])):
        return
    message = f"{source}: depth is {w}x{h} (aspect {w / h:.3f}) but the video is {W}x{H} (aspect {W / H:.3f})"
    if anamorphic:
        Hs, Ws = stored_size
        message += (
            f" as displayed ({Ws}x{Hs} stored, non-square pixels); give depth at {W}x{H} or {Ws}x{Hs} "
            "(or either aspect at another resolution)"
        )
    else:
        message += "; the depth maps must cover the same picture"
    if rotation % 360:
        message += (
            f"; the video is rotated {turn_words(rotation)} for display; depth must be in the displayed "
            f"orientation ({W} wide, {H} high, or that aspect)"
        )
    elif not same_aspect(W, H, 1, 1) and same_aspect(w, h, H, W):
        message += f" (it looks turned by 90 degrees: {h} wide and {w} high would fit)"
    raise DepthError(message)


def check_K(K, num_frames: int | None = None, source: str = "depth") -> np.ndarray:
    """Intrinsics from a depth file: a 3x3 matrix or one per frame (T,3,3), finite, with positive focal
    lengths. Returns float64 (3,3) or (T,3,3)."""
    try:
        K = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError):
        raise DepthError(f"{source}: K must be a 3x3 matrix of numbers") from None
    if not (K.shape == (3, 3) or (K.ndim == 3 and K.shape[1:] == (3, 3) and len(K) >= 1)):
        raise DepthError(f"{source}: K must be 3x3 (or one 3x3 per frame, (T,3,3)), got shape {K.shape}")
    if K.ndim == 3 and num_frames is not None and len(K) not in (1, num_frames):
        raise DepthError(f"{source}: K has {len(K)} matrices but the depth has {num_frames} frames")
    if not np.isfinite(K).all():
        raise DepthError(f"{source}: K has NaN or infinite values")
    Ks = K.reshape(-1, 3, 3)
    if not ((Ks[:, 0, 0] > 0) & (Ks[:, 1, 1] > 0)).all():
        raise DepthError(f"{source}: K's focal lengths (K[0,0], K[1,1]) must be positive pixels")
    return K


def check_values(depth: np.ndarray, source: str = "depth") -> None:
    """Every value finite and > 0 (z-depth, not disparity; holes filled): one line naming the first
    frame that breaks the rule."""
    finite = np.isfinite(depth)
    if not finite.all():
        t = int(np.argmax(~finite.all(axis=(1, 2))))
        raise DepthError(f"{source}: {int((~finite).sum())} depth values are NaN or infinite (first in frame {t})")
    bad = depth <= 0
    if bad.any():
        t = int(np.argmax(bad.any(axis=(1, 2))))
        raise DepthError(
            f"{source}: {int(bad.sum())} depth values are zero or negative (first in frame {t}); depth must be "
            "positive z-depth - fill holes (or pass disparity through 1/x) before use"
        )
