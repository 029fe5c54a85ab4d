"""FP8 self-attention through cuDNN's fused FP8 flash-attention kernel (``nvidia-cudnn-frontend``).

torch 2.11 reaches cuDNN's bf16 SDPA (the ``cudnn_attention`` lever) but not its FP8 variant, which on
Hopper runs Q K^T and P V on the FP8 tensor cores. This module builds that cuDNN graph through NVIDIA's
maintained Python frontend (the ``nvidia-cudnn-frontend`` wheel; optional: without it, or off Hopper/Ada,
:func:`fp8_attention_supported` says why and the lever is skipped) and exposes it as one torch custom op,
so a regionally compiled block keeps it inside its graph.

Numerics: Q, K and V are quantised to e4m3 with one scale per tensor (their absolute maximum over the
batch, heads and tokens: cuDNN takes one descale each); the softmax numerator exp(s - max) <= 1 is held
in FP8 with the fixed scale :data:`P_SCALE`; accumulation and the softmax statistics are fp32. On Hopper
cuDNN writes the output in e4m3 only (bf16 output is Blackwell-only): it is written on V's scale (an
attention output is a convex combination of rows of V, so it cannot overflow it) and dequantised to bf16.
Only the video tokens' self-attention uses it (13,312 x 13,312 at 512x512x49, where the time is); the
cross-attention to 512 text / 257 image tokens stays bf16.

Nothing here imports at ``import ex4d``; the frontend is imported on first use.
"""

from __future__ import annotations

import threading

import torch

from .accel import FP8_MAX  # largest finite e4m3

P_SCALE = 256.0  # exp(s - rowmax) in [0, 1] -> [0, 256] in e4m3; a power of two, so the descale is exact
_LOCK = threading.Lock()
_STATE: dict = {}  # "cudnn" module, "handle" per device, graphs per geometry


def _frontend():
    if "cudnn" not in _STATE:
        torch.backends.cudnn.version()  # loads torch's libcudnn first, so the frontend binds the same library
        import cudnn  # nvidia-cudnn-frontend

        _STATE["cudnn"] = cudnn
    return _STATE["cudnn"]


def fp8_attention_supported(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether cuDNN's FP8 attention can run on ``device`` (probes a tiny real call once per device)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "FP8 attention needs a CUDA GPU (running on CPU: bf16 attention)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"GPU compute capability {major}.{minor} < 8.9 has no FP8 matrix units"
    try:
        _frontend()
    except ImportError:
        return False, "nvidia-cudnn-frontend is not installed (pip install nvidia-cudnn-frontend --no-deps)"
    key = ("probe", str(device))
    if key not in _STATE:
        try:
            q = torch.randn(1, 64, 2, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
            out = sdpa_fp8(q, q, q)
            ref = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            _STATE[key] = (err < 0.1, f"cuDNN FP8 attention probe error {err:.3f} on this GPU")
        except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
            _STATE[key] = (False, f"cuDNN FP8 attention failed a probe call: {type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}")
    return _STATE[key]


def _graph(q8, k8, v8):
    """The cuDNN FP8 SDPA graph for this geometry (built once; keyed by shapes and strides)."""
    key = ("graph", q8.device.index, tuple(q8.shape), q8.stride(), tuple(k8.shape), k8.stride(), v8.stride())
    with _LOCK:
        if key in _STATE:
            return _STATE[key]
        cudnn = _frontend()
        hkey = ("handle", q8.device.index)
        if hkey not in _STATE:
            with torch.cuda.device(q8.device):
                _STATE[hkey] = cudnn.create_handle()
        handle = _STATE[hkey]
        g = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        fp8 = cudnn.data_type.FP8_E4M3
        tq = g.tensor(name="q", dim=list(q8.shape), stride=list(q8.stride()), data_type=fp8)
        tk = g.tensor(name="k", dim=list(k8.shape), stride=list(k8.stride()), data_type=fp8)
        tv = g.tensor(name="v", dim=list(v8.shape), stride=list(v8.stride()), data_type=fp8)
        scalars = {name: g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)
                   for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
        o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, **scalars, generate_stats=False,
                                          attn_scale=q8.shape[-1] ** -0.5, use_causal_mask=False)
        b, n, s, _ = q8.shape
        dv = v8.shape[-1]
        # O written as (b, s, n, d) in memory: merging the heads afterwards is a free view.
        o.set_output(True).set_dim([b, n, s, dv]).set_stride([s * n * dv, dv, n * dv, 1]).set_data_type(fp8)
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        workspace = torch.empty(max(g.get_workspace_size(), 1), device=q8.device, dtype=torch.uint8)
        consts = torch.tensor([1.0 / P_SCALE, P_SCALE], device=q8.device, dtype=torch.float32)
        amax = torch.zeros(2, device=q8.device, dtype=torch.float32)
        entry = dict(graph=g, handle=handle, workspace=workspace, q=tq, k=tk, v=tv, o=o, amax_s=amax_s,
                     amax_o=amax_o, scalars=scalars, consts=consts, amax=amax)
        _STATE[key] = entry
        return entry


@torch.library.custom_op("ex4d::cudnn_sdpa_fp8", mutates_args=())
def _cudnn_sdpa_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                    descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor) -> torch.Tensor:
    """(b, n, s, d) e4m3 Q/K/V with fp32 (1,) descales -> e4m3 output (times ``scale_o``) laid out (b, s, n, d)."""
    e = _graph(q8, k8, v8)
    cudnn = _STATE["cudnn"]
    b, n, s, _ = q8.shape
    out = torch.empty(b, s, n, v8.shape[-1], device=q8.device, dtype=torch.float8_e4m3fn)
    cudnn.set_stream(handle=e["handle"], stream=torch.cuda.current_stream(q8.device).cuda_stream)
    sc, c = e["scalars"], e["consts"]
    e["graph"].execute({
        e["q"]: q8, e["k"]: k8, e["v"]: v8, e["o"]: out,
        sc["descale_q"]: descale_q, sc["descale_k"]: descale_k, sc["descale_v"]: descale_v,
        sc["descale_s"]: c[0:1], sc["scale_s"]: c[1:2], sc["scale_o"]: scale_o,
        e["amax_s"]: e["amax"][0:1], e["amax_o"]: e["amax"][1:2],
    }, e["workspace"], handle=e["handle"])
    return out


@_cudnn_sdpa_fp8.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v, scale_o):
    b, n, s, _ = q8.shape
    return q8.new_empty(b, s, n, v8.shape[-1], dtype=torch.float8_e4m3fn)


def quantize_tensor_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One e4m3 scale for the whole tensor: (x_fp8 with x's strides, descale (1,) fp32)."""
    scale = (x.abs().amax().float().clamp(min=1e-12) / FP8_MAX).reshape(1)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def sdpa_fp8_e4m3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of (b, n, s, d) bf16 q/k/v (any strides) -> (e4m3 output laid out (b, s, n, d), its scale (1,)):
    output = e4m3 * scale. For a consumer that reads FP8 itself (the output projection's GEMM)."""
    q8, sq = quantize_tensor_fp8(q)
    k8, sk = quantize_tensor_fp8(k)
    v8, sv = quantize_tensor_fp8(v)
    return _cudnn_sdpa_fp8(q8, k8, v8, sq, sk, sv, 1.0 / sv), sv


def sdpa_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of (b, n, s, d) bf16 q/k/v (any strides) through cuDNN's FP8 kernel -> (b, n, s, d) bf16."""
    o8, sv = sdpa_fp8_e4m3(q, k, v)
    return (o8.float() * sv).to(q.dtype).transpose(1, 2)


def sdpa_fp8_e4m3_prequantized(q8: torch.Tensor, k8: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
                                v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sdpa_fp8_e4m3` for q and k already in e4m3 (q = q8 * descale_q), e.g. written by the kernel that
    normalises and rotates them (:func:`ex4d.generate.pair_kernels.rms_rope_pair`)."""
    v8, sv = quantize_tensor_fp8(v)
    return _cudnn_sdpa_fp8(q8, k8, v8, descale_q, descale_k, sv, 1.0 / sv), sv


# The per-branch block forward (pair_block) feeds the e4m3 output straight to its o GEMM, and may hand over
# q and k already quantised.
sdpa_fp8.e4m3_output = sdpa_fp8_e4m3
sdpa_fp8.e4m3_prequantized = sdpa_fp8_e4m3_prequantized
