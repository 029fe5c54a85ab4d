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
    assert set(report.skipped) == {"fp8", "fp8_attention", "cudnn_attention", "compile"}
    assert "fused_rope" in report.applied
    assert len(notices) == 4 and all("CPU" in n or "CUDA" in n for n in notices)
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
    assert "speedup_whole_shot" in ours and set(report["levers"]["skipped"]) == {"fp8", "cudnn_attention", "compile"}
    fastest = report["runs"]["ours_fastest"]  # on CPU: FP8 attention skipped with its reason, same maths
    assert "fp8_attention" in report["fastest_levers"]["skipped"] and "video_psnr_vs_reference_db" in fastest
