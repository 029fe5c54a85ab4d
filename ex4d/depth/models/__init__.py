"""Learned video depth models behind one interface.

>>> model = load_depth_model("depth-anything-v2-small", "~/models/Depth-Anything-V2-Small-hf")
>>> pred = model.predict(frames)            # frames: (T, H, W, 3) uint8
>>> pred.depth.shape, pred.K, pred.kind     # (T, H, W) float32 z-depth > 0, None, "relative"

Names (:data:`MODEL_NAMES`):

* ``depth-anything-v2-small`` (Apache-2.0; ``-base`` / ``-large`` load the same way, CC-BY-NC-4.0)
  per frame through transformers, with temporal scale/shift alignment;
* ``depthcrafter``: DepthCrafter's UNet on Stable Video Diffusion's VAE and CLIP image encoder, with
  the EX-4D release's settings (5 steps, window 110, overlap 25, guidance 1.0, seed 42);
* ``video-depth-anything-small`` (Apache-2.0): transformers' DINOv2 + our temporal DPT head, loaded
  key-for-key from ``video_depth_anything_vits.pth``.

All three give relative disparity; :class:`DisparityToDepth` maps it to z-depth (EX-4D's DepthCrafter
mapping by default, ``median_depth`` to rescale). None of them predicts intrinsics (``K`` is None).

This package imports torch only when a model is loaded.
"""

from __future__ import annotations

from .base import DepthModel, DepthPrediction, DisparityToDepth

MODEL_NAMES = (
    "depth-anything-v2-small",
    "depth-anything-v2-base",
    "depth-anything-v2-large",
    "depthcrafter",
    "video-depth-anything-small",
)

# Short aliases people type.
ALIASES = {
    "da2": "depth-anything-v2-small",
    "depth-anything-v2": "depth-anything-v2-small",
    "depth-crafter": "depthcrafter",
    "vda": "video-depth-anything-small",
    "video-depth-anything": "video-depth-anything-small",
}

__all__ = ["DepthModel", "DepthPrediction", "DisparityToDepth", "MODEL_NAMES", "load_depth_model",
           "download_hint"]


def canonical_name(name: str) -> str:
    from ... import errors

    key = str(name).strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in MODEL_NAMES:
        raise errors.InputError(f"unknown depth model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return key


def download_hint(name: str, folder: str = "DIR") -> str:
    """The command that fetches ``name``'s weights on a machine with internet."""
    name = canonical_name(name)
    if name.startswith("depth-anything-v2"):
        from .depth_anything_v2 import download_command
    elif name == "depthcrafter":
        from .depthcrafter import download_command
    else:
        from .video_depth_anything import download_command
    return download_command(name, folder)


def load_depth_model(name: str, weights_dir, device=None, dtype=None, *, median_depth: float | None = None,
                     mapping: DisparityToDepth | None = None, **settings) -> DepthModel:
    """Load ``name`` from the local folder ``weights_dir``.

    ``device``: "cuda", "cpu", a torch.device or None (CUDA when available). ``dtype``: None (float16
    on CUDA, float32 on CPU), a torch dtype or "fp16"/"bf16"/"fp32". ``median_depth``: rescale the
    clip so its median z-depth equals this (``ex4d recon --median-depth``); ``mapping``: a full
    :class:`DisparityToDepth` instead. Other keyword arguments are the model's settings (see each
    module's ``*Settings`` dataclass, e.g. ``input_size=``, ``batch_size=``, ``window_size=``).

    Raises errors.WeightsError (missing/unreadable files, mismatching checkpoint),
    errors.InputError (unknown name or setting).
    """
    from ... import errors

    name = canonical_name(name)
    if mapping is None:
        mapping = DisparityToDepth(median_depth=median_depth)
    elif median_depth is not None:
        import dataclasses

        mapping = dataclasses.replace(mapping, median_depth=median_depth)

    def make(settings_cls):
        import dataclasses

        known = {f.name for f in dataclasses.fields(settings_cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise errors.InputError(f"{name}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return settings_cls(**settings)

    if name.startswith("depth-anything-v2"):
        from .depth_anything_v2 import DepthAnythingV2, DepthAnythingV2Settings

        return DepthAnythingV2.load(name, weights_dir, device, dtype, make(DepthAnythingV2Settings), mapping)
    if name == "depthcrafter":
        from .depthcrafter import DepthCrafter, DepthCrafterSettings

        return DepthCrafter.load(weights_dir, device, dtype, make(DepthCrafterSettings), mapping)
    from .video_depth_anything import VideoDepthAnything, VideoDepthAnythingSettings

    return VideoDepthAnything.load(name, weights_dir, device, dtype, make(VideoDepthAnythingSettings), mapping)
