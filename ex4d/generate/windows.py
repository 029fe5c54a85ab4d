"""Long clips: overlapping model-length windows blended with a linear cross-fade (numpy only).

A clip longer than the model's 49 frames is cut into windows of 49 frames that overlap by
``overlap`` frames (the last window is aligned to the clip's end, so it may overlap more). Windows run
in order; window k > 0 takes the previous result's frame at its own start as its image condition and
as a fully valid frame 0 (so every window starts from a complete frame, as the release's frame 0 is the
untouched source frame). Where windows overlap, outputs cross-fade linearly from the earlier window to
the later one.
"""

from __future__ import annotations

import numpy as np


def plan_windows(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[(start, end)) windows of length ``window`` covering ``num_frames`` (one window if it fits)."""
    if num_frames <= window:
        return [(0, num_frames)]
    if not 0 < overlap < window:
        raise ValueError(f"overlap must be in 1..{window - 1}, got {overlap}")
    stride = window - overlap
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return [(s, s + window) for s in starts]


def blend_window(result: np.ndarray, frames: np.ndarray, start: int, previous_end: int) -> None:
    """Write a window's frames into the float ``result`` at ``start``, cross-fading linearly over the
    frames [start, previous_end) that the previous window already wrote."""
    n = frames.shape[0]
    overlap = max(0, min(previous_end - start, n))
    if overlap:
        ramp = ((np.arange(overlap, dtype=np.float32) + 1.0) / (overlap + 1.0))[:, None, None, None]
        result[start:start + overlap] = (1.0 - ramp) * result[start:start + overlap] + ramp * frames[:overlap]
    result[start + overlap:start + n] = frames[overlap:]
