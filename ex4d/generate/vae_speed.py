"""The Wan VAE's speed lever ``vae_channels_last``: the same network and weights, called on the GPU tensor
with its 3-D convolutions in channels-last memory order.

diffsynth's ``WanVideoVAE.encode``/``decode`` (the release's call) copy each video to host memory and back
before the network sees it, and PyTorch's default (N, C, T, H, W) order sends the causal 3-D
convolutions to slower cuDNN kernels than (N, T, H, W, C) with cuDNN's autotuner on. Measured on an H200
at 49 x 512 x 512, bf16 (``bench/vae_gpu.py``): encode 0.481 -> 0.318 s per video, decode 0.667 -> 0.544 s.
The output differs from the release's call only by bf16 summation order (cuDNN picks other algorithms).

The lever changes where values live in memory, not the maths, so it works in every memory mode whose VAE
is an ordinary module on the GPU (``resident``, ``stream``, ``fp8``); ``offload`` hands the VAE to
diffsynth's layer-by-layer manager and keeps the release's call.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _cudnn_autotuned():
    """cuDNN's autotuner for these calls only: its heuristics pick slow kernels for channels-last 3-D
    convolutions (the order alone measured 0.48 -> 0.38 s per encode in the shot, with autotuning 0.32 s);
    the choice is cached per shape, so only a shot's first call pays for the search."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def vae_channels_last_supported(device, memory_mode: str = "resident") -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"running on {device.type}; cuDNN's channels-last 3-D convolutions are the gain"
    if memory_mode == "offload":
        return False, "diffsynth's offload manages the VAE layer by layer"
    return True, ""


def _conv3d_weights_to(vae, memory_format) -> None:
    for module in vae.model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=memory_format)


def install(vae) -> None:
    """Channels-last 3-D convolution weights (``.to(device)`` keeps the order when the VAE moves)."""
    _conv3d_weights_to(vae, torch.channels_last_3d)


def uninstall(vae) -> None:
    _conv3d_weights_to(vae, torch.contiguous_format)


def encode(vae, videos: torch.Tensor, device) -> torch.Tensor:
    """Videos (B, 3, T, H, W) in [-1, 1] -> latents (B, 16, f, h, w), on ``device``, never via the host."""
    x = videos.to(device=device, dtype=_dtype(vae)).contiguous(memory_format=torch.channels_last_3d)
    with _cudnn_autotuned():
        return vae.model.encode(x, vae.scale).contiguous()


def decode(vae, latents: torch.Tensor, device) -> torch.Tensor:
    """Latents (B, 16, f, h, w) -> videos (B, 3, T, H, W) clamped to [-1, 1], as the release's decode."""
    z = latents.to(device=device, dtype=_dtype(vae)).contiguous(memory_format=torch.channels_last_3d)
    with _cudnn_autotuned():
        return vae.model.decode(z, vae.scale).clamp_(-1, 1).contiguous()


def _dtype(vae) -> torch.dtype:
    return next(vae.model.parameters()).dtype
