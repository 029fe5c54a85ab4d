"""Generation: fill the guide video's holes into a finished shot (``draft`` | ``ex4d`` | ``tiny``).

Every generator has ``generate(color uint8 (T,H,W,3), mask bool (T,H,W), *, prompt=None, seed=0,
steps=None, cfg=None, progress=None, cancel=None) -> uint8 (T,H,W,3)``; ``progress(stage, step, total,
preview=None)``; ``cancel`` is a ``threading.Event`` checked before every denoising step.

Importing this package does not import torch; :func:`load_generator` does, for ``ex4d`` and ``tiny``.
"""

from __future__ import annotations

from ..errors import InputError
from .settings import (EX4D_PROMPT, GENERATOR_NAMES, MEMORY_MODES, RELEASE_CFG, RELEASE_FRAMES, RELEASE_HEIGHT,
                       RELEASE_SEED, RELEASE_STEPS, RELEASE_WIDTH, WAN_NEGATIVE_PROMPT)

__all__ = ["load_generator", "GENERATOR_NAMES", "MEMORY_MODES", "EX4D_PROMPT", "WAN_NEGATIVE_PROMPT"]


def load_generator(name: str, models_dir=None, device=None, memory_mode: str = "resident", dtype=None, **options):
    """Build a generator by name.

    * ``draft``: classical fill on the CPU (no weights).
    * ``ex4d``: Wan2.1-I2V-14B-480P + EX-4D adapter from ``models_dir`` (default $EX4D_MODELS or ./models);
      raises WeightsError naming every missing file. ``memory_mode``: resident | offload | fp8.
    * ``tiny``: the same pipeline classes with tiny seeded random weights (CPU, seconds) for tests.

    ``options`` go to the generator (``window``, ``overlap``) or, for ex4d, ``vram_limit_gb``.
    """
    if name not in GENERATOR_NAMES:
        raise InputError(f"unknown generator {name!r}: choose one of {', '.join(GENERATOR_NAMES)}")
    if memory_mode not in MEMORY_MODES:
        raise InputError(f"unknown memory mode {memory_mode!r}: choose one of {', '.join(MEMORY_MODES)}")
    if name == "draft":
        from .draft import DraftGenerator

        return DraftGenerator(**{k: v for k, v in options.items() if k in ("window", "inpaint_radius")})
    generator_options = {k: options.pop(k) for k in ("window", "overlap") if k in options}
    if name == "ex4d":
        from .weights import check_weights

        check_weights(models_dir)  # name every missing file before importing torch/diffsynth
        from .generator import Ex4dGenerator
        from .loading import load_ex4d_pipeline

        pipe = load_ex4d_pipeline(models_dir, device=device, memory_mode=memory_mode, dtype=dtype,
                                  vram_limit_gb=options.pop("vram_limit_gb", None))
        return Ex4dGenerator(pipe, name="ex4d", **generator_options)
    import torch

    from .generator import Ex4dGenerator
    from .loading import build_tiny_pipeline

    pipe = build_tiny_pipeline(device=device or "cpu", dtype=dtype or torch.float32, memory_mode=memory_mode,
                               seed=int(options.pop("seed", 0)))
    return Ex4dGenerator(pipe, name="tiny", **generator_options)
