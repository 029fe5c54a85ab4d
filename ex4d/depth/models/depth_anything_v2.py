"""Depth Anything V2 (relative) through transformers' ``DepthAnythingForDepthEstimation``.

Weights: a local snapshot of the Hugging Face repo ``depth-anything/Depth-Anything-V2-{Small,Base,Large}-hf``
(``config.json``, ``model.safetensors``, ``preprocessor_config.json``). Small is Apache-2.0; Base and
Large are CC-BY-NC-4.0 (non-commercial).

Frames are processed per frame, in batches, with the preprocessing that the snapshot's image
processor config describes (resize keeping the aspect ratio to a multiple of 14, ImageNet
normalisation), done in torch on the model's device. The per-frame relative disparity is then
aligned across the clip (:func:`ex4d.depth.models.align.align_disparity_sequence`), since each frame
has its own unknown scale and shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .align import AlignConfig, align_disparity_sequence
from .base import (DepthModel, DisparityToDepth, check_cancel, loading_info_error, read_json, report,
                   require_files, resolve_device, resolve_dtype, weights_folder, wrap_loading_errors)

VARIANTS = {
    "depth-anything-v2-small": "depth-anything/Depth-Anything-V2-Small-hf",
    "depth-anything-v2-base": "depth-anything/Depth-Anything-V2-Base-hf",
    "depth-anything-v2-large": "depth-anything/Depth-Anything-V2-Large-hf",
}

WEIGHT_FILES = {
    "config": ("config.json",),
    "weights": ("model.safetensors", "pytorch_model.bin"),
    "preprocessor": ("preprocessor_config.json",),
}


@dataclass(frozen=True)
class DepthAnythingV2Settings:
    """``input_size``: target of the resize (None = the processor config's, 518 for the releases).
    ``batch_size``: frames per forward pass (lower it on out-of-memory). ``temporal_align``: fit each
    frame's disparity to a running reference (see align.py)."""

    input_size: int | None = None
    batch_size: int = 8
    temporal_align: bool = True
    align: AlignConfig = field(default_factory=AlignConfig)


@dataclass(frozen=True)
class Preprocess:
    """The subset of DPTImageProcessor's config that Depth Anything uses."""

    height: int = 518
    width: int = 518
    keep_aspect_ratio: bool = True
    multiple: int = 14
    resample: int = 3  # PIL code: 3 bicubic, 2 bilinear
    rescale_factor: float = 1 / 255
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    normalize: bool = True

    @classmethod
    def from_config(cls, cfg: dict, input_size: int | None = None) -> "Preprocess":
        size = cfg.get("size", 518)
        if isinstance(size, dict):
            height = int(size.get("height", size.get("shortest_edge", 518)))
            width = int(size.get("width", size.get("shortest_edge", 518)))
        else:
            height = width = int(size)
        if input_size is not None:
            height = width = int(input_size)
        return cls(
            height=height,
            width=width,
            keep_aspect_ratio=bool(cfg.get("keep_aspect_ratio", True)),
            multiple=int(cfg.get("ensure_multiple_of", 14) or 1),
            resample=int(cfg.get("resample", 3)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
            mean=tuple(cfg.get("image_mean", cls.mean)),
            std=tuple(cfg.get("image_std", cls.std)),
            normalize=bool(cfg.get("do_normalize", True)),
        )

    def output_size(self, in_h: int, in_w: int) -> tuple[int, int]:
        """DPT's rule: scale toward (height, width); with keep_aspect_ratio use the per-axis scale
        closer to 1 for both axes; round each side to the nearest multiple."""
        scale_h, scale_w = self.height / in_h, self.width / in_w
        if self.keep_aspect_ratio:
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        return _to_multiple(scale_h * in_h, self.multiple), _to_multiple(scale_w * in_w, self.multiple)

    def __call__(self, frames_uint8, device, dtype):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(frames_uint8)).to(device).permute(0, 3, 1, 2).float()
        h, w = self.output_size(x.shape[-2], x.shape[-1])
        mode = "bicubic" if self.resample == 3 else "bilinear"
        antialias = h < x.shape[-2] or w < x.shape[-1]
        x = F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=antialias)
        x = x.clamp(0, 255) * self.rescale_factor
        if self.normalize:
            mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x.to(dtype)


def published_config(size: str = "small") -> dict:
    """config.json of ``Depth-Anything-V2-{Small,Base,Large}-hf`` (for random-weight benchmarks; loading
    reads the snapshot's own file). ``size="tiny"``: same classes, test sizes."""
    sizes = {  # hidden, layers, heads, taps, fusion, head, neck
        "small": (384, 12, 6, [3, 6, 9, 12], 64, 32, [48, 96, 192, 384]),
        "base": (768, 12, 12, [3, 6, 9, 12], 128, 32, [96, 192, 384, 768]),
        "large": (1024, 24, 16, [5, 12, 18, 24], 256, 32, [256, 512, 1024, 1024]),
        "tiny": (32, 4, 2, [1, 2, 3, 4], 16, 8, [8, 16, 32, 32]),
    }
    hidden, layers, heads, taps, fusion, head, neck = sizes[size]
    return {
        "model_type": "depth_anything",
        "backbone_config": {
            "model_type": "dinov2", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "mlp_ratio": 4, "image_size": 518 if size != "tiny" else 56,
            "patch_size": 14, "layerscale_value": 1.0, "out_indices": taps,
            "out_features": [f"stage{i}" for i in taps], "reshape_hidden_states": False, "apply_layernorm": True,
        },
        "reassemble_hidden_size": hidden, "reassemble_factors": [4, 2, 1, 0.5], "neck_hidden_sizes": neck,
        "fusion_hidden_size": fusion, "head_hidden_size": head, "head_in_index": -1,
        "depth_estimation_type": "relative", "max_depth": 1, "patch_size": 14,
    }


def _to_multiple(value: float, multiple: int) -> int:
    out = int(round(value / multiple) * multiple)
    return max(out, multiple)


def download_command(name: str, folder="DIR") -> str:
    return f"hf download {VARIANTS[name]} --local-dir {folder}"


class DepthAnythingV2(DepthModel):
    """Per-frame Depth Anything V2 with temporal scale/shift alignment."""

    def __init__(self, name, model, preprocess: Preprocess, settings: DepthAnythingV2Settings, device, dtype,
                 mapping: DisparityToDepth | None = None):
        super().__init__(device, dtype, mapping)
        self.name = name
        self.model = model
        self.preprocess = preprocess
        self.settings = settings

    @classmethod
    def load(cls, name: str, weights_dir, device=None, dtype=None, settings: DepthAnythingV2Settings | None = None,
             mapping: DisparityToDepth | None = None) -> "DepthAnythingV2":
        from transformers import DepthAnythingForDepthEstimation

        settings = settings or DepthAnythingV2Settings()
        download = download_command(name, weights_dir or "DIR")
        folder = weights_folder(weights_dir, name, download)
        files = require_files(name, folder, WEIGHT_FILES, download)
        config = read_json(name, files["config"])
        if config.get("model_type") != "depth_anything":
            raise _wrong_model(name, files["config"], config.get("model_type"))
        preprocess = Preprocess.from_config(read_json(name, files["preprocessor"]), settings.input_size)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        with wrap_loading_errors(name, folder):
            model, info = DepthAnythingForDepthEstimation.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True
            )
        loading_info_error(name, str(files["weights"]), info)
        model = model.to(device=device, dtype=dtype).eval()
        return cls(name, model, preprocess, settings, device, dtype, mapping)

    @classmethod
    def build_random(cls, size: str = "small", device=None, dtype=None, settings=None, mapping=None, seed: int = 0):
        """Random weights from :func:`published_config` (benchmarks; no files)."""
        import torch
        from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        cfg = published_config(size)
        backbone = Dinov2Config(**{k: v for k, v in cfg["backbone_config"].items() if k != "model_type"})
        config = DepthAnythingConfig(backbone_config=backbone, **{k: v for k, v in cfg.items()
                                                                  if k not in ("model_type", "backbone_config")})
        torch.manual_seed(seed)
        with torch.device(device):
            model = DepthAnythingForDepthEstimation(config)
        settings = settings or DepthAnythingV2Settings(input_size=56 if size == "tiny" else None)
        name = f"depth-anything-v2-{size}" if size != "tiny" else "depth-anything-v2-small"
        return cls(name, model.to(device=device, dtype=dtype).eval(), Preprocess(height=settings.input_size or 518,
                   width=settings.input_size or 518), settings, device, dtype, mapping)

    def memory_hint(self) -> str:
        return f"the batch size (now {self.settings.batch_size}) or the input size (now {self.preprocess.height})"

    def _predict_disparity(self, frames, progress=None, cancel=None):
        import torch
        import torch.nn.functional as F

        T, H, W, _ = frames.shape
        batch = max(1, int(self.settings.batch_size))
        out = np.empty((T, H, W), dtype=np.float32)
        steps = math.ceil(T / batch)
        work_size = None
        with torch.inference_mode():
            for i, start in enumerate(range(0, T, batch)):
                check_cancel(cancel)
                x = self.preprocess(frames[start:start + batch], self.device, self.dtype)
                work_size = tuple(x.shape[-2:])
                disparity = self.model(pixel_values=x).predicted_depth  # (B, h, w), relative inverse depth
                disparity = F.interpolate(disparity[:, None].float(), size=(H, W), mode="bicubic", align_corners=False)
                out[start:start + batch] = disparity[:, 0].clamp_min(0).cpu().numpy()
                report(progress, "depth", i + 1, steps)
        info = {"working_size": list(work_size), "batch_size": batch}
        if self.settings.temporal_align and T > 1:
            out, params = align_disparity_sequence(out, self.settings.align)
            info["align_scale_shift"] = params.tolist()
        return out, info


def _wrong_model(name, path, model_type):
    from ... import errors

    return errors.WeightsError(f"{name}: {path} describes a '{model_type}' model, not depth_anything")
