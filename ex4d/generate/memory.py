"""Memory modes: where the weights live and in which dtype.

* ``resident``: every model on the device in the pipeline dtype (bf16 on GPU); the LoRA stays a
  separate fp32 peft layer, exactly as the release runs it. About 47 GB of weights for I2V-14B.
* ``offload``: diffsynth's VRAM management. The LoRA is first merged into the base weights (fp32 math,
  one rounding to bf16), then every model's layers live on the CPU and are copied to the GPU when they
  run; up to ``vram_limit_gb`` of them are kept there (default: GPU total - 2 GB, diffsynth's rule;
  0 = stream every layer every time). Models not in use are offloaded between stages.
* ``fp8``: the DiT's block Linear weights are STORED as float8_e4m3fn on the device (diffsynth's
  AutoWrappedLinear, per-layer cast back to the compute dtype when used: weight-only, no FP8 matmul);
  the LoRA is merged first; everything else is resident in bf16. Halves the DiT's 33 GB. Nothing runs
  on the CPU in this mode.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import InputError
from .settings import MEMORY_MODES


def _cast_module(module: nn.Module, device, dtype: torch.dtype, keep_fp32: str | None = None) -> nn.Module:
    """Move to device and cast floating tensors to dtype, leaving names containing ``keep_fp32`` in fp32."""
    module.to(device=device)
    for name, param in module.named_parameters():
        if not param.is_floating_point():
            continue
        target = torch.float32 if keep_fp32 and keep_fp32 in name else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
    for name, buf in module.named_buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            buf.data = buf.data.to(dtype)
    return module


def _module_map(model: nn.Module) -> dict:
    from diffsynth.configs import VRAM_MANAGEMENT_MODULE_MAPS

    key = f"{type(model).__module__}.{type(model).__name__}"
    spec = VRAM_MANAGEMENT_MODULE_MAPS.get(key, {"torch.nn.Linear": "diffsynth.core.vram.layers.AutoWrappedLinear"})

    def resolve(path: str):
        mod, _, cls = path.rpartition(".")
        return getattr(importlib.import_module(mod), cls)

    return {resolve(src): resolve(dst) for src, dst in spec.items()}


def default_vram_limit_gb(device) -> float | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory / 1024**3
    return max(0.0, total - 2.0)


def apply_memory_mode(pipe, mode: str, vram_limit_gb: float | None = None) -> None:
    from diffsynth.core import enable_vram_management
    from diffsynth.core.vram.layers import AutoWrappedLinear

    from .adapter import merge_lora

    if mode not in MEMORY_MODES:
        raise InputError(f"unknown memory mode {mode!r}: choose one of {', '.join(MEMORY_MODES)}")
    device, dtype = pipe.device, pipe.torch_dtype
    pipe.memory_mode = mode
    pipe.condition_encoder = _cast_module(pipe.condition_encoder, device, dtype)

    if mode == "resident":
        pipe.dit = _cast_module(pipe.dit, device, dtype, keep_fp32="lora_")
        for name in ("text_encoder", "image_encoder", "vae"):
            setattr(pipe, name, _cast_module(getattr(pipe, name), device, dtype))
        pipe.vram_management_enabled = False
        return

    merge_lora(pipe.dit)

    if mode == "offload":
        limit = default_vram_limit_gb(device) if vram_limit_gb is None else vram_limit_gb
        if torch.device(device).type != "cuda":
            limit = None  # diffsynth measures free memory with CUDA calls only
        config = dict(offload_dtype=dtype, offload_device="cpu", onload_dtype=dtype, onload_device="cpu",
                      preparing_dtype=dtype, preparing_device=device, computation_dtype=dtype, computation_device=device)
        for name in ("dit", "text_encoder", "image_encoder", "vae"):
            model = _cast_module(getattr(pipe, name), "cpu", dtype)
            setattr(pipe, name, enable_vram_management(model, _module_map(model), vram_config=dict(config),
                                                       vram_limit=limit))
        pipe.vram_management_enabled = True
        pipe.load_models_to_device(())
        return

    # fp8: block linears stored in float8 on the device, computed in `dtype`.
    fp8 = torch.float8_e4m3fn
    config = dict(offload_dtype=fp8, offload_device=device, onload_dtype=fp8, onload_device=device,
                  preparing_dtype=fp8, preparing_device=device, computation_dtype=dtype, computation_device=device)
    dit = pipe.dit
    for name, param in dit.named_parameters():  # non-linear parts first: small, kept in dtype
        if param.is_floating_point() and param.dtype != dtype and ".blocks." not in f".{name}":
            param.data = param.data.to(dtype)
    for block in dit.blocks:
        enable_vram_management(block, {nn.Linear: AutoWrappedLinear}, vram_config=dict(config))
        for module in block.modules():
            if isinstance(module, AutoWrappedLinear):
                module.onload()  # cast to float8 and move, one layer at a time
        for param in block.parameters():  # norms and modulation stay in dtype on the device
            if param.dtype != fp8:
                param.data = param.data.to(device=device, dtype=dtype)
    pipe.dit = _cast_module_non_fp8(dit, device, dtype)
    for name in ("text_encoder", "image_encoder", "vae"):
        setattr(pipe, name, _cast_module(getattr(pipe, name), device, dtype))
    pipe.vram_management_enabled = False


def _cast_module_non_fp8(module: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    for param in module.parameters():
        if param.dtype == torch.float8_e4m3fn:
            continue
        if param.device != torch.device(device) or (param.is_floating_point() and param.dtype != dtype):
            param.data = param.data.to(device=device, dtype=dtype)
    return module


def weight_bytes(pipe) -> dict[str, int]:
    """Bytes of parameters per model (for reports and the bench)."""
    out = {}
    for name in ("dit", "text_encoder", "image_encoder", "vae", "condition_encoder"):
        model = getattr(pipe, name, None)
        if model is not None:
            out[name] = sum(p.numel() * p.element_size() for p in model.parameters())
    return out
