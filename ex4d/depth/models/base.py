"""What every learned depth model shares: the prediction type, the model interface, the mapping from
relative disparity to z-depth, and the checked loading of weights from a local folder.

None of the supported models predicts intrinsics or metric depth: each returns *relative* inverse
depth (disparity, up to an unknown scale and shift). :class:`DisparityToDepth` turns it into positive
z-depth with the EX-4D release's DepthCrafter mapping (documented constants, all overridable) and an
optional rescale to a chosen median depth.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ... import errors

ProgressFn = Callable[..., None]


# --------------------------------------------------------------------------------------------------
# Prediction and interface
# --------------------------------------------------------------------------------------------------


@dataclass
class DepthPrediction:
    """Output of :meth:`DepthModel.predict`.

    ``depth``: (T, H, W) float32 z-depth along the optical axis (not ray length), finite and > 0, at
    the input frames' size. ``K``: 3x3 intrinsics in pixels when the model predicts them, else None
    (none of the bundled models does: the caller falls back to the user's value or EX-4D's f = 500 px).
    ``kind``: ``"relative"`` (correct up to one global scale for the clip) or ``"metric"``.
    ``disparity``: the model's relative disparity after clip-level normalisation to [0, 1] (for
    previews). ``info``: settings that produced it (model name, working size, mapping constants).
    """

    depth: np.ndarray
    K: np.ndarray | None = None
    kind: str = "relative"
    disparity: np.ndarray | None = None
    info: dict = field(default_factory=dict)


class DepthModel:
    """A loaded depth model. Subclasses implement :meth:`_predict_disparity`."""

    name: str = "depth-model"

    def __init__(self, device, dtype, mapping: "DisparityToDepth | None" = None):
        self.device = device
        self.dtype = dtype
        self.mapping = mapping or DisparityToDepth()

    # The one public entry point.
    def predict(self, frames: np.ndarray, progress: ProgressFn | None = None, cancel=None) -> DepthPrediction:
        frames = check_frames(frames)
        with out_of_memory_as_error(self.name, self.memory_hint(), frames.shape):
            disparity, info = self._predict_disparity(frames, progress=progress, cancel=cancel)
        disparity = np.asarray(disparity, dtype=np.float32)
        if disparity.shape != frames.shape[:3]:
            raise AssertionError(f"{self.name} returned {disparity.shape}, expected {frames.shape[:3]}")
        depth, normalised = self.mapping.apply(disparity)
        info = {"model": self.name, **info, "mapping": self.mapping.describe()}
        return DepthPrediction(depth=depth, K=None, kind="relative", disparity=normalised, info=info)

    def _predict_disparity(self, frames: np.ndarray, progress=None, cancel=None) -> tuple[np.ndarray, dict]:
        """(T, H, W) relative disparity (larger = nearer) at the frames' size, and an info dict."""
        raise NotImplementedError

    def memory_hint(self) -> str:
        """The setting to lower when the model runs out of memory (named in the error)."""
        return "the input size"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.device} ({self.dtype})>"


# --------------------------------------------------------------------------------------------------
# Relative disparity -> z-depth
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DisparityToDepth:
    """Relative disparity -> positive z-depth, the EX-4D release's DepthCrafter recipe by default.

    1. n = (d - min) / (max - min) over the whole clip (so the clip keeps one consistent scale);
    2. depth = clip(numerator / max(gain * n, min_scaled_disparity), near, far)
       (release: 10000 / max(3900 n, 1e-5), clipped to [1e-4, 1e4]; the nearest pixel of the clip
       ends up at 10000 / 3900 = 2.56 units, disparity-0 pixels at the far clip 1e4);
    3. optionally, ``median_depth``: rescale so that the median depth of the clip equals it (the
       ``--median-depth`` of ``ex4d recon``; None keeps the release's units, which its presets assume).
    """

    numerator: float = 10000.0
    gain: float = 3900.0
    min_scaled_disparity: float = 1e-5
    near: float = 1e-4
    far: float = 1e4
    median_depth: float | None = None

    def __post_init__(self):
        for name in ("numerator", "gain", "min_scaled_disparity", "near", "far"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise errors.InputError(f"depth mapping: {name} must be a positive number, got {value}")
        if self.near >= self.far:
            raise errors.InputError(f"depth mapping: near ({self.near}) must be below far ({self.far})")
        if self.median_depth is not None and (not np.isfinite(self.median_depth) or self.median_depth <= 0):
            raise errors.InputError(f"depth scale (median depth) must be a positive number, got {self.median_depth}")

    def normalise(self, disparity: np.ndarray) -> np.ndarray:
        d = np.nan_to_num(np.asarray(disparity, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(d.min()), float(d.max())
        if hi - lo <= 1e-12:  # flat prediction: one plane
            return np.ones_like(d, dtype=np.float32)
        return ((d - lo) / (hi - lo)).astype(np.float32)

    def apply(self, disparity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(depth float32, normalised disparity float32), both shaped like ``disparity``."""
        n = self.normalise(disparity)
        depth = self.numerator / np.maximum(self.gain * n.astype(np.float64), self.min_scaled_disparity)
        depth = np.clip(depth, self.near, self.far)
        if self.median_depth is not None:
            depth = depth * (self.median_depth / float(np.median(depth)))
        return depth.astype(np.float32), n

    def describe(self) -> dict:
        return {
            "numerator": self.numerator,
            "gain": self.gain,
            "min_scaled_disparity": self.min_scaled_disparity,
            "near": self.near,
            "far": self.far,
            "median_depth": self.median_depth,
        }


# --------------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------------


def check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise errors.InputError(f"depth model input must be (T, H, W, 3) uint8 frames, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise errors.InputError(f"depth model input must be uint8 frames, got {frames.dtype}")
    if frames.shape[1] < 2 or frames.shape[2] < 2:
        raise errors.InputError(f"frames of {frames.shape[2]}x{frames.shape[1]} are too small for depth")
    return frames


def report(progress: ProgressFn | None, stage: str, step: int, total: int, preview=None) -> None:
    if progress is not None:
        progress(stage, step, total, preview) if preview is not None else progress(stage, step, total)


def check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise errors.Cancelled("depth estimation cancelled")


def resolve_device(device=None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise errors.InputError(f"unknown device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise errors.InputError(f"device {device} requested but CUDA is not available (use --device cpu)")
    return device


def resolve_dtype(dtype, device):
    """None -> float16 on CUDA (as the releases run), float32 on CPU. Accepts torch dtypes or names."""
    import torch

    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if str(dtype).lower() not in names:
        raise errors.InputError(f"unknown dtype {dtype!r} (use one of: {', '.join(sorted(names))})")
    return names[str(dtype).lower()]


@contextlib.contextmanager
def out_of_memory_as_error(model_name: str, hint: str, shape: Sequence[int]):
    """Turn a CUDA/CPU allocation failure into errors.OutOfMemoryError naming the setting to lower."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        _free_cuda()
        raise errors.OutOfMemoryError(_oom_message(model_name, hint, shape)) from None
    except RuntimeError as e:
        text = str(e).lower()
        if "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text:
            _free_cuda()
            raise errors.OutOfMemoryError(_oom_message(model_name, hint, shape)) from None
        raise


def _oom_message(model_name, hint, shape) -> str:
    t, h, w = shape[:3]
    return f"{model_name} ran out of memory on {t} frames of {w}x{h}; lower {hint}"


def _free_cuda():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Weights: finding files, reading them, checking keys
# --------------------------------------------------------------------------------------------------


def weights_folder(path, model_name: str, download: str) -> Path:
    """The weights folder as a Path; a clear WeightsError when it is absent or unreadable."""
    if path is None or str(path) == "":
        raise errors.WeightsError(f"{model_name}: no weights folder given (--depth-weights DIR); get it with: {download}")
    folder = Path(os.path.expanduser(str(path)))
    if not folder.exists():
        raise errors.WeightsError(f"{model_name}: weights folder {folder} does not exist; get it with: {download}")
    if not folder.is_dir():
        raise errors.WeightsError(f"{model_name}: weights path {folder} is not a folder; get it with: {download}")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise errors.WeightsError(f"{model_name}: weights folder {folder} is not readable (check its permissions)")
    return folder


def first_existing(folder: Path, candidates: Iterable[str]) -> Path | None:
    for name in candidates:
        p = folder / name
        if p.is_file():
            return p
    return None


def require_files(model_name: str, folder: Path, needed: Mapping[str, Sequence[str]], download: str) -> dict[str, Path]:
    """``needed``: label -> acceptable relative paths (first found wins). Raises one WeightsError
    naming every missing file (all alternatives) and the download command."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for label, candidates in needed.items():
        p = first_existing(folder, candidates)
        if p is None:
            missing.append(" or ".join(candidates))
        else:
            if not os.access(p, os.R_OK):
                raise errors.WeightsError(f"{model_name}: weights file {p} is not readable (check its permissions)")
            found[label] = p
    if missing:
        raise errors.WeightsError(
            f"{model_name}: missing in {folder}: {'; '.join(missing)}; download on a machine with internet: {download}"
        )
    return found


def read_json(model_name: str, path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.WeightsError(f"{model_name}: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise errors.WeightsError(f"{model_name}: {path} is not a JSON object")
    return data


def read_state_dict(model_name: str, path: Path) -> dict:
    """A flat tensor state dict from .safetensors / .pth / .bin (never unpickling arbitrary objects)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated/wrong format: all are "unreadable weights" to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise errors.WeightsError(f"{model_name}: cannot read weights file {path}: {first}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict) and len(state) <= 4:
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise errors.WeightsError(f"{model_name}: {path} does not hold a flat tensor state dict")
    return state


def key_mismatch_message(model_name: str, source: str, missing: Sequence[str], unexpected: Sequence[str],
                         mismatched: Sequence[str] = (), show: int = 5) -> str | None:
    """One-line description of a checkpoint that does not fit the model, or None when it fits."""
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        keys = sorted(keys)
        if keys:
            more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:show])}{more}")
    if not parts:
        return None
    return f"{model_name}: checkpoint {source} does not match the model: " + "; ".join(parts)


def load_checked_state_dict(model_name: str, module, state: Mapping[str, Any], source: str,
                            ignore_missing: Iterable[str] = ()) -> None:
    """Strict load with a readable error: first missing/unexpected/wrong-shape keys are listed.
    Works for modules built on the meta device (parameters are assigned, not copied)."""
    own = module.state_dict()
    ignore = set(ignore_missing)
    missing = [k for k in own if k not in state and k not in ignore]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)}!={tuple(own[k].shape)}" for k in state
                  if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    message = key_mismatch_message(model_name, source, missing, unexpected, mismatched)
    if message:
        raise errors.WeightsError(message)
    module.load_state_dict(dict(state), strict=not ignore, assign=True)


def loading_info_error(model_name: str, source: str, info: Mapping[str, Any]) -> None:
    """Raise for transformers/diffusers ``output_loading_info`` that reports any mismatch."""
    mismatched = [str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys", [])]
    message = key_mismatch_message(model_name, source, list(info.get("missing_keys", [])),
                                   list(info.get("unexpected_keys", [])), mismatched)
    if message:
        raise errors.WeightsError(message)


def wrap_loading_errors(model_name: str, source):
    """Context manager: library exceptions while loading -> WeightsError (first line of the message)."""
    return _LoadingErrors(model_name, str(source))


class _LoadingErrors(contextlib.AbstractContextManager):
    def __init__(self, model_name: str, source: str):
        self.model_name, self.source = model_name, source

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, errors.Ex4dError) or not isinstance(exc, Exception):
            return False
        text = str(exc).strip()
        first = text.splitlines()[0] if text else exc_type.__name__
        if len(first) > 400:
            first = first[:400] + "..."
        raise errors.WeightsError(f"{self.model_name}: cannot load {self.source}: {first}") from None
