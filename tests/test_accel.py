"""CPU checks of the speed/memory levers (ex4d.generate.accel / offload) on a tiny real diffsynth WanModel.

Every lever must fall back cleanly where it cannot run (FP8, cuDNN, compile on CPU) and the ones that run
must compute the same function as diffsynth's code. No timing here (see bench/ and docs/benchmarks.md).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")

from ex4d.generate import accel, offload  # noqa: E402

TINY = dict(dim=256, in_dim=36, ffn_dim=512, out_dim=16, text_dim=32, freq_dim=256, eps=1e-6, patch_size=(1, 2, 2),
            num_heads=2, num_layers=3, has_image_input=True)


def tiny_dit(seed=0):
    from diffsynth.models.wan_video_dit import WanModel

    torch.manual_seed(seed)
    dit = WanModel(**TINY).eval().requires_grad_(False)
    for block in dit.blocks:  # non-trivial modulation so every branch matters
        block.modulation.data.normal_(0, 0.5)
    return dit


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(latents=r(1, 16, 2, 8, 8), y=r(1, 20, 2, 8, 8), clip_feature=r(1, 257, 1280),
                context_posi=r(1, 12, 32), context_nega=r(1, 12, 32), timestep=torch.tensor([700.0]))


def predict(dit, x, batched, scale=5.0):
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    with torch.no_grad():
        return accel.cfg_noise_pred(model_fn_wan_video, dit, latents=x["latents"], timestep=x["timestep"],
                                    context_posi=x["context_posi"], context_nega=x["context_nega"], cfg_scale=scale,
                                    batched=batched, clip_feature=x["clip_feature"], y=x["y"])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_cfg_batch_equals_two_passes():
    dit, x = tiny_dit(), inputs()
    two = predict(dit, x, batched=False)
    one = predict(dit, x, batched=True)
    assert one.shape == two.shape == x["latents"].shape
    assert rel(one, two) < 1e-5


def test_cfg_scale_one_is_a_single_pass():
    dit, x = tiny_dit(), inputs()
    calls = []

    def model_fn(**kw):
        calls.append(kw["context"].shape[0])
        return kw["latents"] * 0 + 1

    accel.cfg_noise_pred(model_fn, dit, latents=x["latents"], timestep=x["timestep"], context_posi=x["context_posi"],
                         context_nega=x["context_nega"], cfg_scale=1.0)
    assert calls == [1]


def test_real_rope_matches_diffsynth_complex_rope():
    from diffsynth.models.wan_video_dit import precompute_freqs_cis_3d, rope_apply

    f, h, w, heads, hd = 2, 3, 4, 2, 128
    freqs3 = precompute_freqs_cis_3d(hd)
    freqs = torch.cat([freqs3[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                       freqs3[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                       freqs3[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    x = torch.randn(2, f * h * w, heads * hd)
    cos, sin = accel.rope_cos_sin(freqs)
    assert rel(accel.rope_real(x, cos, sin, heads), rope_apply(x, freqs, heads)) < 1e-6


def test_patched_block_forward_is_the_same_function():
    dit, x = tiny_dit(), inputs()
    ref = predict(dit, x, batched=False)
    accel.patch_block_forwards(dit)
    try:
        assert rel(predict(dit, x, batched=False), ref) < 1e-5
        assert rel(predict(dit, x, batched=True), ref) < 1e-5
    finally:
        accel.unpatch_block_forwards(dit)
    assert "forward" not in dit.blocks[0].__dict__


def test_apply_levers_on_cpu_falls_back_with_notices():
    dit, x = tiny_dit(), inputs()
    ref = predict(dit, x, batched=False)
    notices = []
    report = accel.apply_speed_levers(dit, accel.ALL_LEVERS, notice=notices.append)
    assert set(report.skipped) == {"fp8", "fast_accum", "fp8_attention", "cudnn_attention", "compile"}
    assert "fused_rope" in report.applied
    assert len(notices) == 5 and all("CPU" in n or "CUDA" in n or "fp8 lever" in n for n in notices)
    assert all(isinstance(b.ffn[0], torch.nn.Linear) for b in dit.blocks)  # weights untouched
    assert rel(predict(dit, x, batched=True), ref) < 1e-5


def test_unknown_lever_is_refused():
    with pytest.raises(ValueError, match="unknown speed levers"):
        accel.apply_speed_levers(tiny_dit(), ["warp_drive"])


def test_fp8_support_probe_on_cpu():
    ok, why = accel.fp8_supported("cpu")
    assert not ok and "CPU" in why


def test_row_quantisation_roundtrip():
    x = torch.randn(64, 256) * torch.logspace(-2, 2, 64)[:, None]  # rows of very different scales
    q, scale = accel.quantize_rows_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = q.float() * scale
    assert float(back.abs().amax(dim=1).sub(x.abs().amax(dim=1)).abs().max()) < 1e-3 * float(x.abs().max())
    assert rel(back, x) < 0.05  # e4m3: 3 mantissa bits


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_fp8_linear_cfg_pair_keeps_the_guided_difference():
    """Batched CFG through an FP8 linear: coding posi as nega + delta keeps nega + 5 (posi - nega) about as
    close to full precision as one branch; quantising both rows independently multiplies the error."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(512, 256).requires_grad_(False)
    nega = torch.randn(1, 128, 512, generator=g)
    posi = nega + 0.03 * torch.randn(1, 128, 512, generator=g)  # two branches that differ a little
    ref = linear(torch.cat([posi, nega]))
    guided = lambda y: y[1] + 5.0 * (y[0] - y[1])  # noqa: E731

    fp8 = accel.Fp8Linear(linear)
    fp8.out_dtype = torch.float32  # compare without bf16 output rounding
    paired = fp8(torch.cat([posi, nega]))
    fp8.cfg_pair_delta = False
    independent = fp8(torch.cat([posi, nega]))
    single = fp8(nega)  # batch 1 never takes the pair path

    assert paired.shape == ref.shape == independent.shape
    assert _cosine(single[0], ref[1]) > 0.999 and _cosine(paired[1], ref[1]) > 0.999
    assert _cosine(guided(paired), guided(ref)) > 0.999
    assert _cosine(guided(independent), guided(ref)) < 0.99  # what the pair path fixes
    assert rel(paired[1], single[0]) < 1e-6  # nega's row is quantised exactly as alone


def test_block_offloader_cpu_path_keeps_outputs_and_restores():
    dit, x = tiny_dit(), inputs()
    ref = predict(dit, x, batched=True)
    off = offload.BlockOffloader(dit.blocks, "cpu", resident=1)
    assert off.streamed == [1, 2]
    for _ in range(2):  # twice: the wrap-around prefetch of the next forward must be right too
        assert rel(predict(dit, x, batched=True), ref) < 1e-6
    off.close(restore_to="cpu")
    assert not dit.blocks[1]._forward_pre_hooks
    assert rel(predict(dit, x, batched=True), ref) < 1e-6


def test_blocks_that_fit():
    dit = tiny_dit()
    per = offload.module_bytes(dit.blocks[0])
    assert offload.blocks_that_fit(list(dit.blocks), per) == 0
    assert offload.blocks_that_fit(list(dit.blocks), 4 * per) == 2
    assert offload.blocks_that_fit(list(dit.blocks), 100 * per) == 3


def test_module_swapper_cpu():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    ref = lin(x)
    swap = offload.ModuleSwapper(lin, "cpu")
    with swap.on_device() as m:
        assert torch.equal(m(x), ref)
    assert torch.equal(lin(x), ref)


@pytest.mark.slow
def test_ex4d_bench_tiny_cpu_report(tmp_path):
    """`ex4d bench` end to end on the tiny model: one JSON report, reference vs ours, every stage."""
    import json

    from ex4d.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--tiny", "--device", "cpu", "--frames", "5", "--size", "64", "--steps", "1",
               "--depth-model", "none", "--no-geometry", "--runs", "reference,ours,ours_fastest", "--json-out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    ref, ours = report["runs"]["reference"], report["runs"]["ours"]
    for run in (ref, ours):
        assert {"text_encoding", "image_encoding", "video_condition", "denoise_step", "vae_decode"} <= set(run["stages"])
    assert ours["noise_pred_cosine_vs_reference"]["min"] > 0.9999  # CPU: real RoPE + CFG batch only
    assert "speedup_whole_shot" in ours and set(report["levers"]["skipped"]) == {
        "fp8", "fast_accum", "cudnn_attention", "compile", "vae_channels_last"}
    assert "context_kv_cache" in report["levers"]["applied"]
    fastest = report["runs"]["ours_fastest"]  # on CPU: FP8 attention skipped with its reason, same maths
    assert "fp8_attention" in report["fastest_levers"]["skipped"] and "video_psnr_vs_reference_db" in fastest


# ------------------------------------------------------------------ the per-branch CFG-pair block (pair_block)


def _fp8_dit():
    dit = tiny_dit()
    accel.convert_blocks_to_fp8(dit)
    return dit


def test_pair_block_forward_is_the_batched_fp8_forward():
    """The per-branch block forward computes what the batch-2 FP8 forward does (fp32 weights here, so the
    same roundings happen in the same places and the two agree to float error)."""
    from ex4d.generate import pair_block

    dit, x = _fp8_dit(), inputs()
    accel.patch_block_forwards(dit, pair=False)
    batched = predict(dit, x, batched=True)
    accel.unpatch_block_forwards(dit)
    calls = []
    original = pair_block.block_forward
    pair_block.block_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        accel.patch_block_forwards(dit)
        per_branch = predict(dit, x, batched=True)
    finally:
        pair_block.block_forward = original
        accel.unpatch_block_forwards(dit)
    assert len(calls) == len(dit.blocks)
    assert rel(per_branch, batched) < 1e-5


def test_blocks_take_the_context_keys_values_from_a_context_kv():
    """Both block forwards (per-branch pair, plain) give exactly the same output from cached keys/values."""
    torch.manual_seed(0)
    dit = _fp8_dit()
    block = dit.blocks[0]
    context = torch.randn(2, 257 + 12, 256)
    t_mod = torch.randn(1, 6, 256)
    freqs = torch.polar(torch.ones(24, 1, 64, dtype=torch.float64), torch.randn(24, 1, 64, dtype=torch.float64))
    accel.patch_block_forwards(dit)
    try:
        for x in (torch.randn(2, 24, 256), torch.randn(1, 24, 256)):  # the pair form, then the plain one
            ctx = context[: x.shape[0]]
            cache = accel.ContextKV()
            plain = block(x, ctx, t_mod, freqs)
            assert torch.equal(block(x, ctx, t_mod, freqs, context_kv=cache.scope("s")), plain)
            assert torch.equal(block(x, ctx, t_mod, freqs, context_kv=cache.scope("s")), plain)
            assert len(cache) == 1 and len(cache.scope("s").get(block, ctx)) == 4  # text k/v + image k/v
    finally:
        accel.unpatch_block_forwards(dit)


def test_pair_block_feeds_an_e4m3_attention_output_to_the_o_gemm():
    """An attention that offers its e4m3 output (the FP8 kernel's) is read by the o projection as it is."""
    from ex4d.generate.fp8_attention import quantize_tensor_fp8

    dit, x = _fp8_dit(), inputs()
    ref = predict(dit, x, batched=True)
    seen = []

    def attention(q, k, v):
        return accel.sdpa_default(q, k, v)

    def e4m3_output(q, k, v):
        seen.append(q.shape)
        return quantize_tensor_fp8(accel.sdpa_default(q, k, v).transpose(1, 2).contiguous())

    attention.e4m3_output = e4m3_output
    accel.patch_block_forwards(dit, self_attention=attention)
    try:
        out = predict(dit, x, batched=True)
    finally:
        accel.unpatch_block_forwards(dit)
    assert len(seen) == len(dit.blocks) and seen[0][0] == 2
    assert _cosine(out, ref) > 0.995


_KERNEL_CHECK = r'''
import torch
from ex4d.generate import accel, pair_kernels as pk
assert pk.available(torch.empty(0))
torch.manual_seed(0)

def codes_agree(q, qr):
    # Equal codes, or one e4m3 step apart (a value on a rounding boundary: the kernel's fp32 arithmetic is not
    # torch's op for op), or Triton's interpreter artefact: it rounds a value just below a power of two down to
    # half of it (its fp8 cast does not carry into the exponent; the GPU's cvt does).
    a, b = q.float(), qr.float()
    step = torch.exp2(torch.floor(torch.log2(b.abs().clamp(min=2.0 ** -6))) - 3)
    ok = (a == b) | ((a - b).abs() <= step) | ((2 * a == b) & (torch.log2(b.abs()) == torch.log2(b.abs()).round()))
    return bool(ok.all()), float((a == b).float().mean())

# several chunks per row, a partial last one (D = 96, F = 200), and 2 programs walking the 6 tokens grid-stride
pk.LAUNCH = {name: pk.Launch(chunk=64, programs_per_sm=2) for name in pk.LAUNCH}
S, D, F = 6, 96, 200
x0 = torch.randn(S, D).bfloat16() * 3 + 1
x1 = (x0.float() + 0.05 * torch.randn(S, D)).bfloat16()
w, b = 1 + 0.3 * torch.randn(2, D), 0.1 * torch.randn(2, D)
q, s = pk.launch_ln_pair_quant(x0, x1, w, b, 1e-6)
ln = lambda x, i: torch.nn.functional.layer_norm(x.float(), (D,), eps=1e-6) * w[i] + b[i]
qr, sr = accel.quantize_pair(ln(x0, 0), ln(x1, 1))
ok, exact = codes_agree(q, qr)
assert ok and exact > 0.9 and torch.allclose(s, sr, rtol=1e-5), (ok, exact)

q, s = pk.launch_ln_pair_quant(x0, x1, x0, x0, 0.0, norm=False)  # the pair as it is
qr, sr = accel.quantize_pair(x0, x1)
ok, exact = codes_agree(q, qr)
assert ok and exact > 0.9 and torch.allclose(s, sr, rtol=1e-5), (ok, exact)

y = torch.randn(2 * S, F).bfloat16()
y[:S] *= 0.05
bias = torch.randn(F).bfloat16()
q, s = pk.launch_gelu_pair_quant(y, bias)
base = y[S:].float() + bias.float()
g = lambda t: torch.nn.functional.gelu(t, approximate="tanh")
qr, sr = accel.quantize_pair(g(base + y[:S].float()), g(base))
ok, exact = codes_agree(q, qr)
assert ok and exact > 0.9 and torch.allclose(s, sr, rtol=1e-5), (ok, exact)

n, hd = 3, 32
yq = torch.randn(2 * S, n * hd).bfloat16()
wq = (1 + 0.2 * torch.randn(n * hd)).bfloat16()
ang = torch.rand(S, hd // 2) * 6
cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
out = pk.launch_rms_rope_pair(yq, None, wq, cos, sin, 1e-6, None)
def ref(t):
    t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * wq.float()
    return accel.rope_real(t[None], cos[:, None], sin[:, None], n)[0]
r = torch.stack((ref(yq[S:].float() + yq[:S].float()), ref(yq[S:].float())))
assert float((out.float() - r).norm() / r.norm()) < 5e-3
scale = torch.tensor([(n * hd) ** 0.5 * float(wq.float().abs().max()) / 448])
o8 = pk.launch_rms_rope_pair(yq, None, wq, cos, sin, 1e-6, scale)
assert float((o8.float() * scale).abs().max()) <= float(scale) * 448 and float((o8.float() * scale - r).norm() / r.norm()) < 0.12
print("kernels ok")
'''


def test_pair_kernels_match_the_torch_expressions_in_the_interpreter():
    """The Triton kernels (LayerNorm / GELU pair quantisation, RMSNorm + RoPE) against the torch code they
    replace, run on CPU by Triton's interpreter (on the GPU: bench/dit_levers.py's pair_kernel_parity)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "kernels ok" in done.stdout, done.stderr[-2000:]


def test_pair_block_with_its_kernels_in_the_interpreter():
    """The whole tiny DiT through the per-branch block with the Triton kernels (interpreter) stays close to
    the batched FP8 forward, and traced by torch.compile (aot_eager) it gives the eager result."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = r'''
import sys, torch
sys.path.insert(0, "tests")
from test_accel import _fp8_dit, inputs, predict, rel, accel
from ex4d.generate import pair_kernels
dit, x = _fp8_dit(), inputs()
accel.patch_block_forwards(dit, pair=False)
batched = predict(dit, x, batched=True)
accel.unpatch_block_forwards(dit)
calls = []
for name in ("ln_pair_quant", "gelu_pair_quant", "rms_rope_pair"):
    fn = getattr(pair_kernels, name)
    setattr(pair_kernels, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
accel.patch_block_forwards(dit)
eager = predict(dit, x, batched=True)
accel.unpatch_block_forwards(dit)
accel.patch_block_forwards(dit, compile_blocks=True, compile_backend="aot_eager", notice=print)
compiled = predict(dit, x, batched=True)
assert set(calls) == {"ln_pair_quant", "gelu_pair_quant", "rms_rope_pair"}, set(calls)
print(rel(eager, batched), rel(compiled, eager))
assert rel(eager, batched) < 0.1 and rel(compiled, eager) < 1e-6
print("block ok")
'''
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0 and "block ok" in done.stdout, (done.stdout[-1000:], done.stderr[-2000:])
