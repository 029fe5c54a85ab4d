"""The ``draft`` generator: classical hole filling, CPU, seconds, always available.

1. Temporal propagation: every hole pixel takes the colour of the same pixel in the nearest frame (in
   time, within ``window`` frames; the earlier frame wins a tie) where that pixel is valid guide content.
   Camera-relative guides move slowly between neighbouring frames, so this recovers most disocclusions.
2. OpenCV inpainting (Telea) fills what is left, frame by frame (at half resolution when more than 2% of
   the frame is left, which is 4x faster and looks the same for a draft).

Valid pixels are returned unchanged, bit for bit. No model, no torch.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from ..errors import Cancelled
from .conditioning import check_inputs


class DraftGenerator:
    name = "draft"
    memory_mode = "cpu"

    def __init__(self, window: int = 8, inpaint_radius: int = 3, full_resolution_below: float = 0.02):
        self.window = int(window)
        self.inpaint_radius = int(inpaint_radius)
        self.full_resolution_below = float(full_resolution_below)  # hole share inpainted at full resolution

    def generate(self, color: np.ndarray, mask: np.ndarray, *, prompt: str | None = None, seed: int = 0,
                 steps: int | None = None, cfg: float | None = None, progress=None,
                 cancel: threading.Event | None = None) -> np.ndarray:
        """prompt/seed/steps/cfg are accepted for interface parity and ignored (the fill is deterministic)."""
        check_inputs(color, mask)
        num_frames = color.shape[0]
        out = color.copy()
        for t in range(num_frames):
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
            out[t] = self._fill_frame(color, mask, t)
            if progress is not None:
                progress("fill", t + 1, num_frames)
        return out

    def _fill_frame(self, color: np.ndarray, mask: np.ndarray, t: int) -> np.ndarray:
        frame = color[t].copy()
        hole = ~mask[t]
        if not hole.any():
            return frame
        num_frames = color.shape[0]
        for distance in range(1, self.window + 1):
            for source in (t - distance, t + distance):
                if not 0 <= source < num_frames:
                    continue
                take = hole & mask[source]
                if take.any():
                    frame[take] = color[source][take]
                    hole &= ~take
            if not hole.any():
                return frame
        return self._inpaint(frame, hole)

    def _inpaint(self, frame: np.ndarray, hole: np.ndarray) -> np.ndarray:
        """Telea inpainting; large holes are filled at half resolution (4x fewer pixels to march), and
        only the hole pixels take the upsampled result."""
        frame[hole] = 0
        hole_u8 = hole.astype(np.uint8) * 255
        h, w = hole.shape
        if hole.mean() < self.full_resolution_below or min(h, w) < 32:
            return cv2.inpaint(frame, hole_u8, self.inpaint_radius, cv2.INPAINT_TELEA)
        small = cv2.resize(frame, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        small_hole = cv2.dilate(cv2.resize(hole_u8, (w // 2, h // 2), interpolation=cv2.INTER_NEAREST), np.ones((3, 3), np.uint8))
        filled = cv2.resize(cv2.inpaint(small, small_hole, self.inpaint_radius, cv2.INPAINT_TELEA), (w, h),
                            interpolation=cv2.INTER_LINEAR)
        frame[hole] = filled[hole]
        return frame
