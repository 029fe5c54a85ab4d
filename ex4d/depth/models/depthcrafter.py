"""DepthCrafter, rebuilt from maintained diffusers/transformers parts, with the EX-4D release's settings.

Model: DepthCrafter fine-tunes Stable Video Diffusion's spatio-temporal UNet to denoise *depth*
latents conditioned on the video. Parts and where their weights come from:

* ``UNetSpatioTemporalConditionModel`` (diffusers) <- ``tencent/DepthCrafter`` (``config.json`` +
  ``diffusion_pytorch_model.safetensors`` at the repo root; ``unet/`` in snapshots before 2024-09-23;
  SVD's UNet config; the release subclasses the UNet only to change its forward, see below);
* ``AutoencoderKLTemporalDecoder`` (diffusers) <- SVD ``vae/``;
* ``CLIPVisionModelWithProjection`` (transformers) <- SVD ``image_encoder/``; CLIP normalisation from
  SVD ``feature_extractor/preprocessor_config.json``;
* ``EulerDiscreteScheduler`` (diffusers) <- SVD ``scheduler/scheduler_config.json``.

Inference recipe (facts taken from the public DepthCrafter code, re-expressed here):

* frames in [0, 1] -> [-1, 1]; each frame gets its own CLIP image embedding (224x224 antialiased
  resize, CLIP mean/std), and the UNet cross-attends per frame (the one difference from SVD's forward,
  which shares one embedding across frames);
* conditioning latents = VAE posterior mode of (video + 0.02 * noise), not scaled by the VAE factor;
  the UNet input is [noisy depth latents (4 ch), video latents (4 ch)];
* added time ids (fps id, motion bucket, noise aug) = (7, 127, 0.02);
* Euler (v-prediction, Karras sigmas) for ``num_inference_steps``; classifier-free guidance only when
  guidance > 1 (unconditional branch: zero video latents and zero embeddings);
* long clips: windows of ``window_size`` frames advancing by ``window_size - overlap``; the initial
  noise of the next window is the previous one's rotated by ``overlap`` frames; at the first step of a
  window the overlapping frames start from the already-denoised latents plus that noise scaled to
  sigma_0; finished windows are cross-faded over the overlap with weights linspace(0, 1);
* decode with the temporal decoder in chunks of ``decode_chunk_size`` frames, image = clamp(x/2+0.5),
  averaged over RGB = relative disparity;
* the random stream (augmentation noise, initial latents, scheduler noise) comes from one generator
  seeded with ``seed`` on the compute device, in that order.

EX-4D's settings: 5 steps, guidance 1.0, window 110, overlap 25, seed 42, frames at a multiple of 64
(no larger than ``max_res`` = 1024). The disparity -> depth mapping is :class:`base.DisparityToDepth`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import errors
from .base import (DepthModel, DisparityToDepth, check_cancel, load_checked_state_dict, loading_info_error,
                   read_json, read_state_dict, report, require_files, resolve_device, resolve_dtype,
                   weights_folder, wrap_loading_errors)

NAME = "depthcrafter"
COMPILE_BACKEND = "inductor"  # settings.compile's torch.compile backend (tests: aot_eager, no C++ compiler needed)
DEPTHCRAFTER_REPO = "tencent/DepthCrafter"
SVD_REPO = "stabilityai/stable-video-diffusion-img2vid-xt"
# Folders tried under the weights folder (first holding the marker file wins); "." = the folder itself.
# tencent/DepthCrafter keeps the UNet's config.json + weights at its root (they were in unet/ before
# 2024-09-23); SVD keeps each component in its own subfolder.
UNET_DIRS = ("DepthCrafter", "DepthCrafter/unet", "unet")
SVD_ROOTS = ("stable-video-diffusion-img2vid-xt", "stable-video-diffusion-img2vid", ".")


@dataclass(frozen=True)
class DepthCrafterSettings:
    """The release's choices by default (EX-4D passes 5 steps and guidance 1.0)."""

    num_inference_steps: int = 5
    guidance_scale: float = 1.0
    window_size: int = 110
    overlap: int = 25
    seed: int = 42
    noise_aug_strength: float = 0.02
    fps_id: int = 7
    motion_bucket_id: int = 127
    max_res: int = 1024
    decode_chunk_size: int = 8
    encode_chunk_size: int = 8
    # Keep components on the CPU and move each to the GPU only while it runs (lower VRAM, slower).
    offload: bool = False
    # torch.compile the UNet forward and the temporal decoder (same maths, fused elementwise work; one-time
    # compilation per clip shape). Off until measured on a GPU: bench/depth_stages_gpu.py has the variant.
    compile: bool = False

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise errors.InputError("depthcrafter: num_inference_steps must be >= 1")
        if self.window_size < 1 or not (0 <= self.overlap < self.window_size):
            raise errors.InputError(f"depthcrafter: need window_size >= 1 and 0 <= overlap < window_size, "
                                    f"got {self.window_size}/{self.overlap}")
        if self.decode_chunk_size < 1 or self.encode_chunk_size < 1 or self.max_res < 8:
            raise errors.InputError("depthcrafter: chunk sizes must be >= 1 and max_res >= 8")


def download_command(name: str = NAME, folder="DIR") -> str:
    return (f"hf download {DEPTHCRAFTER_REPO} --local-dir {folder}/DepthCrafter && "
            f"hf download {SVD_REPO} --include 'vae/*' 'image_encoder/*' 'feature_extractor/*' 'scheduler/*' "
            f"--local-dir {folder}/{SVD_ROOTS[0]} (SVD is gated: accept its licence and `hf auth login` first)")


# --------------------------------------------------------------------------------------------------
# Published configurations (for building full-size random models in benchmarks; loading reads the
# folder's own config files)
# --------------------------------------------------------------------------------------------------


def published_configs() -> dict:
    """Configs of the published components (SVD img2vid-xt layout; DepthCrafter's UNet = SVD's)."""
    return {
        "unet": dict(
            sample_size=96, in_channels=8, out_channels=4,
            down_block_types=["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
            up_block_types=["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
            block_out_channels=[320, 640, 1280, 1280], addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=768, layers_per_block=2, cross_attention_dim=1024,
            transformer_layers_per_block=1, num_attention_heads=[5, 10, 20, 20], num_frames=25,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=768,
            scaling_factor=0.18215, force_upcast=True,
        ),
        "image_encoder": dict(
            hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
            num_attention_heads=16, num_channels=3, image_size=224, patch_size=14, hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        "scheduler": dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True,
            sigma_min=0.002, sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous",
            steps_offset=1,
        ),
        "feature_extractor": dict(
            image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        ),
    }


def tiny_configs() -> dict:
    """Same classes, tiny sizes (tests and CPU smoke runs). Working size multiple = 4 (VAE) x 2 (UNet) = 8."""
    cfg = published_configs()
    cfg["unet"] = dict(
        sample_size=8, in_channels=8, out_channels=4,
        down_block_types=["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
        up_block_types=["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
        block_out_channels=[32, 64], addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
        layers_per_block=1, cross_attention_dim=32, transformer_layers_per_block=1, num_attention_heads=[2, 4],
        num_frames=8,
    )
    cfg["vae"] = dict(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3, block_out_channels=[32, 32, 32],
        layers_per_block=1, latent_channels=4, sample_size=32, scaling_factor=0.18215, force_upcast=True,
    )
    cfg["image_encoder"] = dict(
        hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
        num_channels=3, image_size=224, patch_size=32, hidden_act="gelu", layer_norm_eps=1e-5,
    )
    return cfg


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class DepthCrafter(DepthModel):
    name = NAME

    def __init__(self, unet, vae, image_encoder, scheduler, clip_mean, clip_std, settings: DepthCrafterSettings,
                 device, dtype, mapping: DisparityToDepth | None = None):
        super().__init__(device, dtype, mapping)
        self.unet, self.vae, self.image_encoder, self.scheduler = unet, vae, image_encoder, scheduler
        self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
        self.settings = settings
        import torch

        home = "cpu" if settings.offload else device
        for module in (unet, vae, image_encoder):
            # plain Module.to: diffusers' override only adds a warning about fp32-pinned modules (none here)
            torch.nn.Module.to(module, device=home, dtype=dtype).eval().requires_grad_(False)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def build_random(cls, configs: dict, device=None, dtype=None, settings=None, mapping=None, seed: int = 0):
        """Random-initialised components from ``configs`` (published_configs() / tiny_configs())."""
        import torch
        from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        torch.manual_seed(seed)
        with torch.device(device):  # initialise where it will run (full size: seconds on a GPU, not minutes)
            unet = UNetSpatioTemporalConditionModel(**configs["unet"])
            vae = AutoencoderKLTemporalDecoder(**configs["vae"])
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**configs["image_encoder"]))
        scheduler = EulerDiscreteScheduler(**configs["scheduler"])
        fe = configs["feature_extractor"]
        return cls(unet, vae, image_encoder, scheduler, fe["image_mean"], fe["image_std"],
                   settings or DepthCrafterSettings(), device, dtype, mapping)

    @classmethod
    def load(cls, weights_dir, device=None, dtype=None, settings: DepthCrafterSettings | None = None,
             mapping: DisparityToDepth | None = None) -> "DepthCrafter":
        from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
        from transformers import CLIPVisionModelWithProjection

        settings = settings or DepthCrafterSettings()
        download = download_command(NAME, weights_dir or "DIR")
        folder = weights_folder(weights_dir, NAME, download)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        files = require_files(NAME, folder, _needed_files(folder, prefer_fp16=dtype != _float32()), download)

        unet = _load_diffusers(UNetSpatioTemporalConditionModel, files["unet_config"], files["unet_weights"])
        vae = _load_diffusers(AutoencoderKLTemporalDecoder, files["vae_config"], files["vae_weights"])
        encoder_dir = files["image_encoder_config"].parent
        variant = "fp16" if ".fp16." in files["image_encoder_weights"].name else None
        with wrap_loading_errors(NAME, encoder_dir):
            image_encoder, info = CLIPVisionModelWithProjection.from_pretrained(
                str(encoder_dir), local_files_only=True, output_loading_info=True, variant=variant)
        info = dict(info)
        # Older CLIP checkpoints carry the (now non-persistent) position_ids buffer.
        info["unexpected_keys"] = [k for k in info.get("unexpected_keys", []) if not k.endswith("position_ids")]
        loading_info_error(NAME, str(files["image_encoder_weights"]), info)
        with wrap_loading_errors(NAME, files["scheduler"]):
            scheduler = EulerDiscreteScheduler.from_config(read_json(NAME, files["scheduler"]))
        fe = read_json(NAME, files["feature_extractor"])
        clip_mean = fe.get("image_mean", published_configs()["feature_extractor"]["image_mean"])
        clip_std = fe.get("image_std", published_configs()["feature_extractor"]["image_std"])
        return cls(unet, vae, image_encoder, scheduler, clip_mean, clip_std, settings, device, dtype, mapping)

    # ---- inference ------------------------------------------------------------------------------

    def memory_hint(self) -> str:
        s = self.settings
        return (f"window_size (now {s.window_size}) or max_res (now {s.max_res}) or decode_chunk_size "
                f"(now {s.decode_chunk_size}), or turn on offload")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Working sizes must divide by VAE factor x UNet downsampling (8 x 8 = 64 for the release)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """The release's rule: round each side to the nearest multiple; if that exceeds max_res,
        scale the longer side to max_res first."""
        m = self.settings.max_res
        k = self.size_multiple
        h, w = round(height / k) * k, round(width / k) * k
        if max(h, w) > m:
            scale = m / max(height, width)
            h, w = round(height * scale / k) * k, round(width * scale / k) * k
        return max(h, k), max(w, k)

    def _predict_disparity(self, frames, progress=None, cancel=None):
        import torch
        import torch.nn.functional as F

        s = self.settings
        T, H, W, _ = frames.shape
        h, w = self.working_size(H, W)
        device, dtype = self.device, self.dtype
        generator = torch.Generator(device=device).manual_seed(int(s.seed))

        with torch.inference_mode():
            video = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float() / 255.0
            if (h, w) != (H, W):
                video = F.interpolate(video, size=(h, w), mode="bilinear", align_corners=False,
                                      antialias=h < H or w < W)
            video = (video * 2.0 - 1.0).to(dtype)  # (T, 3, h, w) in [-1, 1]

            check_cancel(cancel)
            report(progress, "depth: encode", 0, 1)
            with self._on_device(self.image_encoder):
                embeddings = self._encode_clip(video)[None]  # (1, T, D)
            noise = torch.randn(video.shape, generator=generator, device=device, dtype=dtype)
            with self._on_device(self.vae):
                video_latents = self._encode_vae(video + s.noise_aug_strength * noise)[None]  # (1, T, 4, h/8, w/8)
            del noise
            report(progress, "depth: encode", 1, 1)

            latents = self._denoise(video_latents, embeddings, generator, progress, cancel)
            check_cancel(cancel)
            with self._on_device(self.vae):
                disparity = self._decode(latents[0])  # (T, h, w) float32 in [0, 1]
            if (h, w) != (H, W):
                disparity = F.interpolate(disparity[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
            out = disparity.cpu().numpy().astype(np.float32)
        info = {"working_size": [h, w], "steps": s.num_inference_steps, "guidance_scale": s.guidance_scale,
                "window_size": s.window_size, "overlap": s.overlap, "seed": s.seed}
        return out, info

    def _encode_clip(self, video):
        """Per-frame CLIP image embeddings (T, D) from [-1, 1] frames."""
        import torch

        try:  # the antialiased resize SVD pipelines use (Gaussian blur then bicubic)
            from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
        except ImportError:  # pragma: no cover - older/newer diffusers without the helper
            _resize_with_antialiasing = None
        mean = torch.tensor(self.clip_mean, device=video.device).view(1, 3, 1, 1)
        std = torch.tensor(self.clip_std, device=video.device).view(1, 3, 1, 1)
        out = []
        for i in range(0, video.shape[0], self.settings.encode_chunk_size):
            chunk = video[i:i + self.settings.encode_chunk_size].float()
            if _resize_with_antialiasing is not None:
                chunk = _resize_with_antialiasing(chunk, (224, 224))
            else:
                chunk = torch.nn.functional.interpolate(chunk, size=(224, 224), mode="bicubic", antialias=True)
            pixels = (((chunk + 1.0) / 2.0) - mean) / std
            out.append(self.image_encoder(pixel_values=pixels.to(self.dtype)).image_embeds)
        return torch.cat(out, dim=0)

    def _encode_vae(self, video):
        import torch

        upcast = self.dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))
        vae_dtype = torch.float32 if upcast else self.dtype
        if upcast:
            torch.nn.Module.to(self.vae, torch.float32)
        try:
            out = []
            for i in range(0, video.shape[0], self.settings.encode_chunk_size):
                chunk = video[i:i + self.settings.encode_chunk_size].to(vae_dtype)
                out.append(self.vae.encode(chunk).latent_dist.mode())
            return torch.cat(out, dim=0).to(self.dtype)
        finally:
            if upcast:
                torch.nn.Module.to(self.vae, self.dtype)

    def _denoise(self, video_latents, embeddings, generator, progress, cancel):
        import torch

        s = self.settings
        sched = self.scheduler
        device, dtype = self.device, self.dtype
        num_frames = video_latents.shape[1]
        window, overlap = s.window_size, s.overlap
        if num_frames <= window:
            window, overlap = num_frames, 0
        stride = window - overlap

        added_time_ids = torch.tensor([[s.fps_id, s.motion_bucket_id, s.noise_aug_strength]], device=device, dtype=dtype)
        sched.set_timesteps(s.num_inference_steps, device=device)
        timesteps = sched.timesteps
        shape = (1, window, self.unet.config.out_channels) + tuple(video_latents.shape[-2:])
        noise_init = torch.randn(shape, generator=generator, device=device, dtype=dtype) * sched.init_noise_sigma
        guided = s.guidance_scale > 1.0

        windows = [start for start in range(0, max(num_frames - overlap, 1), stride)]
        total = len(windows) * len(timesteps)
        done = 0
        stitched = None
        fade = torch.linspace(0, 1, overlap, device=device).view(1, overlap, 1, 1, 1) if overlap else None
        with self._on_device(self.unet):
            for start in windows:
                end = min(start + window, num_frames)
                sched.set_timesteps(s.num_inference_steps, device=device)
                latents = noise_init[:, :end - start].clone()
                if overlap:
                    noise_init = torch.cat([noise_init[:, -overlap:], noise_init[:, :stride]], dim=1)
                cond = video_latents[:, start:end]
                emb = embeddings[:, start:end]
                for i, t in enumerate(timesteps):
                    check_cancel(cancel)
                    if stitched is not None and i == 0 and overlap:
                        # Continue the overlap from the previous window's result, re-noised to sigma_0.
                        latents[:, :overlap] = (stitched[:, -overlap:]
                                                + latents[:, :overlap] / sched.init_noise_sigma * sched.sigmas[0])
                    x = sched.scale_model_input(latents, t)
                    unet = self._maybe_compiled("_unet")
                    pred = unet(torch.cat([x, cond], dim=2), t, emb, added_time_ids)
                    if guided:
                        uncond = unet(torch.cat([x, torch.zeros_like(cond)], dim=2), t,
                                      torch.zeros_like(emb), added_time_ids)
                        pred = uncond + s.guidance_scale * (pred - uncond)
                    latents = sched.step(pred, t, latents, generator=generator).prev_sample
                    done += 1
                    report(progress, "depth: denoise", done, total)
                if stitched is None:
                    stitched = latents
                elif not overlap:  # back-to-back windows
                    stitched = torch.cat([stitched, latents], dim=1)
                else:
                    stitched[:, -overlap:] = latents[:, :overlap] * fade + stitched[:, -overlap:] * (1 - fade)
                    stitched = torch.cat([stitched, latents[:, overlap:]], dim=1)
        return stitched

    def _unet(self, sample, timestep, frame_embeddings, added_time_ids):
        """SVD's UNet forward, but with one cross-attention embedding per frame: (B, T, D) -> (B*T, 1, D)."""
        import torch

        unet = self.unet
        batch, frames = sample.shape[:2]
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        t = t.reshape(-1)[:1].to(sample.device).expand(batch)
        emb = unet.time_embedding(unet.time_proj(t).to(unet.conv_in.weight.dtype))
        extra = unet.add_time_proj(added_time_ids.flatten()).reshape(batch, -1).to(emb.dtype)
        emb = (emb + unet.add_embedding(extra)).repeat_interleave(frames, dim=0)
        context = frame_embeddings.flatten(0, 1).unsqueeze(1).to(unet.conv_in.weight.dtype)

        h = unet.conv_in(sample.flatten(0, 1).to(unet.conv_in.weight.dtype))
        indicator = torch.zeros(batch, frames, dtype=h.dtype, device=h.device)
        skips = (h,)
        for block in unet.down_blocks:
            kwargs = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
            h, res = block(hidden_states=h, temb=emb, image_only_indicator=indicator, **kwargs)
            skips += res
        h = unet.mid_block(hidden_states=h, temb=emb, encoder_hidden_states=context, image_only_indicator=indicator)
        for block in unet.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            kwargs = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, image_only_indicator=indicator, **kwargs)
        h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
        return h.reshape(batch, frames, *h.shape[1:])

    def _decode(self, latents):
        """(T, 4, h', w') latents -> (T, h, w) float32 disparity in [0, 1] (RGB mean of the image)."""
        import torch

        latents = latents / self.vae.config.scaling_factor
        decode = self._maybe_compiled("_decode_chunk")
        out = []
        for i in range(0, latents.shape[0], self.settings.decode_chunk_size):
            chunk = latents[i:i + self.settings.decode_chunk_size].to(self.vae.dtype)
            image = decode(chunk).float()
            out.append((image / 2 + 0.5).clamp(0, 1).mean(dim=1))
        return torch.cat(out, dim=0)

    def _decode_chunk(self, chunk):
        return self.vae.decode(chunk, num_frames=chunk.shape[0]).sample

    def _maybe_compiled(self, name: str):
        """The bound method ``name``, through torch.compile when ``settings.compile`` (built once; eager
        from the first compiler failure on, with one warning)."""
        if not self.settings.compile:
            return getattr(self, name)
        compiled = self.__dict__.setdefault("_compiled", {})
        if name not in compiled:
            from ...compiled import CompiledOrEager

            compiled[name] = CompiledOrEager(getattr(self, name), what=f"depthcrafter: compiling {name.strip('_')}",
                                             dynamic=False, backend=COMPILE_BACKEND)
        return compiled[name]

    @contextlib.contextmanager
    def _on_device(self, module):
        if not self.settings.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------------


def _float32():
    import torch

    return torch.float32


def _pick_root(folder: Path, roots, marker: str) -> str:
    for root in roots:
        if (folder / root / marker).exists():
            return root
    return roots[0]


def _needed_files(folder: Path, prefer_fp16: bool) -> dict:
    unet_dir = _pick_root(folder, UNET_DIRS, "config.json")
    svd_root = _pick_root(folder, SVD_ROOTS, "vae")

    def rel(root, *parts):
        return str(Path(root, *parts)) if root != "." else str(Path(*parts))

    def weights(root, sub, stem):
        full, half = rel(root, sub, f"{stem}.safetensors"), rel(root, sub, f"{stem}.fp16.safetensors")
        return (half, full) if prefer_fp16 else (full, half)

    return {
        "unet_config": (rel(unet_dir, "config.json"),),
        "unet_weights": weights(unet_dir, ".", "diffusion_pytorch_model"),
        "vae_config": (rel(svd_root, "vae", "config.json"),),
        "vae_weights": weights(svd_root, "vae", "diffusion_pytorch_model"),
        "image_encoder_config": (rel(svd_root, "image_encoder", "config.json"),),
        "image_encoder_weights": weights(svd_root, "image_encoder", "model"),
        "feature_extractor": (rel(svd_root, "feature_extractor", "preprocessor_config.json"),),
        "scheduler": (rel(svd_root, "scheduler", "scheduler_config.json"),),
    }


def _load_diffusers(model_cls, config_path: Path, weights_path: Path):
    """Build ``model_cls`` from its config.json without allocating random weights, then assign the
    checkpoint's tensors; any missing/unexpected/wrong-shape key is an error that names them."""
    from accelerate import init_empty_weights

    config = read_json(NAME, config_path)
    with wrap_loading_errors(NAME, config_path):
        with init_empty_weights():
            model = model_cls.from_config(config)
    state = read_state_dict(NAME, weights_path)
    load_checked_state_dict(NAME, model, state, str(weights_path))
    return model
