"""Triton kernels that quantise a batched CFG pair in the pass that produces it.

The FP8 linears of :mod:`.pair_block` read their input as e4m3 rows (posi - nega, nega) with one scale per
row (token). Those rows come from a LayerNorm (+ modulation) or from the FFN's GELU; written as torch code,
inductor splits each into several passes over the 13,312 x 5,120 (or x 13,824) activations: the norm's
statistics, the per-row absolute maximum of the difference, then the quantisation, re-reading the data
each time. Here one program owns one token of both branches and walks its rows (statistics, maxima, then
the e4m3 rows): memory is read for the first walk and the e4m3 rows are written once:

``ln_pair_quant``    x0, x1 (S, D) -> LayerNorm(x_b) * w_b + b_b for both branches (w, b: (2, D); the
                     modulation (1 + scale, shift) or the norm's own affine) -> e4m3 rows + scales.
``pair_quant``       the same for a pair as it is (the attention outputs before their o projection).
``gelu_pair_quant``  the FFN's first GEMM output in the pair coding (delta; base) (2S, F) plus its bias ->
                     GELU(tanh) of both branches -> e4m3 rows + scales.
``rms_rope_pair``    q's or k's GEMM output in the pair coding plus its bias -> RMSNorm + RoPE of both
                     branches -> (2, S, D) bf16, or e4m3 on a given (static) scale.

The quantising ones return (rows (2S, K) float8_e4m3fn, scales (2S, 1) float32) in the layout ``torch._scaled_mm`` takes,
the same maths as :func:`.accel.quantize_pair` on the torch expressions (in fp32 throughout).
They run where Triton runs a GPU (or under ``TRITON_INTERPRET=1``, which the CPU tests use); elsewhere
:func:`available` is False and the block keeps the torch expressions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    # Each program owns one token of both branches and walks its rows in CHUNK-wide pieces, two or three
    # times: the statistics, the per-row absolute maxima, then the e4m3 rows. Only the first walk reads
    # memory (the token's rows, 20-55 KB, are still in L2 for the others), and small chunks keep registers
    # low, so many programs share an SM and the loads of one overlap the arithmetic of another.

    @triton.jit
    def _scale(amax):
        return tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0

    @triton.jit
    def _e4m3(x, scale):
        return tl.clamp(x / scale, -448.0, 448.0).to(tl.float8e4nv)

    @triton.jit
    def _pair_amax(amax_d, amax_n, posi, nega, mask):
        """Running |posi - nega| and |nega| maxima of a pair (the first of the two walks over a row)."""
        return (tl.maximum(amax_d, tl.where(mask, tl.abs(posi - nega), 0.0)),
                tl.maximum(amax_n, tl.where(mask, tl.abs(nega), 0.0)))

    @triton.jit
    def _store_pair(q_ptr, t, S, N, offs, mask, posi, nega, sd, sn):
        """The pair coding of token t: delta (posi - nega) in row t, nega in row S + t, as e4m3."""
        tl.store(q_ptr + t * N + offs, _e4m3(posi - nega, sd), mask=mask)
        tl.store(q_ptr + (S + t) * N + offs, _e4m3(nega, sn), mask=mask)

    @triton.jit
    def _ln_pair(x0_ptr, x1_ptr, w_ptr, b_ptr, t, offs, mask, D, mean0, r0, mean1, r1, NORM: tl.constexpr):
        """Both branches' values at ``offs``: LayerNorm * w + b when NORM, else the inputs as they are."""
        x0 = tl.load(x0_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x1_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            x0 = (x0 - mean0) * r0 * tl.load(w_ptr + offs, mask=mask, other=0.0) + tl.load(b_ptr + offs, mask=mask, other=0.0)
            x1 = (x1 - mean1) * r1 * tl.load(w_ptr + D + offs, mask=mask, other=0.0) + tl.load(b_ptr + D + offs, mask=mask, other=0.0)
        return x0, x1

    @triton.jit
    def _ln_pair_quant_kernel(x0_ptr, x1_ptr, w_ptr, b_ptr, q_ptr, s_ptr, S, D, eps, NORM: tl.constexpr,
                              CHUNK: tl.constexpr):
        for t in range(tl.program_id(0).to(tl.int64), S, tl.num_programs(0)):  # grid-stride: see Launch
            _ln_pair_quant_token(x0_ptr, x1_ptr, w_ptr, b_ptr, q_ptr, s_ptr, t, S, D, eps, NORM, CHUNK)

    @triton.jit
    def _ln_pair_quant_token(x0_ptr, x1_ptr, w_ptr, b_ptr, q_ptr, s_ptr, t, S, D, eps, NORM: tl.constexpr,
                             CHUNK: tl.constexpr):
        base = tl.arange(0, CHUNK)
        mean0 = 0.0
        mean1 = 0.0
        r0 = 1.0
        r1 = 1.0
        if NORM:
            s0 = tl.zeros([CHUNK], tl.float32)
            s1 = tl.zeros([CHUNK], tl.float32)
            for k in range(0, D, CHUNK):
                offs = k + base
                mask = offs < D
                s0 += tl.load(x0_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32)
                s1 += tl.load(x1_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32)
            mean0 = tl.sum(s0, axis=0) / D
            mean1 = tl.sum(s1, axis=0) / D
            v0 = tl.zeros([CHUNK], tl.float32)
            v1 = tl.zeros([CHUNK], tl.float32)
            for k in range(0, D, CHUNK):  # centred second moments: exact for any mean
                offs = k + base
                mask = offs < D
                c0 = tl.where(mask, tl.load(x0_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32) - mean0, 0.0)
                c1 = tl.where(mask, tl.load(x1_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32) - mean1, 0.0)
                v0 += c0 * c0
                v1 += c1 * c1
            r0 = 1.0 / tl.sqrt(tl.sum(v0, axis=0) / D + eps)
            r1 = 1.0 / tl.sqrt(tl.sum(v1, axis=0) / D + eps)
        amax_d = tl.zeros([CHUNK], tl.float32)
        amax_n = tl.zeros([CHUNK], tl.float32)
        for k in range(0, D, CHUNK):
            offs = k + base
            mask = offs < D
            h0, h1 = _ln_pair(x0_ptr, x1_ptr, w_ptr, b_ptr, t, offs, mask, D, mean0, r0, mean1, r1, NORM)
            amax_d, amax_n = _pair_amax(amax_d, amax_n, h0, h1, mask)
        sd, sn = _scale(amax_d), _scale(amax_n)
        for k in range(0, D, CHUNK):
            offs = k + base
            mask = offs < D
            h0, h1 = _ln_pair(x0_ptr, x1_ptr, w_ptr, b_ptr, t, offs, mask, D, mean0, r0, mean1, r1, NORM)
            _store_pair(q_ptr, t, S, D, offs, mask, h0, h1, sd, sn)
        tl.store(s_ptr + t, sd)
        tl.store(s_ptr + S + t, sn)

    @triton.jit
    def _gelu_tanh(x):
        # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): torch's GELU(approximate="tanh")
        return x * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))

    @triton.jit
    def _gelu_pair(y_ptr, bias_ptr, t, S, F, offs, mask, HAS_BIAS: tl.constexpr):
        """GELU of posi = base + delta and of nega = base (+ bias) at ``offs``."""
        delta = tl.load(y_ptr + t * F + offs, mask=mask, other=0.0).to(tl.float32)
        base = tl.load(y_ptr + (S + t) * F + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            base = base + tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return _gelu_tanh(base + delta), _gelu_tanh(base)

    @triton.jit
    def _gelu_pair_quant_kernel(y_ptr, bias_ptr, q_ptr, s_ptr, S, F, HAS_BIAS: tl.constexpr, CHUNK: tl.constexpr):
        for t in range(tl.program_id(0).to(tl.int64), S, tl.num_programs(0)):
            _gelu_pair_quant_token(y_ptr, bias_ptr, q_ptr, s_ptr, t, S, F, HAS_BIAS, CHUNK)

    @triton.jit
    def _gelu_pair_quant_token(y_ptr, bias_ptr, q_ptr, s_ptr, t, S, F, HAS_BIAS: tl.constexpr, CHUNK: tl.constexpr):
        base = tl.arange(0, CHUNK)
        amax_d = tl.zeros([CHUNK], tl.float32)
        amax_n = tl.zeros([CHUNK], tl.float32)
        for k in range(0, F, CHUNK):
            offs = k + base
            mask = offs < F
            g_posi, g_nega = _gelu_pair(y_ptr, bias_ptr, t, S, F, offs, mask, HAS_BIAS)
            amax_d, amax_n = _pair_amax(amax_d, amax_n, g_posi, g_nega, mask)
        sd, sn = _scale(amax_d), _scale(amax_n)
        for k in range(0, F, CHUNK):
            offs = k + base
            mask = offs < F
            g_posi, g_nega = _gelu_pair(y_ptr, bias_ptr, t, S, F, offs, mask, HAS_BIAS)
            _store_pair(q_ptr, t, S, F, offs, mask, g_posi, g_nega, sd, sn)
        tl.store(s_ptr + t, sd)
        tl.store(s_ptr + S + t, sn)

    @triton.jit
    def _rms_rope_pair_kernel(y_ptr, bias_ptr, w_ptr, cos_ptr, sin_ptr, scale_ptr, out_ptr, S, D, HALF_HEAD, eps,
                              HAS_BIAS: tl.constexpr, OUT_FP8: tl.constexpr, CHUNK: tl.constexpr):
        for t in range(tl.program_id(0).to(tl.int64), S, tl.num_programs(0)):
            _rms_rope_pair_token(y_ptr, bias_ptr, w_ptr, cos_ptr, sin_ptr, scale_ptr, out_ptr, t, S, D,
                                 HALF_HEAD, eps, HAS_BIAS, OUT_FP8, CHUNK)

    @triton.jit
    def _rms_rope_pair_token(y_ptr, bias_ptr, w_ptr, cos_ptr, sin_ptr, scale_ptr, out_ptr, t, S, D, HALF_HEAD, eps,
                             HAS_BIAS: tl.constexpr, OUT_FP8: tl.constexpr, CHUNK: tl.constexpr):
        base = tl.arange(0, CHUNK)
        sq_p = tl.zeros([CHUNK], tl.float32)
        sq_n = tl.zeros([CHUNK], tl.float32)
        for k in range(0, D, CHUNK):  # the rows' mean squares (the pairing does not matter here)
            offs = k + base
            mask = offs < D
            n = tl.load(y_ptr + (S + t) * D + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                n = n + tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = n + tl.load(y_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32)
            sq_p += p * p
            sq_n += n * n
        r_p = 1.0 / tl.sqrt(tl.sum(sq_p, axis=0) / D + eps)
        r_n = 1.0 / tl.sqrt(tl.sum(sq_n, axis=0) / D + eps)
        inv_scale = 1.0
        if OUT_FP8:
            inv_scale = 1.0 / tl.load(scale_ptr)
        j = tl.arange(0, CHUNK // 2)  # (re, im) pair j of the chunk = its elements 2j, 2j+1
        for k in range(0, D, CHUNK):
            ev = k + 2 * j
            od = ev + 1
            mask = ev < D
            n_e = tl.load(y_ptr + (S + t) * D + ev, mask=mask, other=0.0).to(tl.float32)
            n_o = tl.load(y_ptr + (S + t) * D + od, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                n_e = n_e + tl.load(bias_ptr + ev, mask=mask, other=0.0).to(tl.float32)
                n_o = n_o + tl.load(bias_ptr + od, mask=mask, other=0.0).to(tl.float32)
            p_e = n_e + tl.load(y_ptr + t * D + ev, mask=mask, other=0.0).to(tl.float32)
            p_o = n_o + tl.load(y_ptr + t * D + od, mask=mask, other=0.0).to(tl.float32)
            w_e = tl.load(w_ptr + ev, mask=mask, other=0.0).to(tl.float32)
            w_o = tl.load(w_ptr + od, mask=mask, other=0.0).to(tl.float32)
            hj = (k // 2 + j) % HALF_HEAD
            c = tl.load(cos_ptr + t * HALF_HEAD + hj, mask=mask, other=0.0)
            sn = tl.load(sin_ptr + t * HALF_HEAD + hj, mask=mask, other=0.0)
            for branch in tl.static_range(2):
                if branch == 0:
                    x_e, x_o = p_e * r_p * w_e, p_o * r_p * w_o
                else:
                    x_e, x_o = n_e * r_n * w_e, n_o * r_n * w_o
                o_e, o_o = x_e * c - x_o * sn, x_e * sn + x_o * c
                row = out_ptr + (branch * S + t) * D
                if OUT_FP8:
                    tl.store(row + ev, tl.clamp(o_e * inv_scale, -448.0, 448.0).to(tl.float8e4nv), mask=mask)
                    tl.store(row + od, tl.clamp(o_o * inv_scale, -448.0, 448.0).to(tl.float8e4nv), mask=mask)
                else:
                    tl.store(row + ev, o_e.to(tl.bfloat16), mask=mask)
                    tl.store(row + od, o_o.to(tl.bfloat16), mask=mask)


@dataclass
class Launch:
    """How a kernel is launched: ``chunk`` elements per walk step, ``warps`` per program, and programs per
    SM (None: one program per token; a number: a bounded grid walking the tokens grid-stride, which caps
    how many tokens' rows are in flight at once). Swept at the model's shapes on an H200
    (bench/pair_kernels_gpu.py: chunk 1024-4096, 4-16 warps, 2-16 programs per SM or one per token): the
    default is within 5 % of the best configuration of every kernel, so it stays."""

    chunk: int = 1024
    warps: int = 4
    programs_per_sm: int | None = None

    def grid(self, tokens: int, device) -> tuple[int]:
        if self.programs_per_sm is None:
            return (tokens,)
        return (max(1, min(tokens, self.programs_per_sm * _sm_count(device))),)


LAUNCH = {"ln": Launch(), "gelu": Launch(), "rms_rope": Launch()}


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _outputs(s: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((2 * s, k), device=device, dtype=torch.float8_e4m3fn),
            torch.empty((2 * s, 1), device=device, dtype=torch.float32))


def launch_ln_pair_quant(x0, x1, w, b, eps: float, norm: bool = True):
    """The LayerNorm kernel on (S, D) x0/x1 (contiguous) with per-branch (2, D) fp32 w and b; ``norm=False``
    quantises the pair as it is (w, b and eps unused)."""
    s, d = x0.shape
    q, scales = _outputs(s, d, x0.device)
    cfg = LAUNCH["ln"]
    _ln_pair_quant_kernel[cfg.grid(s, x0.device)](x0, x1, w, b, q, scales, s, d, eps, NORM=norm, CHUNK=cfg.chunk,
                                                  num_warps=cfg.warps)
    return q, scales


def launch_gelu_pair_quant(y, bias):
    """The GELU kernel on the pair-coded GEMM output y (2S, F) (contiguous) and an optional (F,) bias."""
    rows, f = y.shape
    s = rows // 2
    q, scales = _outputs(s, f, y.device)
    cfg = LAUNCH["gelu"]
    _gelu_pair_quant_kernel[cfg.grid(s, y.device)](y, bias if bias is not None else y, q, scales, s, f,
                                                   HAS_BIAS=bias is not None, CHUNK=cfg.chunk, num_warps=cfg.warps)
    return q, scales


def launch_rms_rope_pair(y, bias, weight, cos, sin, eps: float, scale):
    """RMSNorm (weight) + RoPE of both branches of a pair-coded GEMM output y (2S, D) plus bias -> (2, S, D):
    bf16, or e4m3 divided by ``scale`` ((1,) fp32) when one is given. cos/sin: (S, D_head/2) fp32 contiguous."""
    rows, d = y.shape
    s = rows // 2
    out = torch.empty((2, s, d), device=y.device, dtype=torch.float8_e4m3fn if scale is not None else torch.bfloat16)
    cfg = LAUNCH["rms_rope"]
    _rms_rope_pair_kernel[cfg.grid(s, y.device)](y, bias if bias is not None else y, weight, cos, sin,
                                                 scale if scale is not None else cos, out, s, d, cos.shape[-1], eps,
                                                 HAS_BIAS=bias is not None, OUT_FP8=scale is not None,
                                                 CHUNK=cfg.chunk, num_warps=cfg.warps)
    return out


# ---------------------------------------------------------------------------------- the ops torch.compile sees
# Opaque custom ops (not triton_op): inductor calls them as they are, launching the Triton JIT kernels above,
# instead of re-emitting their source into its own generated code (which failed to build on torch 2.11).


@torch.library.custom_op("ex4d::ln_pair_quant", mutates_args=())
def ln_pair_quant(x0: torch.Tensor, x1: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
                  norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_ln_pair_quant(x0, x1, w, b, eps, norm)


@ln_pair_quant.register_fake
def _(x0, x1, w, b, eps, norm=True):
    return _outputs(*x0.shape, x0.device)


def pair_quant(x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair (x0, x1), each (S, K), as e4m3 rows (x0 - x1; x1) and per-row scales, in one pass."""
    return ln_pair_quant(x0, x1, x0, x0, 0.0, False)


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
