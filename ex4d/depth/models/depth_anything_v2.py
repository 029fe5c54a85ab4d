"""Depth Anything V2 (relative) through transformers' ``DepthAnythingForDepthEstimation``.

Weights: a local snapshot of the Hugging Face repo ``depth-anything/Depth-Anything-V2-{Small,Base,Large}-hf``
(``config.json``, ``model.safetensors``, ``preprocessor_config.json``). Small is Apache-2.0; Base and
Large are CC-BY-NC-4.0 (non-commercial).

Frames are processed per frame, in batches, through the snapshot's own image processor
(``preprocessor_config.json``: resize keeping the aspect ratio to a multiple of 14, ImageNet
normalisation; on the model's device with transformers' torchvision backend). The per-frame relative disparity is then
aligned across the clip (:func:`ex4d.depth.models.align.align_disparity_sequence`), since each frame
has its own unknown scale and shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ... import errors
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


class FramePreprocessor:
    """Runs the snapshot's own image processor (``DPTImageProcessor``: resize keeping the aspect ratio
    to a multiple of 14, bicubic with antialiasing, rescale, ImageNet normalisation) on a batch of
    frames, on the model's device where the processor supports it (transformers' torchvision backend)."""

    def __init__(self, processor, input_size: int | None = None):
        self.processor = processor
        self.input_size = input_size
        self._device_ok = True

    @property
    def target_size(self) -> int:
        if self.input_size:
            return int(self.input_size)
        size = getattr(self.processor, "size", None)
        if isinstance(size, int):
            return size
        height = getattr(size, "height", None)  # transformers 5: SizeDict
        if height is None and isinstance(size, dict):
            height = size.get("height")
        return int(height or 518)

    def __call__(self, frames_uint8: np.ndarray, device, dtype):
        import torch

        kwargs = {"return_tensors": "pt"}
        if self.input_size:
            kwargs["size"] = {"height": int(self.input_size), "width": int(self.input_size)}
        if self._device_ok:
            batch = torch.from_numpy(np.ascontiguousarray(frames_uint8)).to(device).permute(0, 3, 1, 2)
            try:
                return self.processor(images=batch, device=device, **kwargs)["pixel_values"].to(device, dtype)
            except (TypeError, ValueError):  # a PIL/numpy processor (transformers 4.x): no device option
                self._device_ok = False
        return self.processor(images=list(frames_uint8), **kwargs)["pixel_values"].to(device, dtype)


def default_processor(input_size: int = 518):
    """The processor the published snapshots configure (for random-weight benchmarks)."""
    from transformers import DPTImageProcessor

    return DPTImageProcessor(size={"height": input_size, "width": input_size}, keep_aspect_ratio=True,
                             ensure_multiple_of=14, do_pad=False, resample=3, do_rescale=True, rescale_factor=1 / 255,
                             do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


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


def download_command(name: str, folder="DIR") -> str:
    return f"hf download {VARIANTS[name]} --local-dir {folder}"


class DepthAnythingV2(DepthModel):
    """Per-frame Depth Anything V2 with temporal scale/shift alignment."""

    def __init__(self, name, model, preprocess: FramePreprocessor, settings: DepthAnythingV2Settings, device, dtype,
                 mapping: DisparityToDepth | None = None):
        super().__init__(device, dtype, mapping)
        self.name = name
        self.model = model
        self.preprocess = preprocess
        self.settings = settings

    @classmethod
    def load(cls, name: str, weights_dir, device=None, dtype=None, settings: DepthAnythingV2Settings | None = None,
             mapping: DisparityToDepth | None = None) -> "DepthAnythingV2":
        from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

        settings = settings or DepthAnythingV2Settings()
        download = download_command(name, weights_dir or "DIR")
        folder = weights_folder(weights_dir, name, download)
        files = require_files(name, folder, WEIGHT_FILES, download)
        config = read_json(name, files["config"])
        if config.get("model_type") != "depth_anything":
            raise _wrong_model(name, files["config"], config.get("model_type"))
        if read_json(name, files["preprocessor"]).get("image_processor_type", "DPTImageProcessor") not in (
                "DPTImageProcessor", "DPTImageProcessorFast"):
            raise errors.WeightsError(f"{name}: {files['preprocessor']} is not a DPT image processor config")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        with wrap_loading_errors(name, folder):
            model, info = DepthAnythingForDepthEstimation.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True
            )
        loading_info_error(name, str(files["weights"]), info)
        with wrap_loading_errors(name, files["preprocessor"]):
            preprocess = FramePreprocessor(AutoImageProcessor.from_pretrained(str(folder), local_files_only=True),
                                           settings.input_size)
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
        preprocess = FramePreprocessor(default_processor(), settings.input_size)
        return cls(name, model.to(device=device, dtype=dtype).eval(), preprocess, settings, device, dtype, mapping)

    def memory_hint(self) -> str:
        return f"the batch size (now {self.settings.batch_size}) or the input size (now {self.preprocess.target_size})"

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
    return errors.WeightsError(f"{name}: {path} describes a '{model_type}' model, not depth_anything")
