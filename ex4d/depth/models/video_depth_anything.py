"""Video Depth Anything (Small, Apache-2.0): transformers' DINOv2 + our temporal DPT head.

Architecture (from the public Video-Depth-Anything code, re-expressed):

* backbone: DINOv2 ViT (Small: 384 wide, 12 layers, 6 heads, patch 14, layer scale, 518px position
  grid); features of layers (2, 5, 8, 11) after the final LayerNorm, class token dropped;
* head: Depth Anything's DPT head (1x1 projections, resize by 4/2/1/0.5, 3x3 "layer_rn" convs,
  four feature-fusion blocks, output convs with ReLU) plus four temporal "motion modules" (AnimateDiff
  style: GroupNorm, linear in, one transformer block of two temporal self-attentions with sinusoidal
  frame positions + a GEGLU feed-forward, linear out, residual) on layer 3, layer 4 and after fusion
  blocks 4 and 3;
* output: ReLU'd relative disparity at the input size.

Checkpoint ``video_depth_anything_vits.pth`` (flat state dict): ``pretrained.*`` (DINOv2, the
facebookresearch layout: fused ``attn.qkv``, ``ls1.gamma`` ...) and ``head.*``. The head here uses the
release's module names, so ``head.*`` keys load 1:1; ``pretrained.*`` keys are renamed to transformers'
Dinov2Model names and ``qkv`` is split into q/k/v (see :func:`release_to_ours`). Every key is accounted
for; a missing or unexpected key is an error.

Inference recipe: input resized (aspect kept, shorter side >= 518, multiple of 14, bicubic), ImageNet
normalisation; windows of 32 frames advancing by 22, whose first 10 inputs are replaced by keyframes
(0, 12, 24..31) of the previous window's input; window k > 0 is fitted (least squares scale/shift) to
the already-aligned predictions of the two reference keyframes and its 8 overlapping frames are
cross-faded linearly; the clip is padded with its last frame to fill the last window.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import errors
from .align import blend_weights, fit_scale_shift
from .base import (DepthModel, DisparityToDepth, check_cancel, load_checked_state_dict, read_state_dict, report,
                   require_files, resolve_device, resolve_dtype, weights_folder)

NAME = "video-depth-anything-small"
REPO = "depth-anything/Video-Depth-Anything-Small"
CHECKPOINT = "video_depth_anything_vits.pth"

# The release's window settings ("do not change": the temporal modules were trained on 32 frames).
INFER_LEN = 32
OVERLAP = 10
KEYFRAMES = (0, 12, 24, 25, 26, 27, 28, 29, 30, 31)
INTERP_LEN = 8

# DINOv2 layers whose outputs feed the DPT head, by backbone depth.
INTERMEDIATE_LAYERS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}
DINOV2_HEAD_DIM = 64  # every DINOv2 size uses 64-wide heads (384/6, 768/12, 1024/16, 1536/24)


def download_command(name: str = NAME, folder="DIR") -> str:
    return f"hf download {REPO} {CHECKPOINT} --local-dir {folder}"


@dataclass(frozen=True)
class VideoDepthAnythingSettings:
    """``input_size``: shorter side of the network input (release: 518; EX-4D's unused path: 518).
    ``micro_batch``: frames per pass through the last, full-resolution head stages (memory only)."""

    input_size: int = 518
    micro_batch: int = 4


@dataclass(frozen=True)
class VDAConfig:
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    image_size: int = 518
    patch_size: int = 14
    features: int = 64
    out_channels: tuple = (48, 96, 192, 384)
    num_frames: int = 32
    num_transformer_blocks: int = 1
    num_attention_blocks: int = 2
    motion_heads: int = 8

    @property
    def layers(self) -> tuple:
        if self.depth in INTERMEDIATE_LAYERS:
            return INTERMEDIATE_LAYERS[self.depth]
        return tuple(round((i + 1) * self.depth / 4) - 1 for i in range(4))


SMALL = VDAConfig()
TINY = VDAConfig(embed_dim=64, depth=4, num_heads=1, image_size=56, features=32, out_channels=(32, 32, 64, 64))


# --------------------------------------------------------------------------------------------------
# Network (module names follow the release's checkpoint under ``head.``)
# --------------------------------------------------------------------------------------------------


def build_network(config: VDAConfig):
    """A randomly initialised network of ``config`` (call under accelerate.init_empty_weights to skip init)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers import Dinov2Config, Dinov2Model

    class PositionalEncoding(nn.Module):
        def __init__(self, dim, max_len):
            super().__init__()
            position = torch.arange(max_len).unsqueeze(1)
            div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
            pe = torch.zeros(1, max_len, dim)
            pe[0, :, 0::2] = torch.sin(position * div)
            pe[0, :, 1::2] = torch.cos(position * div)
            self.register_buffer("pe", pe)  # persistent: the release's checkpoint carries it

        def forward(self, x):
            return x + self.pe[:, : x.shape[1]].to(x.dtype)

    class TemporalAttention(nn.Module):
        """Self-attention across frames, independently at every spatial position."""

        def __init__(self, dim, heads, max_len):
            super().__init__()
            self.heads = heads
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_k = nn.Linear(dim, dim, bias=False)
            self.to_v = nn.Linear(dim, dim, bias=False)
            self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
            self.pos_encoder = PositionalEncoding(dim, max_len)

        def forward(self, x, frames):  # x: (B*F, N, C)
            bf, n, c = x.shape
            x = x.reshape(bf // frames, frames, n, c).permute(0, 2, 1, 3).reshape(-1, frames, c)  # (B*N, F, C)
            x = self.pos_encoder(x)

            def split(t):
                return t.reshape(t.shape[0], frames, self.heads, c // self.heads).transpose(1, 2)

            out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
            out = self.to_out[1](self.to_out[0](out.transpose(1, 2).reshape(-1, frames, c)))
            return out.reshape(bf // frames, n, frames, c).permute(0, 2, 1, 3).reshape(bf, n, c)

    class GEGLU(nn.Module):
        def __init__(self, dim_in, dim_out):
            super().__init__()
            self.proj = nn.Linear(dim_in, dim_out * 2)

        def forward(self, x):
            x, gate = self.proj(x).chunk(2, dim=-1)
            return x * F.gelu(gate)

    class FeedForward(nn.Module):
        def __init__(self, dim, mult=4):
            super().__init__()
            self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

        def forward(self, x):
            for layer in self.net:
                x = layer(x)
            return x

    class TemporalBlock(nn.Module):
        def __init__(self, dim, heads, n_attention, max_len):
            super().__init__()
            self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_len) for _ in range(n_attention)])
            self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(n_attention)])
            self.ff = FeedForward(dim)
            self.ff_norm = nn.LayerNorm(dim)

        def forward(self, x, frames):
            for attention, norm in zip(self.attention_blocks, self.norms):
                x = attention(norm(x), frames) + x
            return self.ff(self.ff_norm(x)) + x

    class TemporalTransformer(nn.Module):
        def __init__(self, channels, heads, n_blocks, n_attention, max_len):
            super().__init__()
            self.norm = nn.GroupNorm(32, channels, eps=1e-6, affine=True)
            self.proj_in = nn.Linear(channels, channels)
            self.transformer_blocks = nn.ModuleList(
                [TemporalBlock(channels, heads, n_attention, max_len) for _ in range(n_blocks)])
            self.proj_out = nn.Linear(channels, channels)

        def forward(self, x, frames):  # x: (B*F, C, H, W)
            bf, c, h, w = x.shape
            residual = x
            y = self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c)
            y = self.proj_in(y)
            for block in self.transformer_blocks:
                y = block(y, frames)
            y = self.proj_out(y).reshape(bf, h, w, c).permute(0, 3, 1, 2)
            return y + residual

    class TemporalModule(nn.Module):
        def __init__(self, channels, cfg: VDAConfig):
            super().__init__()
            self.temporal_transformer = TemporalTransformer(channels, cfg.motion_heads, cfg.num_transformer_blocks,
                                                            cfg.num_attention_blocks, cfg.num_frames)

        def forward(self, x, frames):
            return self.temporal_transformer(x, frames)

    class ResidualConvUnit(nn.Module):
        def __init__(self, features):
            super().__init__()
            self.conv1 = nn.Conv2d(features, features, 3, padding=1)
            self.conv2 = nn.Conv2d(features, features, 3, padding=1)

        def forward(self, x):
            return self.conv2(F.relu(self.conv1(F.relu(x)))) + x

    class FusionBlock(nn.Module):
        def __init__(self, features):
            super().__init__()
            self.out_conv = nn.Conv2d(features, features, 1)
            self.resConfUnit1 = ResidualConvUnit(features)
            self.resConfUnit2 = ResidualConvUnit(features)

        def forward(self, x, skip=None, size=None):
            if skip is not None:
                x = x + self.resConfUnit1(skip)
            x = self.resConfUnit2(x)
            if size is None:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
            else:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
            return self.out_conv(x)

    class TemporalDPTHead(nn.Module):
        def __init__(self, cfg: VDAConfig):
            super().__init__()
            oc, f, dim = list(cfg.out_channels), cfg.features, cfg.embed_dim
            self.projects = nn.ModuleList([nn.Conv2d(dim, c, 1) for c in oc])
            self.resize_layers = nn.ModuleList([
                nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1),
            ])
            self.scratch = nn.Module()
            for i, c in enumerate(oc, start=1):
                setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, f, 3, padding=1, bias=False))
            for i in range(1, 5):
                setattr(self.scratch, f"refinenet{i}", FusionBlock(f))
            self.scratch.output_conv1 = nn.Conv2d(f, f // 2, 3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(f // 2, 32, 3, padding=1), nn.ReLU(True), nn.Conv2d(32, 1, 1), nn.ReLU(True), nn.Identity())
            self.motion_modules = nn.ModuleList([
                TemporalModule(oc[2], cfg), TemporalModule(oc[3], cfg), TemporalModule(f, cfg), TemporalModule(f, cfg)])

        def forward(self, tokens, patch_h, patch_w, frames, micro_batch=4):
            layers = []
            for i, x in enumerate(tokens):  # (B*F, N, C) patch tokens
                x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], patch_h, patch_w)
                layers.append(self.resize_layers[i](self.projects[i](x)))
            l1, l2, l3, l4 = layers
            l3 = self.motion_modules[0](l3, frames)
            l4 = self.motion_modules[1](l4, frames)
            s = self.scratch
            r1, r2, r3, r4 = s.layer1_rn(l1), s.layer2_rn(l2), s.layer3_rn(l3), s.layer4_rn(l4)
            p4 = self.motion_modules[2](s.refinenet4(r4, size=r3.shape[2:]), frames)
            p3 = self.motion_modules[3](s.refinenet3(p4, r3, size=r2.shape[2:]), frames)
            out = []
            for i in range(0, p3.shape[0], max(1, micro_batch)):  # the full-resolution tail, in slices
                sl = slice(i, i + max(1, micro_batch))
                p2 = s.refinenet2(p3[sl], r2[sl], size=r1.shape[2:])
                p1 = s.refinenet1(p2, r1[sl])
                y = F.interpolate(s.output_conv1(p1), (patch_h * 14, patch_w * 14), mode="bilinear", align_corners=True)
                with torch.autocast(device_type=y.device.type, enabled=False):
                    y = s.output_conv2(y.float())
                out.append(y)
            return torch.cat(out, dim=0)

    class VideoDepthAnythingNet(nn.Module):
        def __init__(self, cfg: VDAConfig):
            super().__init__()
            self.config = cfg
            self.backbone = Dinov2Model(Dinov2Config(
                hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                mlp_ratio=4, image_size=cfg.image_size, patch_size=cfg.patch_size, layerscale_value=1.0,
                layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False, hidden_act="gelu"))
            use_release_position_interpolation(self.backbone)
            self.head = TemporalDPTHead(cfg)

        def forward(self, x, micro_batch=4):  # x: (B, F, 3, H, W) normalised
            b, frames, _, h, w = x.shape
            ph, pw = h // self.config.patch_size, w // self.config.patch_size
            hidden = self.backbone(pixel_values=x.flatten(0, 1), output_hidden_states=True).hidden_states
            tokens = [self.backbone.layernorm(hidden[i + 1])[:, 1:] for i in self.config.layers]
            depth = self.head(tokens, ph, pw, frames, micro_batch)
            depth = F.relu(F.interpolate(depth, size=(h, w), mode="bilinear", align_corners=True))
            return depth[:, 0].unflatten(0, (b, frames))

    return VideoDepthAnythingNet(config)


def use_release_position_interpolation(backbone) -> None:
    """DINOv2 as released interpolates its 37x37 position grid with a scale factor of
    (n + 0.1) / 37 per axis (bicubic, no antialias); transformers resizes to exactly n. Use the former,
    which the Video Depth Anything weights were trained with."""
    import torch
    import torch.nn.functional as F

    embeddings = backbone.embeddings
    patch = backbone.config.patch_size

    def interpolate_pos_encoding(self, tokens, height, width):
        pos = self.position_embeddings
        n_patches, n_pos = tokens.shape[1] - 1, pos.shape[1] - 1
        if n_patches == n_pos and height == width:
            return pos
        side = math.sqrt(n_pos)
        grid = pos[:, 1:].float().reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        rows, cols = height // patch + 0.1, width // patch + 0.1
        grid = F.interpolate(grid, scale_factor=(rows / side, cols / side), mode="bicubic", antialias=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
        return torch.cat([pos[:, :1].float(), grid], dim=1).to(pos.dtype)

    embeddings.interpolate_pos_encoding = types.MethodType(interpolate_pos_encoding, embeddings)


# --------------------------------------------------------------------------------------------------
# Checkpoint layout: release <-> ours
# --------------------------------------------------------------------------------------------------


def _attention_names(own_keys) -> dict:
    """transformers >= 5 names DINOv2's attention q_proj/k_proj/v_proj/o_proj; 4.x query/key/value/output.dense."""
    if any(".attention.q_proj." in k for k in own_keys):
        return {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj"}
    return {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
            "o": "attention.output.dense"}


_SIMPLE_BACKBONE = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_BLOCK_PARTS = {
    "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
}


def release_to_ours(state: dict, own_keys) -> tuple[dict, list[str]]:
    """Rename a release state dict to this network's names. Returns (converted, unconverted keys)."""
    import torch

    names = _attention_names(own_keys)
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith("head."):
            out[key] = value
            continue
        if not key.startswith("pretrained."):
            unknown.append(key)
            continue
        rest = key[len("pretrained."):]
        if rest in _SIMPLE_BACKBONE:
            out["backbone." + _SIMPLE_BACKBONE[rest]] = value
            continue
        parts = rest.split(".")
        if len(parts) < 4 or parts[0] != "blocks" or not parts[1].isdigit():
            unknown.append(key)
            continue
        layer, sub = f"backbone.encoder.layer.{parts[1]}.", ".".join(parts[2:])
        if sub in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = sub.rsplit(".", 1)[1]
            q, k, v = torch.chunk(value, 3, dim=0)  # fused rows are [q; k; v]
            for letter, tensor in zip("qkv", (q, k, v)):
                out[f"{layer}{names[letter]}.{kind}"] = tensor.contiguous()
        elif sub in ("attn.proj.weight", "attn.proj.bias"):
            out[f"{layer}{names['o']}.{sub.rsplit('.', 1)[1]}"] = value
        else:
            module, kind = sub.rsplit(".", 1)
            if sub in _BLOCK_PARTS:  # ls1.gamma / ls2.gamma (no trailing weight/bias)
                out[layer + _BLOCK_PARTS[sub]] = value
            elif module in _BLOCK_PARTS:
                out[f"{layer}{_BLOCK_PARTS[module]}.{kind}"] = value
            else:
                unknown.append(key)
    return out, unknown


def ours_to_release(state: dict) -> dict:
    """The inverse of :func:`release_to_ours` (writes test checkpoints in the published layout)."""
    import torch

    names = _attention_names(state.keys())
    inverse_simple = {v: k for k, v in _SIMPLE_BACKBONE.items()}
    inverse_parts = {v: k for k, v in _BLOCK_PARTS.items()}
    out = {}
    fused: dict[str, dict] = {}
    for key, value in state.items():
        if key.startswith("head."):
            out[key] = value
            continue
        rest = key[len("backbone."):]
        if rest in inverse_simple:
            out["pretrained." + inverse_simple[rest]] = value
            continue
        _, _, index, sub = rest.split(".", 3)  # encoder.layer.{i}.{sub}
        prefix = f"pretrained.blocks.{index}."
        module, kind = sub.rsplit(".", 1)
        letter = next((l for l in "qkv" if module == names[l]), None)
        if letter:
            fused.setdefault(f"{prefix}attn.qkv.{kind}", {})[letter] = value
        elif module == names["o"]:
            out[f"{prefix}attn.proj.{kind}"] = value
        elif sub in inverse_parts:
            out[prefix + inverse_parts[sub]] = value
        else:
            out[f"{prefix}{inverse_parts[module]}.{kind}"] = value
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def config_from_checkpoint(state: dict, source: str) -> VDAConfig:
    """Read the architecture off the tensor shapes (the .pth carries no config)."""
    try:
        pos = state["pretrained.pos_embed"]
        embed_dim = int(pos.shape[-1])
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("pretrained.blocks."))
        grid = int(round(math.sqrt(pos.shape[1] - 1)))
        patch = int(state["pretrained.patch_embed.proj.weight"].shape[-1])
        out_channels = tuple(int(state[f"head.projects.{i}.weight"].shape[0]) for i in range(4))
        features = int(state["head.scratch.layer1_rn.weight"].shape[0])
        prefix = "head.motion_modules.0.temporal_transformer.transformer_blocks."
        pe = state[prefix + "0.attention_blocks.0.pos_encoder.pe"]
        n_blocks = 1 + max(int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix))
        n_attention = 1 + max(int(k[len(prefix):].split(".")[2]) for k in state
                              if k.startswith(prefix + "0.attention_blocks."))
    except (KeyError, ValueError, IndexError) as e:
        raise errors.WeightsError(f"{NAME}: {source} is not a Video Depth Anything checkpoint "
                                  f"(missing or malformed {e})") from None
    return VDAConfig(embed_dim=embed_dim, depth=depth, num_heads=max(1, embed_dim // DINOV2_HEAD_DIM),
                     image_size=grid * patch, patch_size=patch, features=features, out_channels=out_channels,
                     num_frames=int(pe.shape[1]), num_transformer_blocks=n_blocks, num_attention_blocks=n_attention)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class VideoDepthAnything(DepthModel):
    name = NAME

    def __init__(self, network, settings: VideoDepthAnythingSettings, device, dtype, mapping=None, name: str = NAME):
        super().__init__(device, dtype, mapping)
        self.name = name
        self.settings = settings
        # weights stay float32 (as released); half precision runs through autocast on CUDA
        self.network = network.to(device=device, dtype=_float32()).eval().requires_grad_(False)
        if network.config.num_frames != INFER_LEN:
            raise errors.WeightsError(f"{name}: checkpoint was trained on {network.config.num_frames}-frame windows, "
                                      f"this recipe needs {INFER_LEN}")

    @classmethod
    def build_random(cls, config: VDAConfig = SMALL, device=None, dtype=None, settings=None, mapping=None, seed=0):
        import torch

        device = resolve_device(device)
        torch.manual_seed(seed)
        with torch.device(device):
            network = build_network(config)
        return cls(network, settings or VideoDepthAnythingSettings(), device, resolve_dtype(dtype, device), mapping)

    @classmethod
    def load(cls, name, weights_dir, device=None, dtype=None, settings: VideoDepthAnythingSettings | None = None,
             mapping: DisparityToDepth | None = None) -> "VideoDepthAnything":
        from accelerate import init_empty_weights

        settings = settings or VideoDepthAnythingSettings()
        download = download_command(name, weights_dir or "DIR")
        folder = weights_folder(weights_dir, name, download)
        files = require_files(name, folder, {"checkpoint": (CHECKPOINT,)}, download)
        state = read_state_dict(name, files["checkpoint"])
        config = config_from_checkpoint(state, str(files["checkpoint"]))
        with init_empty_weights():
            network = build_network(config)
        converted, unknown = release_to_ours(state, network.state_dict().keys())
        converted.update({k: state[k] for k in unknown})  # reported below as unexpected, by their release name
        load_checked_state_dict(name, network, converted, str(files["checkpoint"]))
        device = resolve_device(device)
        return cls(network, settings, device, resolve_dtype(dtype, device), mapping, name=name)

    def memory_hint(self) -> str:
        return (f"input_size (now {self.settings.input_size}) or micro_batch (now {self.settings.micro_batch})")

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """Aspect kept, both sides >= input size (after the release's cap for > 16:9), multiple of 14."""
        size = self.settings.input_size
        ratio = max(height, width) / min(height, width)
        if ratio > 1.78:
            size = round(int(size * 1.777 / ratio) / 14) * 14
        scale = max(size / height, size / width)
        return _lower_bound_multiple(scale * height, size), _lower_bound_multiple(scale * width, size)

    def _predict_disparity(self, frames, progress=None, cancel=None):
        import torch
        import torch.nn.functional as F

        T, H, W, _ = frames.shape
        h, w = self.network_size(H, W)
        step = INFER_LEN - OVERLAP
        padded = list(range(T)) + [T - 1] * ((step - T % step) % step + OVERLAP)
        starts = list(range(0, T, step))
        mean = torch.tensor((0.485, 0.456, 0.406), device=self.device).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225), device=self.device).view(1, 3, 1, 1)
        half = self.dtype != _float32() and self.device.type == "cuda"

        windows, previous = [], None
        with torch.inference_mode():
            for n, start in enumerate(starts):
                check_cancel(cancel)
                indices = padded[start:start + INFER_LEN]
                if previous is not None:  # condition on the previous window's keyframes
                    indices[:OVERLAP] = [previous[k] for k in KEYFRAMES]
                previous = indices
                x = torch.from_numpy(_resize_like_release(frames, indices, h, w)).to(self.device)
                x = ((x.permute(0, 3, 1, 2) - mean) / std)[None]
                with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=half):
                    depth = self.network(x, micro_batch=self.settings.micro_batch)[0].float()
                depth = F.interpolate(depth[:, None], size=(H, W), mode="bilinear", align_corners=True)[:, 0]
                windows.append(list(depth.cpu().numpy()))
                report(progress, "depth", n + 1, len(starts))
        return stitch_windows(windows, T), {"working_size": [h, w], "windows": len(starts)}


def stitch_windows(windows: list[list[np.ndarray]], num_frames: int) -> np.ndarray:
    """Join per-window predictions into one clip with the release's keyframe alignment."""
    align_len = OVERLAP - INTERP_LEN
    ref_keys = KEYFRAMES[:align_len]
    aligned = list(windows[0])
    reference = [windows[0][k] for k in ref_keys]
    fade = blend_weights(INTERP_LEN)
    for win in windows[1:]:
        s, b = fit_scale_shift(np.concatenate(win[:align_len]), np.concatenate(reference))

        def fit(d):
            return np.maximum(d * s + b, 0.0)

        post = [fit(win[i]) for i in range(align_len, OVERLAP)]
        pre = aligned[-INTERP_LEN:]
        aligned[-INTERP_LEN:] = [p * (1 - f) + q * f for p, q, f in zip(pre, post, fade)]
        aligned += [fit(win[i]) for i in range(OVERLAP, INFER_LEN)]
        reference = reference[:1] + [fit(win[k]) for k in ref_keys[1:]]
    return np.stack(aligned[:num_frames]).astype(np.float32)


def _resize_like_release(frames: np.ndarray, indices, h: int, w: int) -> np.ndarray:
    """(len(indices), h, w, 3) float32 in [0, 1], resized with OpenCV's bicubic as the release does
    (each distinct frame once)."""
    import cv2

    cache = {}
    out = np.empty((len(indices), h, w, 3), dtype=np.float32)
    for j, i in enumerate(indices):
        if i not in cache:
            cache[i] = cv2.resize(frames[i].astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_CUBIC)
        out[j] = cache[i]
    return out


def _lower_bound_multiple(value: float, minimum: int, multiple: int = 14) -> int:
    out = int(round(value / multiple) * multiple)
    if out < minimum:
        out = int(math.ceil(value / multiple) * multiple)
    return out


def _float32():
    import torch

    return torch.float32
