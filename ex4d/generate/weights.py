"""Where the published weights live on disk, and a check that names every missing file.

Layout (the releases'):

    DIR/Wan-AI/Wan2.1-I2V-14B-480P/diffusion_pytorch_model-0000{1..7}-of-00007.safetensors
    DIR/Wan-AI/Wan2.1-I2V-14B-480P/models_t5_umt5-xxl-enc-bf16.pth
    DIR/Wan-AI/Wan2.1-I2V-14B-480P/Wan2.1_VAE.pth
    DIR/Wan-AI/Wan2.1-I2V-14B-480P/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
    DIR/Wan-AI/Wan2.1-I2V-14B-480P/google/umt5-xxl/          (tokenizer files)
    DIR/EX-4D/ex4d.ckpt                                       (or ex4d.safetensors)

The EX-4D release README downloads Wan straight into ``DIR/Wan-AI`` (no model sub-folder); that
layout is accepted too. No torch import here: checks run before anything heavy loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsError

WAN_REPO = "Wan-AI/Wan2.1-I2V-14B-480P"
EX4D_REPO = "yihouxiang/EX-4D"  # from the EX-4D release README ("huggingface-cli download yihouxiang/EX-4D")
DIT_SHARDS = tuple(f"diffusion_pytorch_model-{i:05d}-of-00007.safetensors" for i in range(1, 8))
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
TOKENIZER_DIR = "google/umt5-xxl"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # either one makes the folder usable
ADAPTER_NAMES = ("ex4d.ckpt", "ex4d.safetensors")
MODELS_ENV = "EX4D_MODELS"


@dataclass(frozen=True)
class WeightsLayout:
    """Resolved paths of every file the ex4d generator loads."""

    root: Path
    wan_dir: Path
    dit_shards: tuple[Path, ...]
    text_encoder: Path
    vae: Path
    image_encoder: Path
    tokenizer_dir: Path
    adapter: Path


def resolve_models_dir(models_dir: str | os.PathLike | None) -> Path:
    """``models_dir``, else $EX4D_MODELS, else ./models (the release's default)."""
    if models_dir is None:
        models_dir = os.environ.get(MODELS_ENV) or "models"
    return Path(models_dir).expanduser()


def download_commands(root: Path) -> list[str]:
    return [
        f"huggingface-cli download {WAN_REPO} --local-dir {root / WAN_REPO}",
        f"huggingface-cli download {EX4D_REPO} --local-dir {root / 'EX-4D'}",
    ]


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _wan_dir(root: Path) -> Path:
    preferred = root / WAN_REPO
    flat = root / "Wan-AI"  # the EX-4D README's --local-dir ./models/Wan-AI
    if not (preferred / DIT_SHARDS[0]).is_file() and (flat / DIT_SHARDS[0]).is_file():
        return flat
    return preferred


def check_weights(models_dir: str | os.PathLike | None = None) -> WeightsLayout:
    """Return the layout, or raise WeightsError naming EVERY missing file and how to get them."""
    root = resolve_models_dir(models_dir)
    wan = _wan_dir(root)
    missing: list[str] = []
    shards = tuple(wan / name for name in DIT_SHARDS)
    for path in (*shards, wan / T5_FILE, wan / VAE_FILE, wan / CLIP_FILE):
        if not path.is_file():
            missing.append(str(path))
    tokenizer = wan / TOKENIZER_DIR
    if not _has_tokenizer(tokenizer):
        missing.append(f"{tokenizer}/ (tokenizer.json or spiece.model)")
    adapters = [root / "EX-4D" / name for name in ADAPTER_NAMES]
    adapter = next((p for p in adapters if p.is_file()), None)
    if adapter is None:
        missing.append(str(adapters[0]))
    if missing:
        raise WeightsError(
            f"missing {len(missing)} weight file(s) under {root}: "
            + ", ".join(missing)
            + ". On a machine with internet run: "
            + " && ".join(download_commands(root))
            + f" (then copy {root} here, or pass --models DIR / set ${MODELS_ENV})"
        )
    return WeightsLayout(
        root=root,
        wan_dir=wan,
        dit_shards=shards,
        text_encoder=wan / T5_FILE,
        vae=wan / VAE_FILE,
        image_encoder=wan / CLIP_FILE,
        tokenizer_dir=tokenizer,
        adapter=adapter,  # type: ignore[arg-type]
    )
