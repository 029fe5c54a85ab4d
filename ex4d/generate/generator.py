"""The ex4d / tiny generator: validation, size and length fitting, windows, OOM reporting."""

from __future__ import annotations

import threading
import warnings

import numpy as np

from ..errors import InputError, OutOfMemoryError
from .conditioning import check_inputs, fit_to_model, prepare_clip, resize_frames, round_frames
from .settings import (EX4D_PROMPT, RELEASE_CFG, RELEASE_FRAMES, RELEASE_SIGMA_SHIFT, RELEASE_STEPS,
                       WAN_NEGATIVE_PROMPT, WINDOW_OVERLAP)
from .windows import blend_window, plan_windows

_NEXT_MODE = {"resident": "fp8 (or offload)", "fp8": "offload", "offload": "offload with a smaller size or fewer frames"}


class Ex4dGenerator:
    """Wan2.1-I2V + EX-4D adapter behind the common ``generate(color, mask, ...)`` call."""

    def __init__(self, pipe, *, name: str = "ex4d", window: int = RELEASE_FRAMES, overlap: int = WINDOW_OVERLAP,
                 negative_prompt: str = WAN_NEGATIVE_PROMPT, sigma_shift: float = RELEASE_SIGMA_SHIFT):
        if (window - 1) % 4:
            raise InputError(f"the window must have 4k+1 frames, got {window}")
        self.pipe = pipe
        self.name = name
        self.window = window
        self.overlap = overlap
        self.negative_prompt = negative_prompt
        self.sigma_shift = sigma_shift

    @property
    def memory_mode(self) -> str:
        return self.pipe.memory_mode

    def generate(self, color: np.ndarray, mask: np.ndarray, *, prompt: str | None = None, seed: int = 0,
                 steps: int | None = None, cfg: float | None = None, progress=None,
                 cancel: threading.Event | None = None) -> np.ndarray:
        check_inputs(color, mask)
        steps = RELEASE_STEPS if steps is None else int(steps)
        cfg = RELEASE_CFG if cfg is None else float(cfg)
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        if cfg < 0:
            raise InputError(f"cfg must be >= 0, got {cfg}")
        prompt = EX4D_PROMPT if prompt is None else prompt
        try:
            return self._generate(color, mask, prompt, int(seed), steps, cfg, progress, cancel)
        except Exception as e:
            import torch

            if isinstance(e, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
                t, h, w = mask.shape
                raise OutOfMemoryError(
                    f"out of GPU memory in memory mode '{self.memory_mode}' at {w}x{h}, {t} frames: "
                    f"use --memory-mode {_NEXT_MODE.get(self.memory_mode, 'offload')}") from None
            raise

    def _generate(self, color, mask, prompt, seed, steps, cfg, progress, cancel):
        color, mask, (orig_h, orig_w) = fit_to_model(color, mask)
        num_frames = color.shape[0]
        windows = plan_windows(num_frames, self.window, self.overlap)
        if len(windows) == 1:
            length = round_frames(num_frames)
            if length != num_frames:
                warnings.warn(f"{num_frames} frames is not 4k+1: generating {length} (last frame repeated) and "
                              f"returning the first {num_frames}")
                pad = length - num_frames
                color = np.concatenate([color, np.repeat(color[-1:], pad, axis=0)])
                mask = np.concatenate([mask, np.repeat(mask[-1:], pad, axis=0)])
            windows = [(0, length)]
        elif progress is not None:
            progress("windows", 0, len(windows))
        result = np.zeros(color.shape, dtype=np.float32)
        previous_end = 0
        for index, (start, end) in enumerate(windows):
            c, m = color[start:end], mask[start:end]
            if index > 0:  # start from the frame the previous window generated, fully valid
                c, m = c.copy(), m.copy()
                c[0] = np.clip(np.rint(result[start]), 0, 255).astype(np.uint8)
                m[0] = True
            prepared = prepare_clip(c, m, seed=seed + index)
            frames = self.pipe.generate_clip(
                prepared.color, prepared.mask, prompt=prompt, negative_prompt=self.negative_prompt, steps=steps,
                cfg=cfg, seed=seed + index, sigma_shift=self.sigma_shift, progress=progress, cancel=cancel,
                step_offset=index * steps, total_steps=steps * len(windows))
            blend_window(result, frames.astype(np.float32), start, previous_end)
            previous_end = end
        out = np.clip(np.rint(result[:num_frames]), 0, 255).astype(np.uint8)
        if progress is not None:
            progress("done", 1, 1)
        return resize_frames(out, orig_h, orig_w)
