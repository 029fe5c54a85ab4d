"""Model configurations and random-weight builders for the Wan2.1-I2V parts.

Two architectures share every class and code path:

* ``i2v-14b``: the real Wan2.1-I2V-14B-480P shapes (DiT dim 5120, 40 layers, 40 heads, in_dim 36;
  umT5-XXL encoder; CLIP ViT-H/14; Wan VAE) and the adapter's CamVidEncoder(16, 1024, 5120).
* ``tiny``: the same diffsynth classes with tiny configs (seeded random init, CPU, seconds) for tests,
  the backend's ``--generator tiny`` and smoke runs. Its tokenizer is built offline (see
  :func:`tiny_tokenizer`); nothing is ever fetched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

DIT_I2V_14B = dict(has_image_input=True, patch_size=[1, 2, 2], in_dim=36, dim=5120, ffn_dim=13824, freq_dim=256,
                   text_dim=4096, out_dim=16, num_heads=40, num_layers=40, eps=1e-6)
# head_dim must be 128: diffsynth's 3-D RoPE splits it in thirds and needs (head_dim // 3) even.
DIT_TINY = dict(has_image_input=True, patch_size=[1, 2, 2], in_dim=36, dim=256, ffn_dim=512, freq_dim=256,
                text_dim=32, out_dim=16, num_heads=2, num_layers=2, eps=1e-6)
T5_TINY = dict(vocab=64, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=8, shared_pos=False, dropout=0.0)
# The DiT's image MLP takes 1280-wide CLIP features and its cross-attention takes exactly 257 image
# tokens (224 / 14 = 16, 16 x 16 + 1): the tiny CLIP keeps those two numbers and shrinks the rest.
CLIP_TINY = dict(embed_dim=64, image_size=224, patch_size=14, vision_dim=1280, vision_mlp_ratio=1, vision_heads=10,
                 vision_layers=2, vision_pool="token", activation="gelu", max_text_len=514)
VAE_TINY_DIM = 8  # with one residual block per level (Wan's has two)


@dataclass(frozen=True)
class Architecture:
    name: str
    dit: dict
    text_encoder: dict  # {} = WanTextEncoder's defaults (umT5-XXL)
    clip: dict | None  # None = WanImageEncoder() (ViT-H/14)
    vae_dim: int | None  # None = WanVideoVAE() (dim 96)
    encoder_hidden: int
    text_len: int
    extra: dict = field(default_factory=dict)


ARCHITECTURES = {
    "i2v-14b": Architecture("i2v-14b", DIT_I2V_14B, {}, None, None, encoder_hidden=1024, text_len=512),
    "tiny": Architecture("tiny", DIT_TINY, T5_TINY, CLIP_TINY, VAE_TINY_DIM, encoder_hidden=32, text_len=32),
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_dit(arch: Architecture, **_ignored) -> nn.Module:
    from diffsynth.models.wan_video_dit import WanModel

    return WanModel(**arch.dit)


def make_text_encoder(arch: Architecture) -> nn.Module:
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    return WanTextEncoder(**arch.text_encoder)


def make_image_encoder(arch: Architecture) -> nn.Module:
    """A WanImageEncoder built on the current default device/dtype (its own __init__ always builds the
    full ViT-H/14 in fp32 on the CPU); tiny configs come from its configurable parts."""
    from diffsynth.models.wan_video_image_encoder import (WanImageEncoder, XLMRobertaCLIP, _clip,
                                                          clip_xlm_roberta_vit_h_14)

    encoder = WanImageEncoder.__new__(WanImageEncoder)
    nn.Module.__init__(encoder)
    device = torch.empty(0).device  # honour an enclosing torch.device(...) context
    common = dict(pretrained=False, return_transforms=True, return_tokenizer=False, dtype=torch.get_default_dtype(),
                  device=device)
    if arch.clip is None:
        encoder.model, encoder.transforms = clip_xlm_roberta_vit_h_14(**common)
    else:
        encoder.model, encoder.transforms = _clip(pretrained_name="open-clip-xlm-roberta-large-vit-huge-14",
                                                  model_cls=XLMRobertaCLIP, **common, **arch.clip)
    return encoder


def make_vae(arch: Architecture) -> nn.Module:
    """WanVideoVAE; for tiny configs the wrapper keeps Wan's latent statistics around a narrow VideoVAE_."""
    from diffsynth.core.vram.initialization import skip_model_initialization
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

    if arch.vae_dim is None:
        return WanVideoVAE(z_dim=16)
    with skip_model_initialization():  # the full-width network is replaced right away: don't initialise it
        vae = WanVideoVAE(z_dim=16)
    vae.model = VideoVAE_(dim=arch.vae_dim, z_dim=16, num_res_blocks=1).eval().requires_grad_(False)
    return vae


def make_condition_encoder(arch: Architecture) -> nn.Module:
    from .adapter import VideoConditionEncoder

    return VideoConditionEncoder(16, arch.encoder_hidden, arch.dit["dim"], tuple(arch.dit["patch_size"]))


@dataclass
class Components:
    """The parts of one pipeline (before the adapter's LoRA and memory mode are applied)."""

    dit: nn.Module
    text_encoder: nn.Module
    image_encoder: nn.Module
    vae: nn.Module
    condition_encoder: nn.Module
    tokenizer: object
    arch: Architecture


def build_random_components(arch: str | Architecture = "tiny", seed: int = 0, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32, tokenizer=None) -> Components:
    """Every part with seeded random weights, initialised directly on ``device`` in ``dtype``.

    For the full-size architecture on a GPU this is the fast path (no fp32 copy on the host). The
    condition encoder keeps its zero-initialised output layer.
    """
    arch = ARCHITECTURES[arch] if isinstance(arch, str) else arch
    parts = {}
    makers = (("dit", make_dit), ("text_encoder", make_text_encoder), ("image_encoder", make_image_encoder),
              ("vae", make_vae), ("condition_encoder", make_condition_encoder))
    with torch.random.fork_rng(devices=[]):
        for index, (name, make) in enumerate(makers):
            torch.manual_seed(seed * 1000 + index)
            with torch.device(device), default_dtype(dtype), torch.no_grad():
                module = make(arch)
            parts[name] = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if tokenizer is None:
        tokenizer = tiny_tokenizer(seq_len=arch.text_len)
    return Components(tokenizer=tokenizer, arch=arch, **parts)


# --------------------------------------------------------------------------------------------------
# Offline tokenizer for the tiny text encoder
# --------------------------------------------------------------------------------------------------

_TOKENIZER_VERSION = "v1"
_TOKENIZER_TEXT = (
    "4K ultra HD, surround motion, realistic tone, panoramic shot, wide-angle view, cinematic quality",
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images",
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, deformed",
    "a flower in the wind, a street at night, a person walking, a camera moving around a garden",
)


def cache_dir() -> Path:
    return Path(os.environ.get("EX4D_CACHE_DIR") or Path.home() / ".cache" / "ex4d")


def build_tiny_tokenizer_files(folder: Path, vocab_size: int = 64) -> None:
    """Train a tiny Unigram tokenizer (the umT5 model type) from fixed sentences; deterministic, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(list(_TOKENIZER_TEXT), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
              "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_tokenizer_dir() -> Path:
    """The cached tiny tokenizer folder, built at first use (atomic: temp folder + os.replace)."""
    target = cache_dir() / f"tiny-tokenizer-{_TOKENIZER_VERSION}"
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-tokenizer-", dir=target.parent))
    build_tiny_tokenizer_files(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; use theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_tokenizer(seq_len: int = 32):
    from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer

    return HuggingfaceTokenizer(name=str(tiny_tokenizer_dir()), seq_len=seq_len, clean="whitespace")
