"""The ex4d / tiny generator: validation, size and length fitting, windows, OOM reporting."""

from __future__ import annotations

import logging
import math
import threading
import warnings

import numpy as np

from ..errors import InputError, OutOfMemoryError
from .conditioning import check_inputs, fit_to_model, prepare_clip, resize_frames, round_frames
from .settings import (EX4D_PROMPT, RELEASE_CFG, RELEASE_FRAMES, RELEASE_SIGMA_SHIFT, RELEASE_STEPS,
                       WAN_NEGATIVE_PROMPT, WINDOW_OVERLAP)
from .windows import blend_window, plan_windows

_log = logging.getLogger("ex4d.generate")

_NEXT_MODE = {
    "resident": "--memory-mode stream (DiT blocks streamed from CPU memory within --vram-limit GB, about the same speed) "
                "or --memory-mode fp8",
    "fp8": "--memory-mode stream (with --vram-limit GB for a card shared with other programs)",
    "stream": "a lower --vram-limit with --memory-mode stream (it keeps 2.5 GiB free for activations at 512x512x49; "
              "larger shots need more), or fewer frames / a smaller size",
    "offload": "--memory-mode stream, or a smaller size or fewer frames",
}


def non_negative_number(value, rule: str) -> float:
    """``value`` as a finite float >= 0, else an InputError "<rule>, got <value>"."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise InputError(f"{rule}, got {value!r}")
    return number


def check_preview_cache(value) -> float:
    """A preview-cache threshold: a finite number >= 0 (0 = off)."""
    return non_negative_number(value, "--preview-cache must be a number >= 0 (0 = off)")


class Ex4dGenerator:
    """Wan2.1-I2V + EX-4D adapter behind the common ``generate(color, mask, ...)`` call."""

    def __init__(self, pipe, *, name: str = "ex4d", window: int = RELEASE_FRAMES, overlap: int = WINDOW_OVERLAP,
                 negative_prompt: str = WAN_NEGATIVE_PROMPT, sigma_shift: float = RELEASE_SIGMA_SHIFT,
                 preview_cache: float = 0.0, preview_metric: str = "t"):
        if (window - 1) % 4:
            raise InputError(f"the window must have 4k+1 frames, got {window}")
        self.pipe = pipe
        self.preview_cache = check_preview_cache(preview_cache)
        self.preview_metric = preview_metric  # probe of the preview cache (see ex4d.generate.preview_cache)
        self.last_run: dict = {}  # what the latest generate() used and skipped (see info())
        self.name = name
        self.window = window
        self.overlap = overlap
        self.negative_prompt = negative_prompt
        self.sigma_shift = sigma_shift

    @property
    def memory_mode(self) -> str:
        return self.pipe.memory_mode

    @property
    def speed(self) -> str:
        return getattr(self.pipe, "speed", "reference")

    def info(self) -> dict:
        """How this generator runs: memory mode, speed levers (applied / skipped and why), stream plan."""
        return {"generator": self.name, "memory_mode": self.memory_mode, "speed": self.speed,
                "levers": getattr(self.pipe, "speed_report", None), "stream_plan": getattr(self.pipe, "stream_plan", None),
                "preview_cache": self.preview_cache}

    def metadata(self) -> dict:
        """:meth:`info` plus ``last_run`` (preview-cache skips of the latest generate)."""
        return {**self.info(), "last_run": dict(self.last_run)}

    def generate(self, color: np.ndarray, mask: np.ndarray, *, prompt: str | None = None, seed: int = 0,
                 steps: int | None = None, cfg: float | None = None, progress=None,
                 cancel: threading.Event | None = None, preview_cache: float | None = None) -> np.ndarray:
        """``preview_cache``: step-cache threshold for this call (None = the generator's, 0 = off); how many
        DiT forwards it skipped is in ``self.last_run["preview_cache"]`` afterwards."""
        check_inputs(color, mask)
        steps = RELEASE_STEPS if steps is None else int(steps)
        cfg = RELEASE_CFG if cfg is None else float(cfg)
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        if cfg < 0:
            raise InputError(f"cfg must be >= 0, got {cfg}")
        threshold = self.preview_cache if preview_cache is None else check_preview_cache(preview_cache)
        prompt = EX4D_PROMPT if prompt is None else prompt
        cache = None
        if threshold > 0:
            from .preview_cache import PreviewCache

            cache = PreviewCache(threshold, metric=self.preview_metric)
        self.last_run = {"memory_mode": self.memory_mode, "speed": self.speed, "steps": steps, "cfg": cfg,
                         "preview_cache": None}
        self.pipe.step_cache = cache
        try:
            return self._generate(color, mask, prompt, int(seed), steps, cfg, progress, cancel)
        except Exception as e:
            import torch

            if isinstance(e, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
                t, h, w = mask.shape
                raise OutOfMemoryError(
                    f"out of GPU memory in memory mode '{self.memory_mode}' at {w}x{h}, {t} frames: "
                    f"use {_NEXT_MODE.get(self.memory_mode, '--memory-mode stream')}") from None
            raise
        finally:
            self.pipe.step_cache = None
            if cache is not None:
                cache.release()
                stats = cache.stats()
                self.last_run["preview_cache"] = stats
                _log.info("preview cache %g: skipped %d of %d DiT forwards (%d of %d steps)", threshold,
                          stats["skipped_forwards"], stats["forwards"], len(stats["skipped_steps"]), stats["steps"])

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
