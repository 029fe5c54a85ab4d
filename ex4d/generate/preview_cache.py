"""Opt-in fast-preview step cache (the TeaCache idea, for Wan2.1-I2V-14B-480P + EX-4D).

At every denoising step the DiT's input changes mostly through the timestep. TeaCache (Liu et al.,
"Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", 2024) estimates how much the
output of the block stack will change from the relative L1 change of the timestep embedding, rescaled
by a polynomial fitted per model, and accumulates it over steps; while the sum stays under a threshold
the blocks are not run and the previous step's residual (block-stack output minus its input) is added
to this step's input instead. Whenever the blocks do run, the sum restarts at 0.

Here:

* probe ``"t"`` (default): the time embedding (``dit.time_embedding``, one vector per step), with the
  polynomial TeaCache published for Wan2.1-I2V-14B-480P in this mode; probe ``"t_mod"``: the six
  modulation vectors (``dit.time_projection``), with its published "ret-steps" polynomial. Numbers only:
  the coefficients are from TeaCache's Wan2.1 release; the code is ours. EX-4D's adapter does not touch
  the time embedding (its LoRA is in the blocks), so these probes see exactly the weights TeaCache fitted.
* probe ``"x_mod"``: the first block's timestep-modulated input (``norm1(x) * (1 + scale) + shift``, as
  TeaCache does for models without a Wan fit), not rescaled (raw relative L1). It follows the latents,
  so it behaves the same with any weights: the GPU bench on random weights uses it, because random
  time-embedding weights change ~80% per step (the "t" fit covers changes up to ~0.34).
* the first and the last step of every window are always computed; a negative polynomial value (the
  fitted curves dip below 0 for tiny changes) adds 0 instead of lowering the sum, and a change beyond the
  polynomial's rising range (its maximum on [0, 1], "t": 0.344) always computes.
* state (previous probe, sum, residual) is kept per CFG branch (``posi`` / ``nega``) or per batched
  pair (``cfg_pair``): both branches see the same timestep, so they skip the same steps.
* threshold 0 never skips (and gives bit-identical output: the residual is only stored).

The polynomial was fitted on the real weights; with other weights (random, or another fine-tune) the
same threshold skips a different number of steps. EX-4D's adapter changes the DiT a little; the numbers
are a starting point, which is why this is a preview mode (``--preview-cache 0.1`` .. ``0.3``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# np.poly1d order: highest power first.
TEACACHE_WAN21_I2V_480P = {
    "t": (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01),
    "t_mod": (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01),
}


PROBES = ("t", "t_mod", "x_mod")


def rescale(coefficients, x: float) -> float:
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


def rising_limit(coefficients) -> float | None:
    """Where the polynomial peaks on [0, 1] if that is inside (beyond it the fit no longer means "more
    change"); None when it keeps rising to 1."""
    grid = [i / 1000 for i in range(1001)]
    values = [rescale(coefficients, x) for x in grid]
    peak = max(range(len(grid)), key=values.__getitem__)
    return grid[peak] if peak < len(grid) - 1 else None


def first_block_modulated_input(dit, x: torch.Tensor, t_mod: torch.Tensor) -> torch.Tensor:
    """``norm1(x) * (1 + scale_msa) + shift_msa`` of the DiT's first block (diffsynth 2.1.12 layout)."""
    block = dit.blocks[0]
    mod = block.modulation.to(dtype=t_mod.dtype, device=t_mod.device) + t_mod
    shift, scale = mod.chunk(6, dim=1)[:2]
    return block.norm1(x) * (1 + scale) + shift


@dataclass
class _Branch:
    previous: torch.Tensor | None = None
    accumulated: float = 0.0
    residual: torch.Tensor | None = None


@dataclass
class PreviewCache:
    threshold: float
    metric: str = "t"
    coefficients: tuple | None = None
    forwards: int = 0  # DiT forwards asked for (a batched CFG pair counts 2)
    skipped_forwards: int = 0
    skipped_steps: list = field(default_factory=list)  # global step indices where every branch was skipped
    steps: int = 0
    changes: list = field(default_factory=list)  # relative L1 change of the probe per step (first branch seen)
    _branches: dict = field(default_factory=dict)
    _window_steps: int = 0
    _offset: int = 0
    _index: int = 0
    _skipped_here: dict = field(default_factory=dict)
    _limit: float | None = None

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"preview cache threshold must be a number >= 0, got {self.threshold!r}")
        if self.metric not in PROBES:
            raise ValueError(f"preview cache metric must be one of {', '.join(PROBES)}, got {self.metric!r}")
        if self.coefficients is None:
            self.coefficients = TEACACHE_WAN21_I2V_480P.get(self.metric, (1.0, 0.0))  # x_mod: raw
        self._limit = rising_limit(self.coefficients)

    def probe(self, dit, x: torch.Tensor, t: torch.Tensor, t_mod: torch.Tensor) -> torch.Tensor:
        """The tensor whose step-to-step change decides (see the module docstring)."""
        if self.metric == "t":
            return t
        if self.metric == "t_mod":
            return t_mod
        return first_block_modulated_input(dit, x, t_mod)

    # -- the denoising loop
    def start(self, steps: int, offset: int = 0) -> None:
        """A new window of ``steps`` steps: fresh state (the statistics keep adding up)."""
        self._flush()
        self._branches = {}
        self._window_steps, self._offset, self._index = int(steps), int(offset), 0
        self.steps += int(steps)

    def set_step(self, index: int) -> None:
        self._flush()
        self._index = int(index)

    def _flush(self) -> None:
        if self._skipped_here and all(self._skipped_here.values()):
            self.skipped_steps.append(self._offset + self._index)
        self._skipped_here = {}

    # -- the model function
    def should_skip(self, key: str, probe: torch.Tensor, x: torch.Tensor) -> bool:
        branch = self._branches.setdefault(key, _Branch())
        probe = probe.detach().float()
        first_or_last = self._index == 0 or self._index >= self._window_steps - 1
        skip = False
        if first_or_last or branch.previous is None or branch.residual is None or branch.residual.shape != x.shape:
            branch.accumulated = 0.0
        elif self.threshold > 0:
            change = float((probe - branch.previous).abs().mean() / branch.previous.abs().mean().clamp(min=1e-12))
            if key == next(iter(self._branches)):
                self.changes.append(round(change, 5))
            if self._limit is not None and change > self._limit:
                branch.accumulated = math.inf  # outside the fitted range: a large change, compute
            else:
                branch.accumulated += max(rescale(self.coefficients, change), 0.0)
            skip = branch.accumulated < self.threshold
            if not skip:
                branch.accumulated = 0.0
        branch.previous = probe
        batch = int(x.shape[0])
        self.forwards += batch
        if skip:
            self.skipped_forwards += batch
        self._skipped_here[key] = skip
        return skip

    def reuse(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return x + self._branches[key].residual

    def store(self, key: str, before: torch.Tensor, after: torch.Tensor) -> None:
        self._branches[key].residual = (after - before).detach()

    # -- reporting
    def stats(self) -> dict:
        self._flush()
        return {"threshold": self.threshold, "metric": self.metric, "forwards": self.forwards,
                "skipped_forwards": self.skipped_forwards, "steps": self.steps,
                "skipped_steps": list(self.skipped_steps), "probe_changes": list(self.changes)}

    def release(self) -> None:
        """Drop the stored tensors (the statistics stay)."""
        self._flush()
        self._branches = {}
