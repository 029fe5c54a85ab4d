"""Speed levers for the Wan2.1 DiT (diffsynth 2.1.12) that keep the model's output.

Each lever is applied in place to a ``WanModel`` (or anything with a ``.dit`` attribute) and falls back
with a notice where the hardware or software cannot run it (CPU, no FP8 matrix units, no cuDNN attention):

``cudnn_attention``  self/cross attention through PyTorch's cuDNN SDPA kernel (measured 1.8x the flash
                     kernel at EX-4D's 13,312-token shape on an H100).
``fused_rope``       the block forward re-expressed with real-valued fp32 RoPE instead of diffsynth's
                     float64 complex RoPE (the same rotation; lets torch.compile fuse it).
``fp8``              the token-wise linears of every block (self-attn q/k/v/o, cross-attn q/o, both FFN
                     layers) as FP8 e4m3 weights (per-output-channel scale) x FP8 activations (per-token
                     scale, quantised in a compiled kernel) through ``torch._scaled_mm``; a batched CFG
                     pair is coded as nega + delta (``Fp8Linear._forward_pair``) so the guidance scale
                     does not multiply the rounding. Needs compute capability >= 8.9. Also halves the
                     DiT's weight memory. The default.
``fp8_ffn``          the same in the two FFN linears only (the earlier default; for comparisons).
``fp8_attention``    the video tokens' self-attention through cuDNN's fused FP8 kernel (Q/K/V in e4m3,
                     one scale per tensor; :mod:`ex4d.generate.fp8_attention`, needs the optional
                     ``nvidia-cudnn-frontend`` wheel). Opt-in: see docs/benchmarks.md for its drift.
``compile``          regional torch.compile of the block forward (one graph shared by all 40 blocks).

``cfg_batch`` (both classifier-free-guidance branches in one batch-2 forward) is not a module change:
call :func:`cfg_noise_pred` from the sampling loop. It is exactly the two-pass result up to kernel
reduction order.

Nothing here imports at ``import ex4d`` time; torch is imported by the module itself only.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ALL_LEVERS = ("cudnn_attention", "fused_rope", "fp8_ffn", "fp8", "fast_accum", "fp8_attention", "compile")
# fp8 in every token-wise linear: per-step cosine of the CFG-combined prediction vs the bf16 reference
# 0.994 with the CFG pair coded as nega + delta, 0.984 with the two rows quantised independently (random
# weights, docs/benchmarks.md).
DEFAULT_LEVERS = ("cudnn_attention", "fused_rope", "fp8", "fast_accum", "compile")
# Levers of the pipeline rather than the DiT (see accelerate_pipeline).
PIPELINE_LEVERS = ("cfg_batch", "vae_channels_last", "context_kv_cache")
# fast_accum: Hopper's FP8 tensor cores keep partial sums in reduced precision unless they are promoted to
# fp32 every few k-steps; skipping the promotion measured 1.124x for the 5120 -> 5120 GEMMs (q/k/v/o,
# cross q/o) but 1.02x / 1.006x for the FFN's, whose longer sums (k = 13824) lose more (relative error
# against fp32 of the same e4m3 operands 0.0017 -> 0.0023 at k = 5120, -> 0.0033 at k = 13824; the e4m3
# rounding of the activations themselves is ~10x larger). bench/fp8_gemm_gpu.py, H200.
FAST_ACCUM_MAX_K = 8192
FFN_LINEARS = ("ffn.0", "ffn.2")

# Linear layers that see the video tokens (their cost scales with the 13k tokens); the cross-attention
# k/v/k_img/v_img act on 512 text / 257 image tokens and stay in bf16.
FP8_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2")

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class LeverReport:
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # lever -> why

    def as_dict(self) -> dict:
        return {"applied": list(self.applied), "skipped": dict(self.skipped)}

    def probe(self, lever: str, result: tuple[bool, str]) -> bool:
        """Record a support probe's (ok, why) for ``lever``: applied, or skipped with the reason."""
        ok, why = result
        if ok:
            self.applied.append(lever)
        else:
            self.skipped[lever] = why
        return ok


# --------------------------------------------------------------------------------------------- support


def fp8_supported(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether FP8 matrix multiplication (torch._scaled_mm with row-wise scales) can run on ``device``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "FP8 needs a CUDA GPU (running on CPU: kept bf16)"
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no float8 matmul"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"GPU compute capability {major}.{minor} < 8.9 has no FP8 matrix units"
    return True, ""


def cudnn_attention_supported(device: torch.device | str | None = None) -> tuple[bool, str]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return False, "cuDNN attention needs a CUDA GPU (running on CPU: default SDPA)"
    op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    if op is None:
        return False, "this torch has no cuDNN SDPA op"
    try:  # a tiny real call: cuDNN may be missing or refuse this GPU
        q = torch.randn(1, 2, 64, 128, device=device, dtype=torch.bfloat16)
        op(q, q, q, None, False, 0.0, False, False)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
        return False, f"cuDNN attention failed a probe call: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return True, ""


def compile_supported(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether regional torch.compile (inductor, Triton kernels) can run on ``device``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return False, "torch.compile is only used on CUDA (CPU: eager)"
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # very old torch
        return False, f"torch {torch.__version__} has no Triton check"
    if not has_triton():
        return False, "Triton is not installed for this torch (torch.compile's GPU kernels need it)"
    return True, ""


# ------------------------------------------------------------------------------------------- attention


def sdpa_default(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Called directly (not through SDPA's backend choice, which prefers flash) so torch.compile keeps it.
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False)[0]


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, s, c = x.shape
    return x.view(b, s, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, n, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, n * d)


# ------------------------------------------------------------------------------------------------ RoPE


def rope_cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffsynth's complex RoPE table (S, 1, D/2) -> float32 (cos, sin), each (S, 1, D/2)."""
    return freqs.real.float().contiguous(), freqs.imag.float().contiguous()


def rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The rotation diffsynth's ``rope_apply`` does on (re, im) pairs of each head, in fp32 real arithmetic."""
    b, s, c = x.shape
    pairs = x.float().view(b, s, num_heads, c // num_heads // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.view(b, s, c).to(x.dtype)


# ------------------------------------------------------------------------------------------------- FP8


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) dynamic e4m3 quantisation: returns (x_fp8 (M,K), scale (M,1) float32)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


_compiled_quantize = None


def _quantize(x: torch.Tensor):
    """Quantisation fused into one kernel by torch.compile (eager quantisation costs more than FP8 saves).
    Inside an already-compiled region this is simply inlined."""
    global _compiled_quantize
    if torch.compiler.is_compiling() or x.device.type != "cuda":  # CPU (tests): eager
        return quantize_rows_fp8(x)
    if _compiled_quantize is None:
        _compiled_quantize = torch.compile(quantize_rows_fp8, dynamic=True)
    return _compiled_quantize(x)


_BIAS_PROBE: dict = {}


def _scaled_mm_takes_bias(device, dtype) -> bool:
    """Whether this torch/GPU accepts a bias inside row-wise-scaled _scaled_mm (probed once per device)."""
    key = (str(device), dtype)
    if key not in _BIAS_PROBE:
        try:
            a = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
            b = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
            torch._scaled_mm(a, b.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                             bias=torch.zeros(16, device=device, dtype=dtype), out_dtype=dtype)
            _BIAS_PROBE[key] = True
        except Exception:  # noqa: BLE001 - fall back to a separate add
            _BIAS_PROBE[key] = False
    return _BIAS_PROBE[key]


class Fp8Linear(torch.nn.Module):
    """A frozen nn.Linear with e4m3 weights (per-output-channel scale) and per-token e4m3 activations."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        if not w.is_floating_point() or w.element_size() < 2:
            raise TypeError(f"Fp8Linear needs a bf16/fp16/fp32 weight, got {w.dtype} (dequantise first)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w_scale = (w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX)  # (N,1)
        w_fp8 = (w.float() / w_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        # _scaled_mm wants the second operand column-major: keep (N,K) row-major and pass its transpose.
        self.register_buffer("weight_fp8", w_fp8, persistent=False)
        self.register_buffer("weight_scale", w_scale.view(1, -1).contiguous(), persistent=False)
        bias = linear.bias.detach().to(w.dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self.out_dtype = w.dtype
        self.bias_in_matmul = _scaled_mm_takes_bias(w.device, w.dtype)
        # A batch of 2 is batched CFG's (posi, nega): see _forward_pair. Off only for A/B measurements.
        self.cfg_pair_delta = True
        self.fast_accum = False  # the fast_accum lever (see FAST_ACCUM_MAX_K)

    def _matmul(self, x2: torch.Tensor, with_bias: bool) -> torch.Tensor:
        xq, xs = _quantize(x2)
        fused_bias = self.bias if (with_bias and self.bias_in_matmul) else None
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale,
                             bias=fused_bias, out_dtype=self.out_dtype, use_fast_accum=self.fast_accum)
        if with_bias and self.bias is not None and fused_bias is None:
            y = y + self.bias
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.cfg_pair_delta and x.dim() == 3 and shape[0] == 2:
            return self._forward_pair(x)
        y = self._matmul(x.reshape(-1, self.in_features), with_bias=True)
        return y.view(*shape[:-1], self.out_features)

    def _forward_pair(self, x: torch.Tensor) -> torch.Tensor:
        """Batch (posi, nega) of batched CFG: quantise nega and the difference posi - nega, not posi itself.

        FP8 rounding of two nearly equal rows differs almost independently, and ``nega + cfg (posi - nega)``
        multiplies that difference by the guidance scale (about 6x the error of one branch at cfg 5). Coding
        posi as nega + delta keeps the same two GEMM rows per token, but posi - nega is then computed from the
        small delta's own fine grid: the guided prediction carries about one branch's rounding error."""
        posi, nega = split_pair(self, fp8_gemm(self, *quantize_pair(x[0], x[1])), delta_coded=True, add_bias=True)
        return torch.stack((posi, nega)).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


def quantize_pair(posi: torch.Tensor, nega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CFG pair (posi, nega), each (S, K) -> e4m3 rows (2S, K) = (posi - nega; nega) and their per-row
    scales (2S, 1). The difference is taken in fp32 before rounding (its own fine grid; see
    :meth:`Fp8Linear._forward_pair`)."""
    nf = nega.float()
    qd, sd = _quantize(posi.float() - nf)
    qn, sn = _quantize(nf)
    return torch.cat((qd, qn)), torch.cat((sd, sn))


def fp8_gemm(linear: Fp8Linear, rows: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """e4m3 rows (M, K) with per-row scales (M, 1) through an :class:`Fp8Linear`'s weight, no bias."""
    return torch._scaled_mm(rows, linear.weight_fp8.t(), scale_a=scales, scale_b=linear.weight_scale,
                            out_dtype=linear.out_dtype, use_fast_accum=linear.fast_accum)


def split_pair(linear, y: torch.Tensor, *, delta_coded: bool, add_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Output rows y (2S, N) -> (posi, nega) in fp32, plus ``linear.bias`` if ``add_bias`` (a GEMM made by
    :func:`fp8_gemm`). ``delta_coded``: y is (posi - nega; nega), otherwise (posi; nega)."""
    s = y.shape[0] // 2
    first, nega = y[:s].float(), y[s:].float()
    posi = nega + first if delta_coded else first
    bias = linear.bias if add_bias else None
    if bias is not None:
        posi, nega = posi + bias.float(), nega + bias.float()
    return posi, nega


class Fp8WeightOnlyLinear(torch.nn.Module):
    """A frozen nn.Linear whose weight is STORED as e4m3 with a per-output-channel scale and dequantised to
    the compute dtype at each call (weight-only: bf16 matmul). Half the memory of bf16; unlike a plain cast
    to float8 (diffsynth's fp8 storage) small weights keep their precision."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype | None = None):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = dtype or w.dtype
        w_scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight_fp8", (w.float() / w_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn),
                             persistent=False)
        self.register_buffer("weight_scale", w_scale, persistent=False)  # (N,1) float32
        bias = linear.bias.detach().to(self.out_dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight_fp8.float() * self.weight_scale).to(self.out_dtype)
        return F.linear(x.to(self.out_dtype), w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 weight-only"


def set_cfg_pair_delta(dit: torch.nn.Module, on: bool) -> int:
    """Switch :meth:`Fp8Linear._forward_pair` on or off in every FP8 linear (for A/B drift measurements)."""
    mods = [m for m in dit.modules() if isinstance(m, Fp8Linear)]
    for m in mods:
        m.cfg_pair_delta = on
    return len(mods)


def _merged_linear(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Linear | None:
    """A plain nn.Linear equal to ``module``: itself, a peft LoRA wrapper with its adapter merged in, or a
    linear whose weight is stored in float8 without a scale (diffsynth's fp8 storage), cast to ``dtype``."""
    if isinstance(module, torch.nn.Linear) and not hasattr(module, "base_layer"):
        if module.weight.element_size() == 1:  # float8 storage: dequantise to the compute dtype
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                    device="meta")
            target = dtype or torch.bfloat16
            plain.weight = torch.nn.Parameter(module.weight.detach().to(target), requires_grad=False)
            if module.bias is not None:
                plain.bias = torch.nn.Parameter(module.bias.detach().to(target), requires_grad=False)
            return plain
        return module
    base = getattr(module, "base_layer", None)
    if isinstance(base, torch.nn.Linear) and hasattr(module, "merge"):
        module.merge()  # peft: adds scale * B @ A into the base weight
        return base
    return None


def _set_submodule(root: torch.nn.Module, dotted: str, new: torch.nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def convert_block_to_fp8(block: torch.nn.Module, names=FP8_LINEARS, weight_only=(), dtype: torch.dtype | None = None) -> int:
    """Replace ``names`` in one block by :class:`Fp8Linear` (FP8 matmul) and ``weight_only`` by
    :class:`Fp8WeightOnlyLinear`, one layer at a time (each layer's bf16 weight is freed as it goes).
    Linears already stored in float8 (diffsynth's fp8 storage) are dequantised to ``dtype`` first."""
    count = 0
    for name, kind in [(n, Fp8Linear) for n in names] + [(n, Fp8WeightOnlyLinear) for n in weight_only]:
        try:
            module = block.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, (Fp8Linear, Fp8WeightOnlyLinear)):
            continue
        linear = _merged_linear(module, dtype)
        if linear is None:
            warnings.warn(f"fp8: {name} is a {type(module).__name__}, left as is")
            continue
        _set_submodule(block, name, kind(linear) if kind is Fp8Linear else kind(linear, dtype))
        count += 1
    return count


def convert_blocks_to_fp8(dit: torch.nn.Module, names=FP8_LINEARS, weight_only=(), dtype: torch.dtype | None = None) -> int:
    """Replace the token-wise linears of every block by :class:`Fp8Linear` (frees their bf16 weights).

    LoRA adapters (peft) are folded into their base weights first (the generation package's
    ``merge_lora`` when present), so the FP8 weights carry the adapter."""
    try:
        from .adapter import merge_lora
    except ImportError:  # the generation package is optional here: per-module merge below
        merge_lora = None
    if merge_lora is not None and any(hasattr(m, "lora_A") for m in dit.modules()):
        merge_lora(dit)
    return sum(convert_block_to_fp8(block, names, weight_only, dtype) for block in dit.blocks)


# ----------------------------------------------------------------------------------- the block forward


def head_groups(x: torch.Tensor, num_heads: int, groups: int) -> torch.Tensor:
    """(b, s, n*d) -> contiguous (b, groups, s, n/groups, d): each head group's tokens in one block."""
    b, s, c = x.shape
    return x.view(b, s, groups, num_heads // groups, c // num_heads).transpose(1, 2).contiguous()


def _self_attention(attn, x, cos, sin, attention):
    n = attn.num_heads
    groups = getattr(attention, "head_groups", 0)
    if groups:  # a sharded attention (sequence parallel): each of q, k, v leaves as soon as it exists
        def prepare(t):
            return attention.send(head_groups(t, n, groups))
    else:
        def prepare(t):
            return _heads(t, n)
    q = prepare(rope_real(attn.norm_q(attn.q(x)), cos, sin, n))
    k = prepare(rope_real(attn.norm_k(attn.k(x)), cos, sin, n))
    v = prepare(attn.v(x))
    out = attention(q, k, v)
    return attn.o(out if groups else _merge_heads(out))


def context_keys_values(attn, context) -> tuple:
    """The cross-attention's keys and values of the text (and, for I2V, the CLIP image) tokens, in heads
    form (b, n, s, d): (k, v) or (k, v, k_img, v_img). They depend on the context only, not on the step."""
    n = attn.num_heads
    if attn.has_image_input:
        img, ctx = context[:, :257], context[:, 257:]
    else:
        ctx = context
    kv = (_heads(attn.norm_k(attn.k(ctx)), n), _heads(attn.v(ctx), n))
    if attn.has_image_input:
        kv += (_heads(attn.norm_k_img(attn.k_img(img)), n), _heads(attn.v_img(img), n))
    return kv


def _attend_context(attn, q, context, attention, kv=None):
    """Cross-attention of q (b, n, s, d) to the context tokens -> (b, s, n*d); ``kv`` from
    :func:`context_keys_values` (a :class:`ContextKV`'s) or computed here."""
    kv = context_keys_values(attn, context) if kv is None else kv
    out = attention(q, kv[0], kv[1])
    if len(kv) == 4:
        out = out + attention(q, kv[2], kv[3])
    return _merge_heads(out)


def _cross_attention(attn, x, context, attention, kv=None):
    q = _heads(attn.norm_q(attn.q(x)), attn.num_heads)
    return attn.o(_attend_context(attn, q, context, attention, kv))


class ContextKV:
    """The lever ``context_kv_cache``: every block's cross-attention keys/values of one shot's context,
    computed at the first denoising step and reused by the others (the text and image tokens do not change
    between steps; the release recomputes them 25 times). The same maths as the block's own; with a compiled
    block the keys' RMSNorm runs eagerly here instead of inside the compiled graph (bf16 rounding of the
    same values; CPU tests: bit-identical outputs).

    One instance belongs to one :class:`~ex4d.generate.pipeline.Conditioning` (one clip or window), so it
    never outlives its context; ``scope`` separates the arrangements of the CFG branches (the batched
    pair, or posi and nega in two passes). Memory: about 31 MB per block at Wan2.1-14B's shapes for a
    batched pair (1.3 GB for 40 blocks)."""

    def __init__(self):
        self._kv: dict = {}

    def scope(self, name: str) -> "_ContextKVScope":
        return _ContextKVScope(self, name)

    def get(self, scope: str, block, context) -> tuple:
        key = (scope, id(block), tuple(context.shape))
        if key not in self._kv:
            with torch.no_grad():
                self._kv[key] = context_keys_values(block.cross_attn, context)
        return self._kv[key]

    def __len__(self) -> int:
        return len(self._kv)


@dataclass
class _ContextKVScope:
    cache: ContextKV
    name: str

    def get(self, block, context) -> tuple:
        return self.cache.get(self.name, block, context)


def block_forward(block, x, context, t_mod, cos, sin, attention=sdpa_default, self_attention=None, pair=True,
                  kv=None):
    """diffsynth 2.1.12 ``DiTBlock.forward`` (same modules, same order of operations) with real fp32 RoPE
    and a chosen attention kernel (``self_attention``, if given, for the video tokens' self-attention).
    A batched CFG pair through FP8 linears takes the per-branch form (``pair``; :mod:`.pair_block`).
    ``kv``: the cross-attention's context keys/values if already known (:class:`ContextKV`)."""
    if pair and pair_block.applies(block, x):
        return pair_block.block_forward(block, x, context, t_mod, cos, sin, attention, self_attention, kv)
    has_seq = t_mod.dim() == 4
    mod = (block.modulation.to(dtype=t_mod.dtype, device=t_mod.device) + t_mod).chunk(6, dim=2 if has_seq else 1)
    if has_seq:
        mod = tuple(m.squeeze(2) for m in mod)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    h = block.norm1(x) * (1 + scale_msa) + shift_msa
    x = x + gate_msa * _self_attention(block.self_attn, h, cos, sin, self_attention or attention)
    x = x + _cross_attention(block.cross_attn, block.norm3(x), context, attention, kv)
    h = block.norm2(x) * (1 + scale_mlp) + shift_mlp
    return x + gate_mlp * block.ffn(h)


class _RopeTableCache:
    """Converts a forward's complex RoPE table once for all 40 blocks (keyed by the tensor object)."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, freqs):
        key = (id(freqs), freqs.data_ptr(), tuple(freqs.shape))
        if key != self._key:
            self._key, self._value = key, rope_cos_sin(freqs)
        return self._value


def _expected_block(block) -> bool:
    need = ("self_attn", "cross_attn", "norm1", "norm2", "norm3", "ffn", "modulation")
    return all(hasattr(block, a) for a in need) and hasattr(block.self_attn, "norm_q")


def patch_block_forwards(dit, attention=sdpa_default, compile_blocks: bool = False, compile_mode: str | None = None,
                         compile_backend: str = "inductor", notice=warnings.warn, self_attention=None,
                         pair: bool = True):
    """Give every block our forward (same maths, real RoPE, chosen attention); optionally compiled.

    The forward is patched per instance (``block.forward``), so module hooks (e.g. the block offloader's)
    still run eagerly around it, and one compiled graph serves every block of the same structure. If the
    compiled forward fails before it ever succeeded (a compiler that cannot build here), every block falls
    back to the eager forward with one ``notice``; later failures are raised. ``pair`` lets a batched CFG
    pair through FP8 linears take the per-branch forward (:mod:`.pair_block`; off only for A/B runs).
    """
    dit._ex4d_block_levers = dict(attention=attention, compile_blocks=compile_blocks, compile_mode=compile_mode,
                                  compile_backend=compile_backend, notice=notice, self_attention=self_attention,
                                  pair=pair)
    cache = _RopeTableCache()
    core = block_forward
    if compile_blocks:
        import torch._dynamo

        from ..compiled import CompiledOrEager

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        core = CompiledOrEager(block_forward, what="speed lever compile", fallback="running the blocks eagerly",
                               notice=notice, dynamic=False, mode=compile_mode, backend=compile_backend)

    def run(block, x, context, t_mod, cos, sin, kv):
        return core(block, x, context, t_mod, cos, sin, attention, self_attention, pair, kv)

    def make(block):
        def forward(self, x, context, t_mod, freqs, context_kv=None):
            cos, sin = cache.get(freqs)
            kv = context_kv.get(self, context) if context_kv is not None else None
            return run(self, x, context, t_mod, cos, sin, kv)

        return types.MethodType(forward, block)

    for block in dit.blocks:
        if not _expected_block(block):
            raise TypeError(f"unexpected DiT block layout ({type(block).__name__}); levers need diffsynth 2.1.12's DiTBlock")
        block.forward = make(block)


def unpatch_block_forwards(dit) -> None:
    dit.__dict__.pop("_ex4d_block_levers", None)
    for block in dit.blocks:
        block.__dict__.pop("forward", None)


# ----------------------------------------------------------------------------------------------- apply


def _dit_of(target):
    return getattr(target, "dit", None) or target


def apply_speed_levers(target, levers=DEFAULT_LEVERS, *, device=None, compile_mode: str | None = None,
                       notice=warnings.warn) -> LeverReport:
    """Apply ``levers`` (names from :data:`ALL_LEVERS`) in place to a diffsynth WanModel or a pipeline with
    ``.dit``. Levers the machine cannot run are skipped with a notice; returns what was applied."""
    unknown = set(levers) - set(ALL_LEVERS) - set(PIPELINE_LEVERS)
    if unknown:
        raise ValueError(f"unknown speed levers: {sorted(unknown)} (known: {', '.join(ALL_LEVERS + PIPELINE_LEVERS)})")
    dit = _dit_of(target)
    device = torch.device(device) if device is not None else next(dit.parameters()).device
    unpatch_block_forwards(dit)  # re-applying replaces an earlier patch (e.g. fp8_ffn -> fp8)
    report = LeverReport()

    fp8_lever = "fp8" if "fp8" in levers else ("fp8_ffn" if "fp8_ffn" in levers else None)
    fp8_on = bool(fp8_lever) and report.probe(fp8_lever, fp8_supported(device))
    if fp8_on:
        convert_blocks_to_fp8(dit, FP8_LINEARS if fp8_lever == "fp8" else FFN_LINEARS)
    if "fast_accum" in levers:
        if report.probe("fast_accum", (fp8_on, "fast accumulation is the FP8 matmuls' (fp8 lever not applied)")):
            set_fast_accum(dit)

    attention = sdpa_default
    if "cudnn_attention" in levers and report.probe("cudnn_attention", cudnn_attention_supported(device)):
        attention = sdpa_cudnn

    self_attention = None
    if "fp8_attention" in levers:
        from .fp8_attention import fp8_attention_supported, sdpa_fp8

        if report.probe("fp8_attention", fp8_attention_supported(device)):
            self_attention = sdpa_fp8

    wants_patch = bool({"fused_rope", "compile"} & set(levers)) or attention is not sdpa_default or self_attention
    compile_blocks = "compile" in levers
    if compile_blocks:
        ok, why = compile_supported(device)
        if not ok:
            report.skipped["compile"] = why
            compile_blocks = False
    if wants_patch:
        patch_block_forwards(dit, attention=attention, compile_blocks=compile_blocks, compile_mode=compile_mode,
                             notice=notice, self_attention=self_attention)
        if "fused_rope" in levers or "compile" in levers:
            report.applied.append("fused_rope")
        if compile_blocks:
            report.applied.append("compile")
    if "cfg_batch" in levers:
        report.applied.append("cfg_batch")
    for lever, why in report.skipped.items():
        notice(f"speed lever {lever} skipped: {why}")
    return report


# ------------------------------------------------------------------------------------------ CFG batch


def cfg_noise_pred(model_fn, dit, *, latents, timestep, context_posi, context_nega, cfg_scale: float,
                   batched: bool = True, return_branches: bool = False, **shared):
    """Classifier-free-guided noise prediction, ``nega + cfg_scale * (posi - nega)``.

    ``batched`` runs both branches as one batch-2 forward (both contexts must have the same length, as
    Wan's padded 512-token text embeddings do); otherwise two passes, as the release does. ``shared`` are
    the keyword arguments both branches share (clip_feature, y, ...), each with batch 1.
    """
    if cfg_scale == 1.0:
        return model_fn(dit=dit, latents=latents, timestep=timestep, context=context_posi, **shared)
    if batched and context_posi.shape == context_nega.shape:
        both = {k: (torch.cat([v, v]) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 1 else v)
                for k, v in shared.items()}
        out = model_fn(dit=dit, latents=torch.cat([latents, latents]), timestep=timestep,
                       context=torch.cat([context_posi, context_nega]), **both)
        posi, nega = out.chunk(2)
    else:
        posi = model_fn(dit=dit, latents=latents, timestep=timestep, context=context_posi, **shared)
        nega = model_fn(dit=dit, latents=latents, timestep=timestep, context=context_nega, **shared)
    combined = nega + cfg_scale * (posi - nega)
    return (combined, posi, nega) if return_branches else combined


def install_cfg_batch(pipe) -> None:
    """Make an ``Ex4dPipeline`` predict both CFG branches in one batch-2 forward.

    Sets ``pipe.predict_noise`` on the instance (the pipeline's seam; its class is untouched). The
    pipeline's ``model_fn`` broadcasts batch-1 latents/y/clip/video tokens over a batch-2 context."""
    def predict_noise(latents, timestep, cond):
        kwargs = dict(dit=pipe.dit, latents=latents.to(pipe.torch_dtype),
                      timestep=timestep.to(dtype=pipe.torch_dtype, device=pipe.device),
                      clip_feature=cond.clip_feature, y=cond.y, video_tokens=cond.video_tokens,
                      context_kv=getattr(cond, "context_kv", None))
        if cond.negative_context is None or cond.cfg == 1.0:
            return pipe.model_fn(context=cond.context, cache_key="posi", **kwargs).float()
        if cond.context.shape != cond.negative_context.shape:  # cannot batch: two passes, as the release
            posi = pipe.model_fn(context=cond.context, cache_key="posi", **kwargs).float()
            nega = pipe.model_fn(context=cond.negative_context, cache_key="nega", **kwargs).float()
        else:
            posi, nega = pipe.model_fn(context=torch.cat([cond.context, cond.negative_context]), cache_key="cfg_pair",
                                       **kwargs).float().chunk(2)
        return nega + cond.cfg * (posi - nega)

    pipe.predict_noise = predict_noise


def set_fast_accum(dit, on: bool = True, max_k: int = FAST_ACCUM_MAX_K) -> int:
    """Fast FP8 accumulation for every :class:`Fp8Linear` of ``dit`` with at most ``max_k`` inputs."""
    count = 0
    for module in dit.modules():
        if isinstance(module, Fp8Linear):
            module.fast_accum = bool(on) and module.in_features <= max_k
            count += module.fast_accum
    return count


def install_vae_channels_last(pipe, on: bool = True) -> None:
    """The VAE lever of :mod:`.vae_speed` on an ``Ex4dPipeline``."""
    from . import vae_speed

    (vae_speed.install if on else vae_speed.uninstall)(pipe.vae)
    pipe.vae_channels_last = bool(on)


def accelerate_pipeline(pipe, levers=DEFAULT_LEVERS + PIPELINE_LEVERS, **kw) -> LeverReport:
    """:func:`apply_speed_levers` on ``pipe.dit`` plus the pipeline's levers: batched CFG on the noise
    prediction, the VAE's channels-last calls, the cross-attention keys/values kept per shot."""
    report = apply_speed_levers(pipe.dit, [lv for lv in levers if lv not in PIPELINE_LEVERS], **kw)
    if "cfg_batch" in levers:
        install_cfg_batch(pipe)
        report.applied.append("cfg_batch")
    if "context_kv_cache" in levers:  # takes effect in blocks with the levers' forward
        pipe.context_kv_cache = True
        report.applied.append("context_kv_cache")
    if "vae_channels_last" in levers:
        from .vae_speed import vae_channels_last_supported

        if report.probe("vae_channels_last", vae_channels_last_supported(pipe.device, pipe.memory_mode)):
            install_vae_channels_last(pipe)
        else:
            kw.get("notice", warnings.warn)(f"speed lever vae_channels_last skipped: {report.skipped['vae_channels_last']}")
    return report


from . import pair_block  # noqa: E402 - it builds on the classes above (Fp8Linear, rope_real, ...)
