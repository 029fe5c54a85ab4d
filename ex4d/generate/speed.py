"""Product speed settings: which of the measured levers (:mod:`ex4d.generate.accel`) a generator uses.

``speed="reference"`` is the release's configuration: bf16, LoRA as separate fp32 layers (resident), two
CFG passes, default attention, diffsynth's block forward, no compile.

``speed="fast"`` (the default) uses the levers measured in ``ex4d bench`` (docs/benchmarks.md) as far as
the memory mode, the device and this torch allow; each lever that cannot run falls back with a one-line
notice (levers skipped for the same reason share one line):

========== ===================================================================================================
resident   cuDNN attention, fused (real fp32) RoPE, FP8 matmuls in both FFN linears, regional
           torch.compile, both CFG branches in one batch-2 forward. LoRA merged into the weights.
stream     the same levers; FFN weights in FP8 also make each streamed block smaller (0.47 instead of
           0.82 GB), so more blocks stay resident.
fp8        the weights are stored in FP8 anyway: every token-wise block linear (self-attention q/k/v/o,
           cross-attention q/o, FFN) computes FP8 x FP8 (per-channel weight scale, per-token activation
           scale); the cross-attention k/v/k_img/v_img (text / image tokens) keep scaled FP8 weights,
           dequantised to bf16 (weight-only). Plus cuDNN attention, fused RoPE, compile and CFG batch.
           Measured 2.0x the reference per shot, final-video PSNR 40.4 dB vs the reference (44.4 dB for
           resident/stream fast) on random weights. ``reference`` keeps diffsynth's weight-only storage.
offload    cuDNN attention, fused RoPE and CFG batch only: diffsynth moves each layer's weights when it
           runs, which neither FP8 modules nor a compiled block can follow (use ``stream`` instead).
CPU        CFG batch only (the other levers are CUDA kernels).
========== ===================================================================================================

Nothing here imports torch at module import time beyond what :mod:`accel` needs when called.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..errors import InputError
from .settings import SPEEDS

FAST_LEVERS = ("cudnn_attention", "fused_rope", "fp8_ffn", "compile", "cfg_batch")

# Linears of a block that the "fp8" memory mode + fast keeps as scaled FP8 weights with bf16 matmuls.
FP8_WEIGHT_ONLY = ("cross_attn.k", "cross_attn.v", "cross_attn.k_img", "cross_attn.v_img")


@dataclass
class SpeedPlan:
    speed: str
    memory_mode: str
    levers: tuple = ()  # levers that will be applied
    skipped: dict = field(default_factory=dict)  # lever -> why not
    fp8_matmul: tuple = ()  # block linears to turn into accel.Fp8Linear (by the memory mode)
    fp8_weight_only: tuple = ()  # block linears to turn into accel.Fp8WeightOnlyLinear

    def as_dict(self) -> dict:
        return {"speed": self.speed, "levers": list(self.levers), "skipped": dict(self.skipped)}

    def notices(self) -> list[str]:
        """One line per distinct reason."""
        by_reason: dict[str, list[str]] = {}
        for lever, why in self.skipped.items():
            by_reason.setdefault(why, []).append(lever)
        return [f"speed fast: {', '.join(levers)} not used ({why})" for why, levers in by_reason.items()]


def check_speed(speed: str) -> str:
    if speed not in SPEEDS:
        raise InputError(f"unknown speed {speed!r}: choose one of {', '.join(SPEEDS)}")
    return speed


def plan_speed(speed: str, memory_mode: str, device) -> SpeedPlan:
    """Decide the levers for ``speed`` in ``memory_mode`` on ``device`` (probes the GPU; no model needed)."""
    import torch

    from . import accel

    check_speed(speed)
    plan = SpeedPlan(speed, memory_mode)
    if speed == "reference":
        return plan
    device = torch.device(device)
    fp8_lever = "fp8" if memory_mode == "fp8" else "fp8_ffn"
    wanted = ["cudnn_attention", "fused_rope", fp8_lever, "compile", "cfg_batch"]
    skipped: dict[str, str] = {}
    if device.type != "cuda":
        for lever in wanted[:-1]:
            skipped[lever] = f"running on {device.type}; CUDA levers"
    else:
        if memory_mode == "offload":
            why = "diffsynth's offload moves each layer at call time; --memory-mode stream keeps them"
            skipped[fp8_lever] = skipped["compile"] = why
        if "compile" not in skipped:
            ok, why = accel.compile_supported(device)
            if not ok:
                skipped["compile"] = why
        if fp8_lever not in skipped:
            ok, why = accel.fp8_supported(device)
            if not ok:
                skipped[fp8_lever] = why
            elif "compile" in skipped:  # eager per-token quantisation costs more than FP8 saves
                skipped[fp8_lever] = "FP8 activations need the compiled quantisation kernel (compile is off)"
        ok, why = accel.cudnn_attention_supported(device)
        if not ok:
            skipped["cudnn_attention"] = why
    plan.levers = tuple(lv for lv in wanted if lv not in skipped)
    plan.skipped = skipped
    if fp8_lever in plan.levers:
        plan.fp8_matmul = accel.FP8_LINEARS if fp8_lever == "fp8" else accel.FFN_LINEARS
        plan.fp8_weight_only = FP8_WEIGHT_ONLY if fp8_lever == "fp8" else ()
    return plan


def finish_speed(pipe, plan: SpeedPlan, notice=warnings.warn) -> None:
    """Apply the plan's block-forward levers and CFG batching to a pipeline whose memory mode is set (the
    FP8 conversion is the memory mode's job, since it decides where each block lives)."""
    from . import accel

    for line in plan.notices():
        notice(line)
    levers = set(plan.levers)
    attention = accel.sdpa_cudnn if "cudnn_attention" in levers else accel.sdpa_default
    if levers & {"cudnn_attention", "fused_rope", "compile"}:
        accel.patch_block_forwards(pipe.dit, attention=attention, compile_blocks="compile" in levers, notice=notice)
    pipe.batch_cfg = "cfg_batch" in levers
    pipe.speed = plan.speed
    pipe.speed_report = plan.as_dict()
