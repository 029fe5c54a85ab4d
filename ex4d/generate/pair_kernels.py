"""Triton kernels that quantise a batched CFG pair in the pass that produces it.

The FP8 linears of :mod:`.pair_block` read their input as e4m3 rows (posi - nega, nega) with one scale per
row (token). Those rows come from a LayerNorm (+ modulation) or from the FFN's GELU; written as torch code,
inductor splits each into several passes over the 13,312 x 5,120 (or x 13,824) activations: the norm's
statistics, the per-row absolute maximum of the difference, then the quantisation, re-reading the data
each time. Here one program owns one token of both branches, keeps its whole rows in registers, and reads
the input once and writes the e4m3 rows once:

``ln_pair_quant``    x0, x1 (S, D) -> LayerNorm(x_b) * w_b + b_b for both branches (w, b: (2, D); the
                     modulation (1 + scale, shift) or the norm's own affine) -> e4m3 rows + scales.
``gelu_pair_quant``  the FFN's first GEMM output in the pair coding (delta; base) (2S, F) plus its bias ->
                     GELU(tanh) of both branches -> e4m3 rows + scales.

Both return (rows (2S, K) float8_e4m3fn, scales (2S, 1) float32) in the layout ``torch._scaled_mm`` takes,
the same maths as :func:`.pair_block.quantize_pair` on the torch expressions (in fp32 throughout).
They run where Triton runs a GPU (or under ``TRITON_INTERPRET=1``, which the CPU tests use); elsewhere
:func:`available` is False and the block keeps the torch expressions.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. a CPU-only torch on macOS): the torch expressions are used
    triton = None

FP8_MAX = 448.0


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``'s device."""
    if triton is None:
        return False
    if x.is_cuda:
        return True
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _store_pair_rows(d, n, q_ptr, s_ptr, row_d, row_n, offs, mask, K):
        """Quantise the difference row ``d`` and the nega row ``n`` (fp32, zero outside ``mask``)."""
        sd = tl.maximum(tl.max(tl.abs(d), axis=0), 1e-12) / 448.0
        sn = tl.maximum(tl.max(tl.abs(n), axis=0), 1e-12) / 448.0
        tl.store(q_ptr + row_d * K + offs, tl.clamp(d / sd, -448.0, 448.0).to(tl.float8e4nv), mask=mask)
        tl.store(q_ptr + row_n * K + offs, tl.clamp(n / sn, -448.0, 448.0).to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row_d, sd)
        tl.store(s_ptr + row_n, sn)

    @triton.jit
    def _ln_pair_quant_kernel(x0_ptr, x1_ptr, w_ptr, b_ptr, q_ptr, s_ptr, S, D, eps, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        x0 = tl.load(x0_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x1_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32)
        c0 = tl.where(mask, x0 - tl.sum(x0, axis=0) / D, 0.0)
        c1 = tl.where(mask, x1 - tl.sum(x1, axis=0) / D, 0.0)
        r0 = 1.0 / tl.sqrt(tl.sum(c0 * c0, axis=0) / D + eps)
        r1 = 1.0 / tl.sqrt(tl.sum(c1 * c1, axis=0) / D + eps)
        h0 = c0 * r0 * tl.load(w_ptr + offs, mask=mask, other=0.0) + tl.load(b_ptr + offs, mask=mask, other=0.0)
        h1 = c1 * r1 * tl.load(w_ptr + D + offs, mask=mask, other=0.0) + tl.load(b_ptr + D + offs, mask=mask, other=0.0)
        _store_pair_rows(tl.where(mask, h0 - h1, 0.0), tl.where(mask, h1, 0.0), q_ptr, s_ptr, t, S + t, offs, mask, D)

    @triton.jit
    def _gelu_tanh(x):
        # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): torch's GELU(approximate="tanh")
        return x * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))

    @triton.jit
    def _gelu_pair_quant_kernel(y_ptr, bias_ptr, q_ptr, s_ptr, S, F, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < F
        delta = tl.load(y_ptr + t * F + offs, mask=mask, other=0.0).to(tl.float32)
        base = tl.load(y_ptr + (S + t) * F + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            base = base + tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_nega = _gelu_tanh(base)
        g_posi = _gelu_tanh(base + delta)
        _store_pair_rows(tl.where(mask, g_posi - g_nega, 0.0), tl.where(mask, g_nega, 0.0), q_ptr, s_ptr, t, S + t,
                         offs, mask, F)


    @triton.jit
    def _rms_rope_pair_kernel(y_ptr, bias_ptr, w_ptr, cos_ptr, sin_ptr, scale_ptr, out_ptr, S, D, HALF_HEAD, eps,
                              HAS_BIAS: tl.constexpr, OUT_FP8: tl.constexpr, HALF_BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, HALF_BLOCK)  # (re, im) pair j = elements 2j, 2j+1 of the token's row
        mask = j < D // 2
        ev, od = 2 * j, 2 * j + 1
        d_e = tl.load(y_ptr + t * D + ev, mask=mask, other=0.0).to(tl.float32)
        d_o = tl.load(y_ptr + t * D + od, mask=mask, other=0.0).to(tl.float32)
        n_e = tl.load(y_ptr + (S + t) * D + ev, mask=mask, other=0.0).to(tl.float32)
        n_o = tl.load(y_ptr + (S + t) * D + od, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            n_e = n_e + tl.load(bias_ptr + ev, mask=mask, other=0.0).to(tl.float32)
            n_o = n_o + tl.load(bias_ptr + od, mask=mask, other=0.0).to(tl.float32)
        p_e, p_o = n_e + d_e, n_o + d_o
        w_e = tl.load(w_ptr + ev, mask=mask, other=0.0).to(tl.float32)
        w_o = tl.load(w_ptr + od, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + t * HALF_HEAD + j % HALF_HEAD, mask=mask, other=0.0)
        sn = tl.load(sin_ptr + t * HALF_HEAD + j % HALF_HEAD, mask=mask, other=0.0)
        if OUT_FP8:
            inv_scale = 1.0 / tl.load(scale_ptr)
        for branch in tl.static_range(2):
            if branch == 0:
                x_e, x_o = p_e, p_o
            else:
                x_e, x_o = n_e, n_o
            r = 1.0 / tl.sqrt((tl.sum(x_e * x_e, axis=0) + tl.sum(x_o * x_o, axis=0)) / D + eps)
            x_e, x_o = x_e * r * w_e, x_o * r * w_o
            o_e, o_o = x_e * c - x_o * sn, x_e * sn + x_o * c
            row = out_ptr + (branch * S + t) * D
            if OUT_FP8:
                tl.store(row + ev, tl.clamp(o_e * inv_scale, -448.0, 448.0).to(tl.float8e4nv), mask=mask)
                tl.store(row + od, tl.clamp(o_o * inv_scale, -448.0, 448.0).to(tl.float8e4nv), mask=mask)
            else:
                tl.store(row + ev, o_e.to(tl.bfloat16), mask=mask)
                tl.store(row + od, o_o.to(tl.bfloat16), mask=mask)


def _warps(block: int) -> int:
    # one program per token holds its rows in registers; timing 4-32 warps per shape changed nothing measurable
    return 16 if block >= 16384 else (8 if block >= 4096 else 4)


def _outputs(s: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((2 * s, k), device=device, dtype=torch.float8_e4m3fn),
            torch.empty((2 * s, 1), device=device, dtype=torch.float32))


def launch_ln_pair_quant(x0, x1, w, b, eps: float):
    """The LayerNorm kernel on (S, D) x0/x1 (contiguous) with per-branch (2, D) fp32 w and b."""
    s, d = x0.shape
    q, scales = _outputs(s, d, x0.device)
    block = triton.next_power_of_2(d)
    _ln_pair_quant_kernel[(s,)](x0, x1, w, b, q, scales, s, d, eps, BLOCK=block, num_warps=_warps(block))
    return q, scales


def launch_gelu_pair_quant(y, bias):
    """The GELU kernel on the pair-coded GEMM output y (2S, F) (contiguous) and an optional (F,) bias."""
    rows, f = y.shape
    s = rows // 2
    q, scales = _outputs(s, f, y.device)
    block = triton.next_power_of_2(f)
    _gelu_pair_quant_kernel[(s,)](y, bias if bias is not None else y, q, scales, s, f, HAS_BIAS=bias is not None,
                                  BLOCK=block, num_warps=_warps(block))
    return q, scales


def launch_rms_rope_pair(y, bias, weight, cos, sin, eps: float, scale):
    """RMSNorm (weight) + RoPE of both branches of a pair-coded GEMM output y (2S, D) plus bias -> (2, S, D):
    bf16, or e4m3 divided by ``scale`` ((1,) fp32) when one is given. cos/sin: (S, D_head/2) fp32 contiguous."""
    rows, d = y.shape
    s = rows // 2
    out = torch.empty((2, s, d), device=y.device, dtype=torch.float8_e4m3fn if scale is not None else torch.bfloat16)
    half_block = triton.next_power_of_2(d // 2)
    _rms_rope_pair_kernel[(s,)](y, bias if bias is not None else y, weight, cos, sin,
                                scale if scale is not None else cos, out, s, d, cos.shape[-1], eps,
                                HAS_BIAS=bias is not None, OUT_FP8=scale is not None, HALF_BLOCK=half_block,
                                num_warps=_warps(2 * half_block))
    return out


# ---------------------------------------------------------------------------------- the ops torch.compile sees
# Opaque custom ops (not triton_op): inductor calls them as they are, launching the Triton JIT kernels above,
# instead of re-emitting their source into its own generated code (which failed to build on torch 2.11).


@torch.library.custom_op("ex4d::ln_pair_quant", mutates_args=())
def ln_pair_quant(x0: torch.Tensor, x1: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_ln_pair_quant(x0, x1, w, b, eps)


@ln_pair_quant.register_fake
def _(x0, x1, w, b, eps):
    return _outputs(*x0.shape, x0.device)


@torch.library.custom_op("ex4d::gelu_pair_quant", mutates_args=())
def gelu_pair_quant(y: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_gelu_pair_quant(y, bias)


@gelu_pair_quant.register_fake
def _(y, bias):
    return _outputs(y.shape[0] // 2, y.shape[1], y.device)


@torch.library.custom_op("ex4d::rms_rope_pair", mutates_args=())
def rms_rope_pair(y: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, eps: float, scale: torch.Tensor | None) -> torch.Tensor:
    return launch_rms_rope_pair(y, bias, weight, cos, sin, eps, scale)


@rms_rope_pair.register_fake
def _(y, bias, weight, cos, sin, eps, scale):
    return y.new_empty((2, y.shape[0] // 2, y.shape[1]), dtype=torch.float8_e4m3fn if scale is not None else torch.bfloat16)
