"""Product speed settings: which of the measured levers (:mod:`ex4d.generate.accel`) a generator uses.

``speed="reference"`` is the release's configuration: bf16, LoRA as separate fp32 layers (resident), two
CFG passes, default attention, diffsynth's block forward, no compile.

``speed="fast"`` (the default) uses the levers measured in ``ex4d bench`` (docs/benchmarks.md) as far as
the memory mode, the device and this torch allow; each lever that cannot run falls back with a one-line
notice (levers skipped for the same reason share one line):

========== ===================================================================================================
resident   cuDNN attention, fused (real fp32) RoPE, FP8 matmuls in every token-wise block linear
           (self-attention q/k/v/o, cross-attention q/o, FFN: per-channel weight scale, per-token
           activation scale, the CFG pair coded as nega + delta, see accel.Fp8Linear) with fast FP8
           accumulation where the sums are short (k <= 8192: q/k/v/o, cross q/o), regional
           torch.compile, both CFG branches in one batch-2 forward, the VAE on channels-last 3-D
           convolutions (vae_speed), the cross-attention keys/values of the text and image tokens computed
           once per shot (accel.ContextKV, ~1.3 GB). LoRA merged into the weights.
stream     the same levers, except that the keys/values are recomputed each step (their memory goes to
           resident blocks); FP8 weights also make each streamed block smaller, so more blocks stay
           resident.
fp8        the same FP8 matmuls (the keys/values recomputed each step, as in stream); in addition the cross-attention k/v/k_img/v_img (text / image tokens)
           keep scaled FP8 weights, dequantised to bf16 (weight-only), so every DiT weight is stored in
           FP8. ``reference`` keeps diffsynth's weight-only storage.
fastest    ``fast`` plus the video tokens' self-attention in FP8 through cuDNN's fused FP8 kernel
           (accel lever ``fp8_attention``; needs the optional ``nvidia-cudnn-frontend`` wheel): about 10 %
           less per step, within the drift bar on random weights, but the attention kernel alone is
           ~15x further from fp32 than bf16 for sharp attention (docs/benchmarks.md): try it on a shot
           before using it for finals.
offload    cuDNN attention, fused RoPE and CFG batch only: diffsynth moves each layer's weights when it
           runs, which neither FP8 modules, a compiled block nor the VAE lever can follow (use
           ``stream`` instead).
CPU        CFG batch only (the other levers are CUDA kernels).
========== ===================================================================================================

Nothing here imports torch at module import time beyond what :mod:`accel` needs when called.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..errors import InputError
from .settings import SPEEDS

FAST_LEVERS = ("cudnn_attention", "fused_rope", "fp8", "fast_accum", "compile", "cfg_batch", "vae_channels_last",
               "context_kv_cache")

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
    wanted = list(FAST_LEVERS)
    if speed == "fastest":
        wanted.insert(wanted.index("fp8") + 1, "fp8_attention")
    skipped: dict[str, str] = {}
    if device.type != "cuda":
        for lever in wanted:
            if lever != "cfg_batch":
                skipped[lever] = f"running on {device.type}; CUDA levers"
    else:
        if memory_mode == "offload":
            why = "diffsynth's offload moves each layer at call time; --memory-mode stream keeps them"
            skipped["fp8"] = skipped["compile"] = why
        if "compile" not in skipped:
            ok, why = accel.compile_supported(device)
            if not ok:
                skipped["compile"] = why
        if "fp8" not in skipped:
            ok, why = accel.fp8_supported(device)
            if not ok:
                skipped["fp8"] = why
            elif "compile" in skipped:  # eager per-token quantisation costs more than FP8 saves
                skipped["fp8"] = "FP8 activations need the compiled quantisation kernel (compile is off)"
        if "fp8" in skipped:
            skipped["fast_accum"] = "fast accumulation is the FP8 matmuls' (fp8 not used)"
        from .vae_speed import vae_channels_last_supported

        ok, why = vae_channels_last_supported(device, memory_mode)
        if not ok:
            skipped["vae_channels_last"] = why
        if memory_mode != "resident":  # the memory modes for smaller cards keep the memory for the model
            skipped["context_kv_cache"] = f"memory mode {memory_mode} keeps the ~1.3 GB for the model"
        ok, why = accel.cudnn_attention_supported(device)
        if not ok:
            skipped["cudnn_attention"] = why
        if "fp8_attention" in wanted:
            from .fp8_attention import fp8_attention_supported

            ok, why = fp8_attention_supported(device)
            if not ok:
                skipped["fp8_attention"] = why
    plan.levers = tuple(lv for lv in wanted if lv not in skipped)
    plan.skipped = skipped
    if "fp8" in plan.levers:
        plan.fp8_matmul = accel.FP8_LINEARS
        plan.fp8_weight_only = FP8_WEIGHT_ONLY if memory_mode == "fp8" else ()
    return plan


def finish_speed(pipe, plan: SpeedPlan, notice=warnings.warn) -> None:
    """Apply the plan's block-forward levers and CFG batching to a pipeline whose memory mode is set (the
    FP8 conversion is the memory mode's job, since it decides where each block lives)."""
    from . import accel

    for line in plan.notices():
        notice(line)
    levers = set(plan.levers)
    attention = accel.sdpa_cudnn if "cudnn_attention" in levers else accel.sdpa_default
    self_attention = None
    if "fp8_attention" in levers:
        from .fp8_attention import sdpa_fp8 as self_attention
    if levers & {"cudnn_attention", "fused_rope", "compile", "fp8_attention"}:
        accel.patch_block_forwards(pipe.dit, attention=attention, compile_blocks="compile" in levers, notice=notice,
                                   self_attention=self_attention)
    pipe.batch_cfg = "cfg_batch" in levers
    if "fast_accum" in levers:
        accel.set_fast_accum(pipe.dit)
    if "vae_channels_last" in levers:
        accel.install_vae_channels_last(pipe)
    pipe.context_kv_cache = "context_kv_cache" in levers
    pipe.speed = plan.speed
    pipe.speed_report = plan.as_dict()
