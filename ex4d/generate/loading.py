"""Load the published weights (local files only) or build the tiny/random instances."""

from __future__ import annotations

import os

import torch

from ..errors import WeightsError
from .architectures import (ARCHITECTURES, Components, build_random_components, make_condition_encoder,
                            make_image_encoder, make_vae)
from .weights import check_weights


def _load(model_class, path, config, dtype, device, converter=None, what="model"):
    """diffsynth's loader (skip-init + strict load_state_dict(assign=True)) with our error messages."""
    from diffsynth.core.loader import load_model

    try:
        return load_model(model_class, path, config=config, torch_dtype=dtype, device=device,
                          state_dict_converter=converter, use_disk_map=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad or foreign file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        names = path if isinstance(path, str) else f"{os.path.dirname(path[0])}/ ({len(path)} files)"
        raise WeightsError(f"cannot load the {what} from {names}: {first}") from None


def load_components(models_dir=None, *, device="cpu", dtype=torch.bfloat16, arch: str = "i2v-14b") -> tuple[Components, object]:
    """Read every file of the layout (WeightsError names all missing ones first). -> (components, layout)."""
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder
    from diffsynth.utils.state_dict_converters.wan_video_image_encoder import WanImageEncoderStateDictConverter
    from diffsynth.utils.state_dict_converters.wan_video_vae import WanVideoVAEStateDictConverter

    layout = check_weights(models_dir)
    spec = ARCHITECTURES[arch]
    device = str(device)
    dit = _load(WanModel, [str(p) for p in layout.dit_shards], spec.dit, dtype, device, what="Wan2.1-I2V DiT")
    text_encoder = _load(WanTextEncoder, str(layout.text_encoder), spec.text_encoder, dtype, device,
                         what="umT5 text encoder")
    image_encoder = _load(lambda: make_image_encoder(spec), str(layout.image_encoder), {}, dtype, device,
                          WanImageEncoderStateDictConverter, what="CLIP image encoder")
    vae = _load(lambda: make_vae(spec), str(layout.vae), {}, dtype, device, WanVideoVAEStateDictConverter, what="Wan VAE")
    try:
        tokenizer = HuggingfaceTokenizer(name=str(layout.tokenizer_dir), seq_len=spec.text_len, clean="whitespace")
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"cannot load the tokenizer from {layout.tokenizer_dir}: {str(e).splitlines()[0][:200]}") from None
    with torch.device(device):
        encoder = make_condition_encoder(spec)
    components = Components(dit=dit, text_encoder=text_encoder, image_encoder=image_encoder, vae=vae,
                            condition_encoder=encoder.to(dtype).eval().requires_grad_(False), tokenizer=tokenizer,
                            arch=spec)
    return components, layout


def load_ex4d_pipeline(models_dir=None, *, device=None, memory_mode: str = "resident", dtype=None,
                       arch: str = "i2v-14b", vram_limit_gb: float | None = None, speed: str = "reference"):
    """Wan2.1-I2V-14B-480P + EX-4D adapter from a local folder (never downloads)."""
    from .adapter import read_state_dict
    from .memory import apply_memory_mode  # noqa: F401  (fail early if diffsynth is missing)
    from .pipeline import assemble_pipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    check_weights(models_dir)  # before any heavy import or read
    load_device = device if memory_mode == "resident" else "cpu"
    components, layout = load_components(models_dir, device=load_device, dtype=dtype, arch=arch)
    state = read_state_dict(layout.adapter)
    return assemble_pipeline(components, device=device, dtype=dtype, adapter_state=state,
                             adapter_path=str(layout.adapter), memory_mode=memory_mode, vram_limit_gb=vram_limit_gb,
                             speed=speed)


@torch.no_grad()
def random_adapter_state(components: Components, seed: int = 0, scale: float = 0.02) -> dict:
    """A release-layout adapter state dict with seeded random (non-zero) values for ``components``."""
    import copy

    from .adapter import add_lora, adapter_state_dict

    dit = add_lora(copy.deepcopy(components.dit))
    encoder = copy.deepcopy(components.condition_encoder)
    generator = torch.Generator("cpu").manual_seed(seed)
    for module in (dit, encoder):
        for name, p in module.named_parameters():
            if module is encoder or "lora_" in name:
                p.data = (torch.randn(p.shape, generator=generator) * scale).to(p.dtype)
    return adapter_state_dict(dit, encoder)


def build_tiny_pipeline(*, device="cpu", dtype=torch.float32, memory_mode: str = "resident", seed: int = 0,
                        adapter: bool = True, speed: str = "reference", vram_limit_gb: float | None = None):
    """The tiny pipeline: real classes, tiny seeded random weights, a seeded random adapter."""
    from .pipeline import assemble_pipeline

    components = build_random_components("tiny", seed=seed, device="cpu", dtype=torch.float32)
    state = random_adapter_state(components, seed=seed) if adapter else None
    return assemble_pipeline(components, device=device, dtype=dtype, adapter_state=state,
                             adapter_path="<tiny random adapter>", memory_mode=memory_mode, speed=speed,
                             vram_limit_gb=vram_limit_gb)
