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
  on the CPU in this mode. With speed "fast" on an FP8 GPU the token-wise linears instead become
  accel.Fp8Linear (scaled FP8 weights, FP8 matmul) and the other block linears accel.Fp8WeightOnlyLinear.
* ``stream``: a GPU budget (``vram_limit_gb``; default the card's memory - 1 GiB). The LoRA is merged; the
  image encoder, VAE, condition encoder and the DiT's non-block parts are resident; as many DiT blocks as
  fit stay on the GPU and the rest live in pinned host memory and are copied in one block ahead on a side
  stream (:class:`~ex4d.generate.offload.BlockOffloader`); when not everything fits, the umT5 text
  encoder lives in pinned host memory and visits the GPU only while it encodes
  (:class:`~ex4d.generate.offload.ModuleSwapper`). Measured 22.7 GiB peak under 24 and 15.3 under 16 at
  1.02-1.03x the resident time (docs/benchmarks.md). The plan is a budget, not a hard cap.

``fp8_matmul`` / ``fp8_weight_only`` (from :func:`ex4d.generate.speed.plan_speed`) name the block linears
that become FP8 modules; the memory mode converts them, block by block on the device, because it decides
where each block lives.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import InputError
from .settings import MEMORY_MODES, STREAM_ACTIVATION_RESERVE_GIB, STREAM_CARD_RESERVE_GIB


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


def apply_memory_mode(pipe, mode: str, vram_limit_gb: float | None = None, fp8_matmul=(), fp8_weight_only=()) -> None:
    from diffsynth.core import enable_vram_management
    from diffsynth.core.vram.layers import AutoWrappedLinear

    from .adapter import merge_lora

    if mode not in MEMORY_MODES:
        raise InputError(f"unknown memory mode {mode!r}: choose one of {', '.join(MEMORY_MODES)}")
    if (fp8_matmul or fp8_weight_only) and mode == "offload":
        raise InputError("FP8 modules cannot be combined with diffsynth's offload mode (use stream)")
    device, dtype = pipe.device, pipe.torch_dtype
    pipe.memory_mode = mode
    pipe.condition_encoder = _cast_module(pipe.condition_encoder, device, dtype)

    if mode == "resident":
        pipe.dit = _cast_module(pipe.dit, device, dtype, keep_fp32="lora_")
        for name in ("text_encoder", "image_encoder", "vae"):
            setattr(pipe, name, _cast_module(getattr(pipe, name), device, dtype))
        if fp8_matmul or fp8_weight_only:
            from .accel import convert_blocks_to_fp8

            convert_blocks_to_fp8(pipe.dit, fp8_matmul, fp8_weight_only, dtype)  # merges the LoRA first
            _empty_cache(device)
        pipe.vram_management_enabled = False
        return

    if mode == "stream":
        _apply_stream(pipe, vram_limit_gb, fp8_matmul, fp8_weight_only)
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
    if fp8_matmul or fp8_weight_only:  # speed fast on an FP8 GPU: scaled FP8 modules, one layer at a time
        from .accel import convert_block_to_fp8

        for block in dit.blocks:
            for name in (*fp8_matmul, *fp8_weight_only):
                try:
                    block.get_submodule(name).to(device=device, dtype=dtype)
                except AttributeError:
                    continue
            convert_block_to_fp8(block, fp8_matmul, fp8_weight_only, dtype)
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


def _empty_cache(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _module_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    tensors = list(module.parameters()) + [b for b in module.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def default_stream_budget_gib(device) -> float | None:
    """The whole card less the CUDA context's share; None off CUDA (nothing to budget)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory / 1024**3
    return max(0.0, total - STREAM_CARD_RESERVE_GIB)


def _apply_stream(pipe, vram_limit_gb, fp8_matmul=(), fp8_weight_only=()) -> None:
    """Memory mode ``stream`` (see the module docstring): plan the budget, convert and place the blocks."""
    from .accel import convert_block_to_fp8
    from .adapter import merge_lora
    from .offload import BlockOffloader, ModuleSwapper, blocks_that_fit

    device, dtype = pipe.device, pipe.torch_dtype
    budget_gib = default_stream_budget_gib(device) if vram_limit_gb is None else float(vram_limit_gb)
    dit = pipe.dit
    blocks = list(dit.blocks)
    for name in ("image_encoder", "vae"):
        setattr(pipe, name, _cast_module(getattr(pipe, name), device, dtype))
    for name, param in dit.named_parameters():  # the DiT's non-block parts: resident in dtype
        if not name.startswith("blocks."):
            param.data = param.data.to(device=device, dtype=dtype)
    for name, buf in dit.named_buffers():
        if not name.startswith("blocks.") and buf is not None:
            buf.data = buf.data.to(device=device, dtype=dtype if buf.is_floating_point() else buf.dtype)

    def prepare(block):  # on the device: LoRA merged (fp32 math), dtype, FP8 modules
        block.to(device=device)
        merge_lora(block)
        _cast_module(block, device, dtype)
        if fp8_matmul or fp8_weight_only:
            convert_block_to_fp8(block, fp8_matmul, fp8_weight_only, dtype)

    prepare(blocks[0])
    block_bytes = _module_bytes(blocks[0])
    GiB = 1024**3
    text_bytes = _module_bytes(pipe.text_encoder)
    other = sum(_module_bytes(getattr(pipe, n)) for n in ("image_encoder", "vae", "condition_encoder"))
    dit_other = _module_bytes(dit) - sum(_module_bytes(b) for b in blocks if b is not blocks[0]) - block_bytes
    dit_other = max(dit_other, 0)
    reserve = STREAM_ACTIVATION_RESERVE_GIB * GiB
    if budget_gib is None:  # no GPU to budget (CPU): everything resident, nothing swapped
        resident, swap_text = len(blocks), False
    else:
        budget = budget_gib * GiB
        everything = text_bytes + other + dit_other + block_bytes * len(blocks) + reserve
        swap_text = everything > budget
        # the text encoder is on the GPU beside the resident blocks while it encodes: count it either way
        free_for_blocks = budget - text_bytes - other - dit_other - reserve
        resident = len(blocks) if not swap_text else blocks_that_fit(blocks, int(max(free_for_blocks, 0)))
    for index, block in enumerate(blocks):
        if index:
            prepare(block)
        if index >= resident:
            block.to("cpu")  # the offloader pins it below
            _empty_cache(device)
    pipe.text_swapper = ModuleSwapper(pipe.text_encoder, device) if swap_text else None
    if not swap_text:
        pipe.text_encoder = _cast_module(pipe.text_encoder, device, dtype)
    pipe.block_offloader = BlockOffloader(blocks, device, resident=resident) if resident < len(blocks) else None
    pipe.vram_management_enabled = False
    pipe.stream_plan = {
        "budget_gib": None if budget_gib is None else round(budget_gib, 2),
        "resident_blocks": resident, "streamed_blocks": len(blocks) - resident,
        "block_gib": round(block_bytes / GiB, 3),
        "text_encoder": "pinned host memory, on the GPU only while encoding" if swap_text else "resident",
        "text_encoder_gib": round(text_bytes / GiB, 2),
        "activation_reserve_gib": STREAM_ACTIVATION_RESERVE_GIB,
    }
    _empty_cache(device)


def _cast_module_non_fp8(module: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    for param in module.parameters():
        if param.dtype == torch.float8_e4m3fn:
            continue
        if param.device != torch.device(device) or (param.is_floating_point() and param.dtype != dtype):
            param.data = param.data.to(device=device, dtype=dtype)
    return module


def weight_bytes(pipe) -> dict[str, int]:
    """Bytes of weights per model, wherever they live (for reports and the bench): parameters and buffers
    (the FP8 modules of the speed levers keep their weights as buffers)."""
    out = {}
    for name in ("dit", "text_encoder", "image_encoder", "vae", "condition_encoder"):
        model = getattr(pipe, name, None)
        if model is not None:
            out[name] = _module_bytes(model)
    return out
