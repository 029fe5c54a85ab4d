"""The EX-4D adapter: the video condition encoder, the LoRA on the DiT, and the checkpoint loader.

* :class:`VideoConditionEncoder` is the release's ``CamVidEncoder(16, 1024, 5120)``: VAE latents of the
  masked colour video and of the mask video (16 + 16 channels) -> three 1x1x1 Conv3d (SiLU between) ->
  a Conv3d with kernel = stride = (1, 2, 2), zero-initialised, whose output has the DiT's patch-token
  shape. The pipeline flattens it to tokens and adds it to the patch tokens (see ``pipeline.py``).
* :func:`add_lora` injects peft LoRA (rank 16, alpha 16) into q,k,v,o of self- and cross-attention and
  both FFN linears of every block (not ``k_img``/``v_img``), weights kept in fp32.
* :func:`load_adapter` loads ``ex4d.ckpt`` / ``.safetensors`` with STRICT accounting: every LoRA and
  encoder tensor must be present with the right shape and nothing else may be in the file; otherwise
  :class:`AdapterCheckpointError` lists the offending keys. The release loads non-strictly and would
  silently ignore a mismatch.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import Ex4dError, WeightsError
from .settings import LORA_ALPHA, LORA_RANK, LORA_TARGETS


class AdapterCheckpointError(Ex4dError):
    """The adapter checkpoint does not match the model (missing, unexpected or mis-shaped tensors)."""

    code = "bad_checkpoint"


class VideoConditionEncoder(nn.Module):
    """Latents of (masked colour, mask) -> DiT patch tokens. Key names match the release's file."""

    def __init__(self, latent_channels: int = 16, hidden_channels: int = 1024, out_channels: int = 5120,
                 patch_size: tuple[int, int, int] = (1, 2, 2)):
        super().__init__()
        self.latent_encoder = nn.Sequential(
            nn.Conv3d(latent_channels * 2, hidden_channels, kernel_size=1),
            nn.SiLU(),
            nn.Conv3d(hidden_channels, hidden_channels, kernel_size=1),
            nn.SiLU(),
            nn.Conv3d(hidden_channels, hidden_channels, kernel_size=1),
        )
        self.latent_patch_embedding = nn.Conv3d(hidden_channels, out_channels, kernel_size=patch_size, stride=patch_size)
        # Zero output at initialisation: the adapted model starts as the base model.
        nn.init.zeros_(self.latent_patch_embedding.weight)
        nn.init.zeros_(self.latent_patch_embedding.bias)

    def forward(self, color_latents: torch.Tensor, mask_latents: torch.Tensor) -> torch.Tensor:
        """(B,16,f,h,w) x2 -> (B, out_channels, f, h/2, w/2)."""
        x = torch.cat([color_latents, mask_latents], dim=1)
        return self.latent_patch_embedding(self.latent_encoder(x))


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


def add_lora(dit: nn.Module, rank: int = LORA_RANK, alpha: float = LORA_ALPHA) -> nn.Module:
    """Inject peft LoRA layers into the DiT in place; LoRA weights in fp32, frozen (inference)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), init_lora_weights=True)
    dit = inject_adapter_in_model(config, dit)
    for name, param in dit.named_parameters():
        param.requires_grad_(False)
        if "lora_" in name:
            param.data = param.data.to(torch.float32)
    return dit


def lora_modules(dit: nn.Module) -> dict[str, nn.Module]:
    """Names of the modules that carry a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in dit.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merge_lora(dit: nn.Module) -> int:
    """Fold every LoRA into its base Linear (W += scale * B @ A, computed in fp32) and drop the adapter.

    Used before diffsynth's VRAM management or FP8 storage, which wrap plain ``nn.Linear`` layers only.
    Returns the number of merged layers.
    """
    merged = 0
    for name, module in list(lora_modules(dit).items()):
        base = module.get_base_layer()
        for adapter in module.active_adapters:
            a = module.lora_A[adapter].weight.float()
            b = module.lora_B[adapter].weight.float()
            delta = (b @ a) * module.scaling[adapter]
            base.weight.data = (base.weight.data.float() + delta.to(base.weight.device)).to(base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(dit.get_submodule(parent_name) if parent_name else dit, child, base)
        merged += 1
    return merged


# --------------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------------

ENCODER_PREFIXES = ("latent_encoder.", "latent_patch_embedding.")
LAYOUT_FLAT = "flat (blocks.* + latent_encoder.*, as the release's training code saves)"
LAYOUT_PREFIXED = "prefixed (dit.blocks.* + camera_encoder.*)"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat tensor dict from .ckpt/.pt/.pth (torch.load, weights_only) or .safetensors; clear errors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"adapter checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, Exception) as e:  # noqa: B014
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise AdapterCheckpointError(f"cannot read the adapter checkpoint {path}: corrupt or not a checkpoint ({detail})") from None
    for wrapper in ("state_dict", "module", "model_state"):  # trainer checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state:
        raise AdapterCheckpointError(f"{path} holds no state dict (found {type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterCheckpointError(f"{path} is not a flat tensor state dict: {len(bad)} non-tensor entries, e.g. {bad[:3]}")
    return state


def split_adapter_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, str]:
    """-> (lora tensors keyed as in the DiT, encoder tensors, unrecognised tensors, layout name)."""
    prefixed = any(k.startswith(("dit.", "camera_encoder.")) for k in state)
    lora, encoder, other = {}, {}, {}
    for key, value in state.items():
        k = key
        if prefixed:
            if k.startswith("dit."):
                lora[k[4:]] = value
            elif k.startswith("camera_encoder."):
                encoder[k[len("camera_encoder."):]] = value
            else:
                other[key] = value
        elif k.startswith(ENCODER_PREFIXES):
            encoder[k] = value
        elif k.startswith("blocks.") and ".lora_" in k:
            lora[k] = value
        else:
            other[key] = value
    return lora, encoder, other, LAYOUT_PREFIXED if prefixed else LAYOUT_FLAT


@dataclass(frozen=True)
class AdapterReport:
    path: str
    layout: str
    lora_tensors: int
    encoder_tensors: int
    parameters: int

    def summary(self) -> str:
        return (f"EX-4D adapter {self.path}: layout {self.layout}; {self.lora_tensors} LoRA + "
                f"{self.encoder_tensors} encoder tensors, {self.parameters / 1e6:.1f} M parameters")


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


@torch.no_grad()
def load_adapter(dit: nn.Module, encoder: nn.Module, state: dict[str, torch.Tensor], path: str = "<memory>") -> AdapterReport:
    """Strictly load LoRA tensors into a LoRA-injected DiT and the encoder tensors into ``encoder``."""
    lora_state, encoder_state, other, layout = split_adapter_state(state)
    dit_params = {n: p for n, p in dit.named_parameters() if "lora_" in n}
    enc_params = dict(encoder.named_parameters())
    if not dit_params:
        raise AdapterCheckpointError("the DiT has no LoRA layers: call add_lora() before load_adapter()")
    missing = sorted(set(dit_params) - set(lora_state)) + sorted(set(enc_params) - set(encoder_state))
    unexpected = sorted(other) + sorted(set(lora_state) - set(dit_params)) + sorted(
        f"encoder:{k}" for k in set(encoder_state) - set(enc_params))
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(target[k].shape)}"
        for source, target in ((lora_state, dit_params), (encoder_state, enc_params))
        for k, v in source.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listing(unexpected)}")
        if shapes:
            parts.append(f"wrong shape {_listing(shapes, 4)}")
        raise AdapterCheckpointError(
            f"adapter checkpoint {path} does not match the model (layout {layout}): " + "; ".join(parts))
    for source, target in ((lora_state, dit_params), (encoder_state, enc_params)):
        for k, v in source.items():
            target[k].data.copy_(v.to(device=target[k].device, dtype=target[k].dtype))
    count = sum(v.numel() for v in lora_state.values()) + sum(v.numel() for v in encoder_state.values())
    return AdapterReport(str(path), layout, len(lora_state), len(encoder_state), count)


@torch.no_grad()
def randomize_adapter_(dit: nn.Module, encoder: nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Fill the LoRA and encoder tensors in place with seeded random values (benchmarks: no file, no copy)."""
    for index, (name, p) in enumerate([*((n, p) for n, p in dit.named_parameters() if "lora_" in n),
                                       *encoder.named_parameters()]):
        generator = torch.Generator(p.device).manual_seed(seed * 100003 + index)
        p.data = (torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32) * scale).to(p.dtype)


def adapter_state_dict(dit: nn.Module, encoder: nn.Module, layout: str = "flat") -> dict[str, torch.Tensor]:
    """The tensors a release-style checkpoint holds for this model (used to synthesise test files)."""
    lora = {n: p.detach().cpu().clone() for n, p in dit.named_parameters() if "lora_" in n}
    enc = {n: p.detach().cpu().clone() for n, p in encoder.named_parameters()}
    if layout == "prefixed":
        return {**{f"dit.{k}": v for k, v in lora.items()}, **{f"camera_encoder.{k}": v for k, v in enc.items()}}
    return {**lora, **enc}
