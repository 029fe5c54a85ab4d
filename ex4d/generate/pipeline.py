"""The EX-4D pipeline on diffsynth 2.x's Wan classes.

:class:`Ex4dPipeline` subclasses diffsynth's ``WanVideoPipeline`` for its model slots, scheduler, noise,
VRAM management (``load_models_to_device``) and compile helper, and runs its own short, explicit loop:

    prepare()        prompt embeddings (posi/nega), CLIP + VAE image condition of frame 0, and the
                     video-condition tokens (masked colour + mask video through the VAE and the encoder)
    denoise()        25 flow-matching steps; each step calls predict_noise(); progress + cancel between steps
    predict_noise()  one (CFG-combined) noise prediction: the seam the performance work swaps parts of
    decode()         VAE decode to uint8 frames

The adapter's tokens are added to the DiT's patch tokens right after patch embedding, in both CFG
branches, by :func:`ex4d_model_fn`. diffsynth 2.1.12 has such a hook (``dit.control_adapter``, summed in
``WanModel.patchify``), but that code keeps only batch element 0 (``x = x[0].unsqueeze(0)``), which
would silently break batched CFG; so the model function is written out here (about 20 lines, same op
order as ``model_fn_wan_video``'s I2V path; tests check both give identical outputs).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from einops import rearrange

from ..errors import Cancelled
from . import vae_speed
from .settings import RELEASE_SIGMA_SHIFT

ProgressFn = Callable[..., None]


def embed_dit_inputs(dit, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                     clip_feature: torch.Tensor, y: torch.Tensor, video_tokens: torch.Tensor | None = None):
    """Everything of the Wan I2V DiT forward before its blocks, with the EX-4D condition tokens added
    to the patch tokens (the full sequence: a sequence-parallel caller splits after this).

    Returns (x (b,S,dim) tokens, t (b,dim) time embedding, t_mod (b,6,dim), context (b,L,dim) with the
    CLIP tokens in front, freqs (S,1,d) RoPE, (f, h, w) patch grid).
    """
    from diffsynth.models.wan_video_dit import sinusoidal_embedding_1d

    # The sinusoid is taken of the fp32 timestep (as the release and Wan do) and then cast: a bf16
    # timestep would round 993.7 to 992 (diffsynth 2.x's own pipeline does that).
    t = dit.time_embedding(sinusoidal_embedding_1d(dit.freq_dim, timestep.float()).to(latents.dtype))
    t_mod = dit.time_projection(t).unflatten(1, (6, dit.dim))
    context = dit.text_embedding(context)
    batch = context.shape[0]

    x = torch.cat([latents, y], dim=1)
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    clip_embedding = dit.img_emb(clip_feature)
    if clip_embedding.shape[0] != batch:
        clip_embedding = clip_embedding.expand(batch, *clip_embedding.shape[1:])
    context = torch.cat([clip_embedding, context], dim=1)

    x = dit.patch_embedding(x)
    f, h, w = x.shape[2:]
    x = rearrange(x, "b c f h w -> b (f h w) c").contiguous()
    if video_tokens is not None:
        x = x + video_tokens  # EX-4D: condition tokens join the patch tokens (both CFG branches)

    freqs = torch.cat([
        dit.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        dit.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        dit.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1).to(x.device)
    return x, t, t_mod, context, freqs, (f, h, w)


def ex4d_model_fn(dit, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                  clip_feature: torch.Tensor, y: torch.Tensor, video_tokens: torch.Tensor | None = None,
                  step_cache=None, cache_key: str = "posi", context_kv=None, **_unused) -> torch.Tensor:
    """Wan I2V DiT forward with the EX-4D condition tokens added after patch embedding.

    Batched CFG: pass ``context`` with batch 2 (posi, nega); latents/y/clip/video_tokens of batch 1 are
    broadcast. ``timestep`` has shape (1,), preferably float32 (any float dtype works).

    ``step_cache`` (a :class:`~ex4d.generate.preview_cache.PreviewCache`, opt-in) may replace the block
    stack by the residual it stored for ``cache_key`` (one state per CFG branch or batched pair).

    ``context_kv`` (an :class:`~ex4d.generate.accel.ContextKV`, the ``context_kv_cache`` lever) gives blocks
    with the levers' forward their cross-attention keys/values computed at the first step.
    """
    x, t, t_mod, context, freqs, (f, h, w) = embed_dit_inputs(dit, latents, timestep, context, clip_feature, y,
                                                              video_tokens)

    if step_cache is not None and step_cache.should_skip(cache_key, step_cache.probe(dit, x, t, t_mod), x):
        x = step_cache.reuse(cache_key, x)
    else:
        x_in = x
        scope = context_kv.scope(cache_key) if context_kv is not None else None
        for block in dit.blocks:
            if scope is not None and "forward" in block.__dict__:  # the levers' forward (accel.patch_block_forwards)
                x = block(x, context, t_mod, freqs, context_kv=scope)
            else:
                x = block(x, context, t_mod, freqs)
        if step_cache is not None:
            step_cache.store(cache_key, x_in, x)
    x = dit.head(x, t)
    return dit.unpatchify(x, (f, h, w))


@dataclass
class Conditioning:
    """Everything the DiT sees besides the latents and the timestep (computed once per clip/window)."""

    context: torch.Tensor  # (1, L, text_dim) positive prompt embedding
    negative_context: torch.Tensor | None  # None when cfg == 1
    clip_feature: torch.Tensor  # (1, 257, 1280)
    y: torch.Tensor  # (1, 4 + 16, f, h, w): first-frame mask + VAE latents of frame 0 and zeros
    video_tokens: torch.Tensor | None  # (1, f*h/2*w/2, dim) from the video condition encoder
    cfg: float = 5.0
    context_kv: object = None  # an accel.ContextKV when the context_kv_cache lever is on


def _pipeline_base():
    from diffsynth.pipelines.wan_video import WanVideoPipeline

    return WanVideoPipeline


class Ex4dPipeline(_pipeline_base()):
    """diffsynth WanVideoPipeline + the EX-4D video condition encoder and loop (see module docstring)."""

    def __init__(self, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.bfloat16):
        super().__init__(device=device, torch_dtype=torch_dtype)
        self.condition_encoder = None
        self.memory_mode = "resident"
        self.model_fn = ex4d_model_fn  # swap point for speed work (compiled / attention variants)
        self.batch_cfg = False  # True: one DiT call with batch 2 (posi, nega) instead of two calls
        self.vae_channels_last = False  # True: the speed lever of .vae_speed (set by install_vae_channels_last)
        self.context_kv_cache = False  # True: each Conditioning keeps the cross-attention keys/values (accel.ContextKV)
        self.in_iteration_models = ("dit", "condition_encoder")
        self.adapter_report = None
        self.speed = "reference"  # set by speed.finish_speed
        self.speed_report = None
        self.step_cache = None  # a PreviewCache during a generation that asked for one
        self.text_swapper = None  # memory mode stream: the text encoder visits the GPU only to encode
        self.block_offloader = None  # memory mode stream: DiT blocks streamed from pinned host memory
        self.stream_plan = None

    def load_models_to_device(self, model_names) -> None:
        """diffsynth's stage switching (offload models not in use, onload those in use), also on CPU."""
        if not self.vram_management_enabled:
            return
        for name, model in self.named_children():
            if not getattr(model, "vram_management_enabled", False):
                continue
            action = "onload" if name in model_names else "offload"
            if hasattr(model, action):
                getattr(model, action)()
            else:
                for module in model.modules():
                    if hasattr(module, action):
                        getattr(module, action)()
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()

    # -- encoders -----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, text: str) -> torch.Tensor:
        self.load_models_to_device(("text_encoder",))
        ids, mask = self.tokenizer(text, return_mask=True, add_special_tokens=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.text_swapper is not None:
            with self.text_swapper.on_device():
                emb = self.text_encoder(ids, mask)
        else:
            emb = self.text_encoder(ids, mask)
        length = int(mask.gt(0).sum(dim=1)[0])
        emb[:, length:] = 0
        return emb.to(self.torch_dtype)

    def _vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        """(3,T,H,W) in [-1,1] -> (1,16,f,h,w), not tiled (the release's setting)."""
        if self.vae_channels_last:
            return vae_speed.encode(self.vae, video[None], self.device).to(self.torch_dtype)
        z = self.vae.encode([video.to(dtype=self.torch_dtype)], device=self.device, tiled=False)
        return z.to(dtype=self.torch_dtype, device=self.device)

    @torch.no_grad()
    def encode_image_condition(self, frame0: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame 0 (3,H,W) in [-1,1] -> (CLIP feature (1,257,1280), y (1,20,f,h,w)) as in Wan I2V."""
        _, height, width = frame0.shape
        self.load_models_to_device(("image_encoder", "vae"))
        image = frame0.to(device=self.device, dtype=self.torch_dtype)[None]
        clip_feature = self.image_encoder.encode_image([image.clone()]).to(dtype=self.torch_dtype, device=self.device)
        first = torch.ones(1, num_frames, height // 8, width // 8, device=self.device)
        first[:, 1:] = 0
        first = torch.cat([first[:, :1].repeat_interleave(4, dim=1), first[:, 1:]], dim=1)
        first = first.view(1, first.shape[1] // 4, 4, height // 8, width // 8).transpose(1, 2)[0]
        vae_input = torch.cat([image[0][:, None], image.new_zeros(3, num_frames - 1, height, width)], dim=1)
        latents = self._vae_encode(vae_input)[0]
        y = torch.cat([first.to(latents.dtype), latents])[None]
        return clip_feature, y

    @torch.no_grad()
    def encode_video_condition(self, color_m11: torch.Tensor, mask_m11: torch.Tensor) -> torch.Tensor:
        """Masked colour (3,T,H,W) and mask (3,T,H,W), both in [-1,1] -> condition tokens (1, N, dim).

        The mask is mapped once more (x2-1) before the VAE, so it sees -3 and +1: the released weights
        were trained with exactly this.
        """
        self.load_models_to_device(("vae", "condition_encoder"))
        color_latents = self._vae_encode(color_m11)
        mask_latents = self._vae_encode(mask_m11 * 2 - 1)
        enc = self.condition_encoder
        param = next(enc.parameters())
        out = enc(color_latents.to(param.dtype), mask_latents.to(param.dtype))
        return rearrange(out, "b c f h w -> b (f h w) c").to(self.torch_dtype).contiguous()

    @torch.no_grad()
    def prepare(self, color_m11: np.ndarray | torch.Tensor, mask_m11: np.ndarray | torch.Tensor, *, prompt: str,
                negative_prompt: str, cfg: float, image_frame: np.ndarray | torch.Tensor | None = None) -> Conditioning:
        """Inputs (3,T,H,W) in [-1,1]; the image condition is frame 0 of the masked colour video unless given."""
        color = torch.as_tensor(color_m11, dtype=torch.float32)
        mask = torch.as_tensor(mask_m11, dtype=torch.float32)
        frame0 = color[:, 0] if image_frame is None else torch.as_tensor(image_frame, dtype=torch.float32)
        context = self.encode_prompt(prompt)
        negative = self.encode_prompt(negative_prompt) if cfg != 1.0 else None
        clip_feature, y = self.encode_image_condition(frame0, color.shape[1])
        tokens = self.encode_video_condition(color, mask)
        context_kv = None
        if self.context_kv_cache:
            from .accel import ContextKV

            context_kv = ContextKV()
        return Conditioning(context, negative, clip_feature, y, tokens, float(cfg), context_kv)

    # -- denoising ----------------------------------------------------------------------------------

    def initial_noise(self, num_frames: int, height: int, width: int, seed: int) -> torch.Tensor:
        """Gaussian noise from a CPU generator (same seed -> same noise on any device), float32."""
        shape = (1, 16, (num_frames - 1) // 4 + 1, height // 8, width // 8)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The CFG-combined noise prediction for one step (float32)."""
        kwargs = dict(dit=self.dit, latents=latents.to(self.torch_dtype),
                      timestep=timestep.to(dtype=torch.float32, device=self.device),
                      clip_feature=cond.clip_feature, y=cond.y, video_tokens=cond.video_tokens,
                      context_kv=cond.context_kv)
        if self.step_cache is not None:
            kwargs["step_cache"] = self.step_cache
        if cond.negative_context is None or cond.cfg == 1.0:
            return self.model_fn(context=cond.context, cache_key="posi", **kwargs).float()
        if self.batch_cfg and cond.context.shape == cond.negative_context.shape:
            both = self.model_fn(context=torch.cat([cond.context, cond.negative_context]), cache_key="cfg_pair",
                                 **kwargs).float()
            positive, negative = both[:1], both[1:]
        else:
            positive = self.model_fn(context=cond.context, cache_key="posi", **kwargs).float()
            negative = self.model_fn(context=cond.negative_context, cache_key="nega", **kwargs).float()
        return negative + cond.cfg * (positive - negative)

    @torch.no_grad()
    def denoise(self, cond: Conditioning, noise: torch.Tensor, *, steps: int, sigma_shift: float = RELEASE_SIGMA_SHIFT,
                progress: ProgressFn | None = None, cancel: threading.Event | None = None,
                step_offset: int = 0, total_steps: int | None = None) -> torch.Tensor:
        """Flow-matching loop; latents kept in float32 between steps. Checks ``cancel`` before every step."""
        self.scheduler.set_timesteps(steps, denoising_strength=1.0, shift=sigma_shift)
        self.load_models_to_device(self.in_iteration_models)
        latents = noise.float()
        total = total_steps or steps
        if progress is not None:
            progress("denoise", step_offset, total)
        if self.step_cache is not None:
            self.step_cache.start(len(self.scheduler.timesteps), step_offset)
        for index, timestep in enumerate(self.scheduler.timesteps):
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
            if self.step_cache is not None:
                self.step_cache.set_step(index)
            noise_pred = self.predict_noise(latents, timestep[None], cond)
            latents = self.scheduler.step(noise_pred, timestep, latents)
            if progress is not None:
                progress("denoise", step_offset + index + 1, total)
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> (T,H,W,3) uint8 (not tiled, as the release)."""
        self.load_models_to_device(("vae",))
        if self.vae_channels_last:
            video = vae_speed.decode(self.vae, latents.to(self.torch_dtype), self.device)[0]
        else:
            video = self.vae.decode(latents.to(self.torch_dtype), device=self.device, tiled=False)[0]
        frames = ((video.float() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)
        return frames.permute(1, 2, 3, 0).cpu().numpy()

    @torch.no_grad()
    def generate_clip(self, color_m11: np.ndarray, mask_m11: np.ndarray, *, prompt: str, negative_prompt: str,
                      steps: int, cfg: float, seed: int, sigma_shift: float = RELEASE_SIGMA_SHIFT,
                      image_frame: np.ndarray | None = None, progress: ProgressFn | None = None,
                      cancel: threading.Event | None = None, step_offset: int = 0,
                      total_steps: int | None = None) -> np.ndarray:
        """One model-length clip (T = 4k+1 frames, H and W multiples of 16) -> (T,H,W,3) uint8."""
        _, num_frames, height, width = color_m11.shape
        if progress is not None:
            progress("encode", 0, 1)
        cond = self.prepare(color_m11, mask_m11, prompt=prompt, negative_prompt=negative_prompt, cfg=cfg,
                            image_frame=image_frame)
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        noise = self.initial_noise(num_frames, height, width, seed)
        latents = self.denoise(cond, noise, steps=steps, sigma_shift=sigma_shift, progress=progress, cancel=cancel,
                               step_offset=step_offset, total_steps=total_steps)
        if progress is not None:
            progress("decode", 0, 1)
        return self.decode(latents)


def assemble_pipeline(components, *, device: str | torch.device, dtype: torch.dtype, adapter_state: dict | None = None,
                      adapter_path: str = "<memory>", memory_mode: str = "resident", lora: bool = True,
                      vram_limit_gb: float | None = None, speed: str = "reference", notice=None) -> Ex4dPipeline:
    """Put components into an Ex4dPipeline: LoRA, strict adapter load, the memory mode, then the speed
    levers (:mod:`ex4d.generate.speed`; ``reference`` here, ``fast`` is the product's default)."""
    import warnings

    from .adapter import add_lora, load_adapter, randomize_adapter_
    from .memory import apply_memory_mode
    from .speed import finish_speed, plan_speed

    plan = plan_speed(speed, memory_mode, device)  # validates speed before any weight moves

    pipe = Ex4dPipeline(device=device, torch_dtype=dtype)
    dit = components.dit
    if lora:
        dit = add_lora(dit)
    if isinstance(adapter_state, str) and adapter_state == "random":
        randomize_adapter_(dit, components.condition_encoder, seed=0)
    elif adapter_state is not None:
        pipe.adapter_report = load_adapter(dit, components.condition_encoder, adapter_state, adapter_path)
    pipe.dit = dit
    pipe.text_encoder = components.text_encoder
    pipe.image_encoder = components.image_encoder
    pipe.vae = components.vae
    pipe.condition_encoder = components.condition_encoder
    pipe.tokenizer = components.tokenizer
    apply_memory_mode(pipe, memory_mode, vram_limit_gb=vram_limit_gb, fp8_matmul=plan.fp8_matmul,
                      fp8_weight_only=plan.fp8_weight_only)
    finish_speed(pipe, plan, notice=notice or warnings.warn)
    return pipe
