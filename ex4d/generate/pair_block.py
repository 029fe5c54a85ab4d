"""The DiT block forward for a batched CFG pair, written per branch so the FP8 quantisation fuses.

With batched CFG the block sees x = (posi, nega). :meth:`accel.Fp8Linear._forward_pair` codes each linear's
input as (posi - nega, nega) so that the guidance scale does not multiply FP8 rounding; written on the
batch-2 tensor, that coding needs a ``stack``/``cat`` between every norm and every linear, and inductor
then materialises each intermediate in its own pass over memory (the norms, the GELU, the re-coding:
~290 ms of a 1.13 s step on an H200, more than the attention's softmax work). Here the block carries the
two branches as two (S, D) tensors from the start:

* one CFG pair of inputs is quantised once for all the linears that read it (q, k, v share it),
* a linear's output stays the lazy pair (base + delta, base) in fp32 until its consumer (RMSNorm + RoPE,
  GELU, the residual) reads it, so inductor fuses the norm, the modulation, the delta and the per-token
  amax into the kernels that already read the data,
* with the FP8 attention kernel, its e4m3 output goes straight into the output projection's GEMM on the
  kernel's own scale (no dequantise / re-quantise round: one rounding fewer),
* where Triton runs, :mod:`.pair_kernels` does the norms, the GELU and q/k's RMSNorm + RoPE together with
  the pair's quantisation in one pass each (``FUSED_KERNELS``).

Measured at the bare DiT on an H200 (docs/benchmarks.md section 6): 1.151 -> 1.035 s per CFG step with
FP8 attention, 1.286 -> 1.195 s without, cosine to the bf16 reference unchanged.

The maths is :func:`accel.block_forward`'s (diffsynth 2.1.12's DiTBlock): the same modules in the same
order; only where values are rounded to bf16 differs (the FP8 linears' outputs and the GELU stay fp32
until the next rounding point), which is more precise, not less.
"""

from __future__ import annotations

import torch

from . import accel, pair_kernels


def applies(block, x: torch.Tensor) -> bool:
    """Whether ``block`` takes the per-branch path for ``x``: a CFG pair whose self-attention q is FP8 with
    the pair coding on (the ``fp8`` lever), and the FFN diffsynth's Linear-GELU-Linear."""
    q = block.self_attn.q
    ffn = block.ffn
    return (x.dim() == 3 and x.shape[0] == 2 and isinstance(q, accel.Fp8Linear) and q.cfg_pair_delta
            and isinstance(ffn, torch.nn.Sequential) and len(ffn) == 3)


def _branch(m: torch.Tensor, b: int) -> torch.Tensor:
    """Branch ``b`` of a modulation tensor whose batch is 1 (one timestep for both branches) or 2."""
    return m[b] if m.shape[0] > 1 else m[0]


class Pair:
    """One CFG pair of inputs (posi, nega), each (S, K), read by one or more linears; or its e4m3 rows
    already quantised by a fused kernel (:meth:`quantized`)."""

    def __init__(self, posi: torch.Tensor | None, nega: torch.Tensor | None):
        self.posi, self.nega = posi, nega
        self._quantized = None

    @classmethod
    def quantized(cls, rows: torch.Tensor, scales: torch.Tensor) -> "Pair":
        pair = cls(None, None)
        pair._quantized = (rows, scales)
        return pair

    def through(self, linear: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``linear`` on both branches -> (posi_out, nega_out); fp32 for an FP8 linear with the pair coding."""
        coded = _pair_coded(linear)
        return accel.split_pair(linear, self.gemm(linear), delta_coded=coded, add_bias=coded)

    def gemm(self, linear: torch.nn.Module) -> torch.Tensor:
        """The raw output rows: (posi - nega; nega) x W^T (2S, N) for a pair-coded FP8 linear (no bias),
        else ``linear`` on (posi; nega)."""
        if _pair_coded(linear):
            if self._quantized is None:  # shared by every linear reading this pair (q, k and v)
                self._quantized = accel.quantize_pair(self.posi, self.nega)
            return accel.fp8_gemm(linear, *self._quantized)
        if self.posi is None:
            raise TypeError(f"a pre-quantised CFG pair cannot feed {type(linear).__name__}")
        dtype = linear.weight.dtype if isinstance(linear, torch.nn.Linear) else getattr(linear, "out_dtype", None)
        both = torch.cat((self.posi, self.nega))
        return linear(both.to(dtype) if dtype is not None else both)


def _pair_coded(linear) -> bool:
    return isinstance(linear, accel.Fp8Linear) and linear.cfg_pair_delta


# Whether the Triton kernels of pair_kernels quantise the norms' and the GELU's pairs (off: torch code, for A/B).
FUSED_KERNELS = True


def _fused(x: torch.Tensor, *readers) -> bool:
    return FUSED_KERNELS and pair_kernels.available(x) and all(_pair_coded(r) for r in readers)


def _pair_of(x0: torch.Tensor, x1: torch.Tensor, reader) -> Pair:
    """The pair (x0, x1) for ``reader``: quantised in one kernel pass where the kernels run."""
    if _fused(x0, reader):
        return Pair.quantized(*pair_kernels.pair_quant(x0.contiguous(), x1.contiguous()))
    return Pair(x0, x1)


def _layer_norm_pair(norm, x0, x1, shift=None, scale=None, readers=()) -> Pair:
    """``norm(x_b) * (1 + scale_b) + shift_b`` (or ``norm(x_b)`` alone) for both branches, as a Pair for
    ``readers``: one fused kernel for a LayerNorm that is either modulated (no affine of its own, as
    norm1/norm2) or not (its affine as the kernel's w and b, as norm3)."""
    d = x0.shape[-1]
    fusable = isinstance(norm, torch.nn.LayerNorm) and _fused(x0, *readers)
    if shift is not None:
        fusable = fusable and norm.weight is None and shift.shape[-2:-1] == (1,) and shift.dim() == 3
    if fusable:
        if shift is not None:
            w = torch.stack([1 + _branch(scale, b).reshape(d) for b in (0, 1)])
            bias = torch.stack([_branch(shift, b).reshape(d) for b in (0, 1)])
        else:
            w = (norm.weight if norm.weight is not None else x0.new_ones(d)).expand(2, d)
            bias = (norm.bias if norm.bias is not None else x0.new_zeros(d)).expand(2, d)
        rows, scales = pair_kernels.ln_pair_quant(x0.contiguous(), x1.contiguous(), w.float().contiguous(),
                                                  bias.float().contiguous(), float(norm.eps))
        return Pair.quantized(rows, scales)
    if shift is None:
        return Pair(norm(x0), norm(x1))
    return Pair(*(norm(x) * (1 + _branch(scale, b)) + _branch(shift, b) for b, x in ((0, x0), (1, x1))))


def _rms_norm_fusable(norm) -> bool:
    return isinstance(getattr(norm, "weight", None), torch.Tensor) and hasattr(norm, "eps") and hasattr(norm, "norm")


def static_qk_scale(norm) -> torch.Tensor:
    """An e4m3 scale for RMSNorm(x) * w after RoPE, known before the data: |x_i| / rms(x) <= sqrt(D) and a
    rotation keeps each (re, im) pair's length, so no element exceeds sqrt(D) max|w|. e4m3 is floating point,
    so the loose bound costs no precision for any value above 2^-6 of it (all but the tiniest)."""
    d = norm.weight.shape[-1]
    return (d ** 0.5 * norm.weight.detach().abs().amax().float() / accel.FP8_MAX).reshape(1)


def _self_attention(attn, pair: Pair, cos, sin, attention, dtype):
    n = attn.num_heads
    groups = getattr(attention, "head_groups", 0)
    e4m3 = None if groups else getattr(attention, "e4m3_output", None)
    fused = (_fused(cos, attn.q, attn.k) and _rms_norm_fusable(attn.norm_q) and _rms_norm_fusable(attn.norm_k)
             and cos.dim() == 3 and cos.shape[1] == 1)
    if fused:  # RMSNorm + RoPE of both branches in one kernel, straight from the GEMM's pair rows
        tables = (cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1))
        prequantized = getattr(attention, "e4m3_prequantized", None) if e4m3 is not None else None
        outs = []
        for lin, norm in ((attn.q, attn.norm_q), (attn.k, attn.norm_k)):
            scale = static_qk_scale(norm) if prequantized is not None else None
            outs.append((pair_kernels.rms_rope_pair(pair.gemm(lin), lin.bias, norm.weight, *tables,
                                                    float(norm.eps), scale), scale))
        (q, sq), (k, sk) = outs
        if sq is None:
            q, k = q.to(dtype), k.to(dtype)
    else:
        (qp, qn), (kp, kn) = pair.through(attn.q), pair.through(attn.k)

        def normed(norm, a, b):  # RMSNorm + RoPE per branch, the pair stacked as the kernel's batch of 2
            return torch.cat((accel.rope_real(norm(a.to(dtype))[None], cos, sin, n),
                              accel.rope_real(norm(b.to(dtype))[None], cos, sin, n)))

        q, k, sq = normed(attn.norm_q, qp, qn), normed(attn.norm_k, kp, kn), None
    vp, vn = pair.through(attn.v)
    v = torch.stack((vp, vn)).to(dtype)
    if groups:  # a sharded attention (sequence parallel): each of q, k, v leaves as soon as it exists
        out = attention(*(attention.send(accel.head_groups(t, n, groups)) for t in (q, k, v)))
        return _pair_of(out[0], out[1], attn.o).through(attn.o)
    q, k, v = (accel._heads(t, n) for t in (q, k, v))
    if sq is not None:  # q and k arrived in e4m3 on their static scales
        return _o_from_e4m3(attn.o, *attention.e4m3_prequantized(q, k, sq, sk, v))
    if e4m3 is not None and isinstance(attn.o, accel.Fp8Linear):
        return _o_from_e4m3(attn.o, *e4m3(q, k, v))
    out = accel._merge_heads(attention(q, k, v))
    return _pair_of(out[0], out[1], attn.o).through(attn.o)


def _o_from_e4m3(o, out8: torch.Tensor, scale: torch.Tensor):
    """The output projection of an e4m3 attention output (2, S, n, d) on one scale: the GEMM reads it as it is."""
    rows = out8.reshape(-1, out8.shape[-2] * out8.shape[-1])
    y = accel.fp8_gemm(o, rows, scale.reshape(1, 1).expand(rows.shape[0], 1).contiguous())
    return accel.split_pair(o, y, delta_coded=False, add_bias=True)


def _cross_attention(attn, pair: Pair, context, attention, dtype, kv=None):
    n = attn.num_heads
    qp, qn = pair.through(attn.q)
    q = accel._heads(torch.stack((attn.norm_q(qp.to(dtype)), attn.norm_q(qn.to(dtype)))), n)
    out = accel._attend_context(attn, q, context, attention, kv)
    return _pair_of(out[0], out[1], attn.o).through(attn.o)


def _ffn(ffn, pair: Pair):
    first, act, second = ffn
    if (isinstance(act, torch.nn.GELU) and act.approximate == "tanh" and _pair_coded(first)
            and _fused(first.weight_fp8, second)):  # GELU and the pair's quantisation in one kernel
        rows, scales = pair_kernels.gelu_pair_quant(pair.gemm(first), first.bias)
        return Pair.quantized(rows, scales).through(second)
    ap, an = pair.through(first)
    return Pair(act(ap), act(an)).through(second)


def block_forward(block, x, context, t_mod, cos, sin, attention, self_attention=None, kv=None):
    """:func:`accel.block_forward` for a CFG pair x = (posi, nega) (see :func:`applies`)."""
    dtype = x.dtype
    has_seq = t_mod.dim() == 4
    mod = (block.modulation.to(dtype=t_mod.dtype, device=t_mod.device) + t_mod).chunk(6, dim=2 if has_seq else 1)
    if has_seq:
        mod = tuple(m.squeeze(2) for m in mod)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    xs = [x[0], x[1]]
    sa, ca = block.self_attn, block.cross_attn

    def residual(gate, outs):  # x + gate * out, rounded to the stream's dtype as the original block does
        for b in (0, 1):
            xs[b] = (xs[b] + (_branch(gate, b) * outs[b] if gate is not None else outs[b])).to(dtype)

    pair = _layer_norm_pair(block.norm1, *xs, shift_msa, scale_msa, readers=(sa.q, sa.k, sa.v))
    residual(gate_msa, _self_attention(sa, pair, cos, sin, self_attention or attention, dtype))
    residual(None, _cross_attention(ca, _layer_norm_pair(block.norm3, *xs, readers=(ca.q,)), context, attention,
                                    dtype, kv))
    pair = _layer_norm_pair(block.norm2, *xs, shift_mlp, scale_mlp, readers=(block.ffn[0],))
    residual(gate_mlp, _ffn(block.ffn, pair))
    return torch.stack(xs)
