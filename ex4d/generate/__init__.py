"""Generation: fill the guide video's holes into a finished shot (``draft`` | ``ex4d`` | ``tiny``).

Every generator has ``generate(color uint8 (T,H,W,3), mask bool (T,H,W), *, prompt=None, seed=0,
steps=None, cfg=None, progress=None, cancel=None) -> uint8 (T,H,W,3)``; ``progress(stage, step, total,
preview=None)``; ``cancel`` is a ``threading.Event`` checked before every denoising step.

Importing this package does not import torch; :func:`load_generator` does, for ``ex4d`` and ``tiny``.
"""

from __future__ import annotations

from ..errors import InputError
from .settings import (DEFAULT_SPEED, EX4D_PROMPT, GENERATOR_NAMES, MEMORY_MODES, RELEASE_CFG, RELEASE_FRAMES,
                       RELEASE_HEIGHT, RELEASE_SEED, RELEASE_STEPS, RELEASE_WIDTH, SPEEDS, WAN_NEGATIVE_PROMPT)

__all__ = ["load_generator", "GENERATOR_NAMES", "MEMORY_MODES", "SPEEDS", "EX4D_PROMPT", "WAN_NEGATIVE_PROMPT"]


def load_generator(name: str, models_dir=None, device=None, memory_mode: str = "resident", dtype=None,
                   speed: str = DEFAULT_SPEED, vram_limit_gb: float | None = None, preview_cache: float = 0.0,
                   **options):
    """Build a generator by name.

    * ``draft``: classical fill on the CPU (no weights).
    * ``ex4d``: Wan2.1-I2V-14B-480P + EX-4D adapter from ``models_dir`` (default $EX4D_MODELS or ./models);
      raises WeightsError naming every missing file. ``memory_mode``: resident | offload | fp8 | stream.
    * ``tiny``: the same pipeline classes with tiny seeded random weights (CPU, seconds) for tests.

    ``speed``: ``fast`` (default: the measured speed levers that this device, torch and memory mode allow;
    see :mod:`ex4d.generate.speed`) or ``reference`` (the release's configuration).
    ``vram_limit_gb``: GPU budget of ``stream`` (default: the card less 1 GiB) or diffsynth's limit in
    ``offload``. ``preview_cache``: default step-cache threshold of every ``generate`` (0 = off; see
    :mod:`ex4d.generate.preview_cache`). Other ``options`` go to the generator (``window``, ``overlap``,
    ``preview_metric``).
    ``speed``, ``vram_limit_gb`` and ``preview_cache`` are ignored by ``draft``.
    """
    if name not in GENERATOR_NAMES:
        raise InputError(f"unknown generator {name!r}: choose one of {', '.join(GENERATOR_NAMES)}")
    if memory_mode not in MEMORY_MODES:
        raise InputError(f"unknown memory mode {memory_mode!r}: choose one of {', '.join(MEMORY_MODES)}")
    from .speed import check_speed

    check_speed(speed)
    if vram_limit_gb is not None:
        from .generator import non_negative_number

        vram_limit_gb = non_negative_number(vram_limit_gb, "--vram-limit must be a number of GB >= 0")
        if memory_mode not in ("stream", "offload") and name != "draft":
            raise InputError(f"--vram-limit applies to --memory-mode stream (or offload), not {memory_mode}")
    if name == "draft":
        from .draft import DraftGenerator

        return DraftGenerator(**{k: v for k, v in options.items() if k in ("window", "inpaint_radius")})
    from .generator import check_preview_cache

    generator_options = {k: options.pop(k) for k in ("window", "overlap", "preview_metric") if k in options}
    generator_options["preview_cache"] = check_preview_cache(preview_cache)
    if name == "ex4d":
        from .weights import check_weights

        check_weights(models_dir)  # name every missing file before importing torch/diffsynth
        from .generator import Ex4dGenerator
        from .loading import load_ex4d_pipeline

        pipe = load_ex4d_pipeline(models_dir, device=device, memory_mode=memory_mode, dtype=dtype,
                                  vram_limit_gb=vram_limit_gb, speed=speed)
        return Ex4dGenerator(pipe, name="ex4d", **generator_options)
    import torch

    from .generator import Ex4dGenerator
    from .loading import build_tiny_pipeline

    pipe = build_tiny_pipeline(device=device or "cpu", dtype=dtype or torch.float32, memory_mode=memory_mode,
                               seed=int(options.pop("seed", 0)), speed=speed, vram_limit_gb=vram_limit_gb)
    return Ex4dGenerator(pipe, name="tiny", **generator_options)
