"""Product speed settings, memory mode ``stream`` and the preview step cache on the tiny pipeline (CPU).

GPU-only levers (cuDNN attention, FP8 matmuls, compile) cannot run here: their plans are checked with the
support probes replaced, their fall-backs for real. Timings: bench/generate_gpu.py, docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")
pytest.importorskip("peft")

from ex4d.errors import InputError  # noqa: E402
from ex4d.generate import accel, fp8_attention, load_generator  # noqa: E402
from ex4d.generate.preview_cache import (  # noqa: E402
    TEACACHE_WAN21_I2V_480P,
    PreviewCache,
    rising_limit,
)
from ex4d.generate.speed import plan_speed  # noqa: E402

from conftest import small_guide_clip  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip():
    return small_guide_clip()


@pytest.fixture(scope="module")
def reference(clip):
    gen = load_generator("tiny", speed="reference")
    return gen, gen.generate(clip[0], clip[1], steps=4)


@pytest.fixture(scope="module")
def fast():
    with pytest.warns(UserWarning, match="speed fast: .*not used"):
        return load_generator("tiny")


# ------------------------------------------------------------------------------------------------ speed


def test_bad_options_are_clear_errors():
    with pytest.raises(InputError, match="unknown speed 'warp'"):
        load_generator("tiny", speed="warp")
    with pytest.raises(InputError, match="--vram-limit applies to --memory-mode stream"):
        load_generator("tiny", vram_limit_gb=8)
    with pytest.raises(InputError, match="--vram-limit must be a number of GB >= 0"):
        load_generator("tiny", memory_mode="stream", vram_limit_gb=-1)
    with pytest.raises(InputError, match="--preview-cache must be a number >= 0"):
        load_generator("tiny", preview_cache=-0.1)
    with pytest.raises(InputError, match="unknown memory mode"):
        load_generator("tiny", memory_mode="swap")


def test_reference_and_cpu_fast_plans():
    ref = plan_speed("reference", "resident", "cpu")
    assert ref.levers == () and not ref.skipped and not ref.notices()
    fast = plan_speed("fast", "resident", "cpu")
    assert fast.levers == ("cfg_batch",) and fast.fp8_matmul == ()
    assert set(fast.skipped) == {"cudnn_attention", "fused_rope", "fp8", "fast_accum", "compile", "vae_channels_last",
                                 "context_kv_cache"}
    assert len(fast.notices()) == 1  # one line per reason


@pytest.fixture
def gpu_probes(monkeypatch):
    """Pretend the probes found an FP8 GPU with Triton and cuDNN attention (plans only; nothing runs)."""
    state = {"compile": (True, ""), "fp8": (True, ""), "cudnn": (True, "")}
    monkeypatch.setattr(accel, "compile_supported", lambda device=None: state["compile"])
    monkeypatch.setattr(accel, "fp8_supported", lambda device=None: state["fp8"])
    monkeypatch.setattr(accel, "cudnn_attention_supported", lambda device=None: state["cudnn"])
    monkeypatch.setattr(fp8_attention, "fp8_attention_supported", lambda device=None: state["fp8_attention"])
    state["fp8_attention"] = (True, "")
    return state


def test_fastest_adds_fp8_attention_where_it_can_run(gpu_probes):
    fastest = plan_speed("fastest", "resident", "cuda")
    assert fastest.levers == ("cudnn_attention", "fused_rope", "fp8", "fp8_attention", "fast_accum", "compile",
                              "cfg_batch", "vae_channels_last", "context_kv_cache")
    assert plan_speed("fast", "resident", "cuda").levers == tuple(lv for lv in fastest.levers if lv != "fp8_attention")
    gpu_probes["fp8_attention"] = (False, "nvidia-cudnn-frontend is not installed")
    without = plan_speed("fastest", "stream", "cuda")
    assert "fp8_attention" not in without.levers and "fp8" in without.levers
    assert any("nvidia-cudnn-frontend" in line for line in without.notices())
    on_cpu = plan_speed("fastest", "resident", "cpu")
    assert on_cpu.levers == ("cfg_batch",) and len(on_cpu.notices()) == 1


def test_cuda_plans_per_memory_mode(gpu_probes):
    every = ("cudnn_attention", "fused_rope", "fp8", "fast_accum", "compile", "cfg_batch", "vae_channels_last",
             "context_kv_cache")
    for mode in ("resident", "stream"):
        plan = plan_speed("fast", mode, "cuda")
        assert plan.levers == (every if mode == "resident" else every[:-1])
        assert plan.fp8_matmul == accel.FP8_LINEARS and plan.fp8_weight_only == ()
    fp8 = plan_speed("fast", "fp8", "cuda")
    assert fp8.levers == every[:-1] and "1.3 GB" in fp8.skipped["context_kv_cache"]
    assert fp8.fp8_matmul == accel.FP8_LINEARS and "cross_attn.k_img" in fp8.fp8_weight_only
    offload = plan_speed("fast", "offload", "cuda")
    assert offload.levers == ("cudnn_attention", "fused_rope", "cfg_batch") and offload.fp8_matmul == ()
    assert "stream" in offload.skipped["compile"] and "layer by layer" in offload.skipped["vae_channels_last"]
    gpu_probes["compile"] = (False, "Triton is not installed")
    no_triton = plan_speed("fast", "resident", "cuda")
    assert no_triton.levers == ("cudnn_attention", "fused_rope", "cfg_batch", "vae_channels_last", "context_kv_cache")
    assert "compiled quantisation" in no_triton.skipped["fp8"]
    gpu_probes["fp8"] = (False, "GPU compute capability 8.6 < 8.9 has no FP8 matrix units")
    assert "8.6" in plan_speed("fast", "fp8", "cuda").skipped["fp8"]  # fp8 mode keeps weight-only storage


def test_fast_on_cpu_batches_cfg_and_matches_reference(clip, reference, fast):
    ref_gen, ref_out = reference
    assert ref_gen.speed == "reference" and not ref_gen.pipe.batch_cfg
    assert fast.speed == "fast" and fast.pipe.batch_cfg
    assert fast.info()["levers"]["levers"] == ["cfg_batch"]
    out = fast.generate(clip[0], clip[1], steps=4)
    assert out.shape == clip[0].shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref_out).max() <= 1


def test_vae_channels_last_lever_keeps_the_output(clip, reference):
    """The VAE lever is a GPU gain, but its code path (direct call, channels-last 3-D convolutions) runs on
    CPU too: the whole tiny shot with it equals the release's calls."""
    from ex4d.generate import vae_speed

    ref_gen, ref_out = reference
    pipe = ref_gen.pipe
    convs = [m for m in pipe.vae.model.modules() if isinstance(m, torch.nn.Conv3d)]
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    released = pipe.vae.encode([video[0]], device="cpu")
    accel.install_vae_channels_last(pipe)
    try:
        assert pipe.vae_channels_last and all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs)
        latents = vae_speed.encode(pipe.vae, video, "cpu")
        assert latents.is_contiguous() and torch.allclose(latents, released, atol=1e-5)
        decoded = vae_speed.decode(pipe.vae, latents, "cpu")
        assert decoded.shape == video.shape and float(decoded.abs().max()) <= 1.0
        assert torch.allclose(decoded, pipe.vae.decode([latents[0]], device="cpu"), atol=1e-5)
        out = ref_gen.generate(clip[0], clip[1], steps=4)
    finally:
        accel.install_vae_channels_last(pipe, on=False)
    assert not pipe.vae_channels_last and all(c.weight.is_contiguous() for c in convs)
    assert np.abs(out.astype(int) - ref_out).max() <= 1
    assert vae_speed.vae_channels_last_supported("cpu")[0] is False


@pytest.mark.parametrize("batched", [False, True])
def test_context_kv_cache_is_exact_and_computes_once(clip, batched):
    """The cross-attention keys/values of a shot's context come from the first step; every later step gives
    exactly what recomputing them gives, with the k/v projections not run again."""
    gen = load_generator("tiny", speed="reference")
    pipe = gen.pipe
    accel.patch_block_forwards(pipe.dit)  # the levers' forward (eager on CPU), which takes the cached k/v
    if batched:
        accel.install_cfg_batch(pipe)
    from ex4d.generate.conditioning import prepare_clip

    prepared = prepare_clip(clip[0], clip[1], seed=0)
    color = torch.as_tensor(prepared.color)
    cond = pipe.prepare(color, torch.as_tensor(prepared.mask), prompt="a garden", negative_prompt="blur", cfg=5.0)
    latents = pipe.initial_noise(color.shape[1], color.shape[2], color.shape[3], 0)
    steps = [torch.tensor([t]) for t in (900.0, 500.0, 100.0)]
    with torch.no_grad():
        plain = [pipe.predict_noise(latents, t, cond) for t in steps]
        calls = []
        hooks = [b.cross_attn.k.register_forward_hook(lambda *a: calls.append(1)) for b in pipe.dit.blocks]
        cond.context_kv = accel.ContextKV()
        try:
            cached = [pipe.predict_noise(latents, t, cond) for t in steps]
        finally:
            for h in hooks:
                h.remove()
    blocks = len(pipe.dit.blocks)
    passes = 1 if batched else 2  # one batched pair, or posi and nega each in its own scope
    assert len(cond.context_kv) == blocks * passes and len(calls) == blocks * passes
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)


def test_fast_accumulation_only_for_short_sums():
    torch.manual_seed(0)
    block = torch.nn.ModuleDict({"attn": torch.nn.Linear(64, 64), "down": torch.nn.Linear(128, 64)})
    for name in ("attn", "down"):
        block[name] = accel.Fp8Linear(block[name])
    assert accel.set_fast_accum(block, max_k=64) == 1
    assert block["attn"].fast_accum and not block["down"].fast_accum
    assert accel.set_fast_accum(block, on=False) == 0 and not block["attn"].fast_accum
    assert accel.set_fast_accum(block) == 2  # both sums are short of the default bound (8192)
    assert accel.FAST_ACCUM_MAX_K == 8192


def test_compile_failure_falls_back_to_eager_once():
    from diffsynth.models.wan_video_dit import WanModel

    from ex4d.generate.architectures import DIT_TINY

    torch.manual_seed(0)
    dit = WanModel(**DIT_TINY).eval().requires_grad_(False)
    x = torch.randn(1, 24, 256)
    context = torch.randn(1, 257 + 12, 256)
    t_mod = torch.randn(1, 6, 256)
    freqs = torch.polar(torch.ones(24, 1, 64, dtype=torch.float64), torch.randn(24, 1, 64, dtype=torch.float64))
    accel.patch_block_forwards(dit)
    eager = dit.blocks[0](x, context, t_mod, freqs)

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    notes = []
    accel.patch_block_forwards(dit, compile_blocks=True, compile_backend=broken_backend, notice=notes.append)
    try:
        for _ in range(2):
            assert torch.allclose(dit.blocks[0](x, context, t_mod, freqs), eager)
    finally:
        accel.unpatch_block_forwards(dit)
        torch._dynamo.reset()
    assert len(notes) == 1 and "compile failed" in notes[0] and "eagerly" in notes[0]


def test_fp8_weight_only_linear_and_float8_storage():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    lin.weight.data *= torch.logspace(-3, 0, 32)[:, None]  # rows of very different scales
    x = torch.randn(5, 64)
    lin.requires_grad_(False)
    ref = lin(x)
    wo = accel.Fp8WeightOnlyLinear(lin, torch.float32)
    assert wo.weight_fp8.dtype == torch.float8_e4m3fn
    assert float((wo(x) - ref).norm() / ref.norm()) < 0.05
    stored = torch.nn.Linear(64, 32)  # a diffsynth-style fp8 storage: a plain cast, no scale
    stored.weight.data = lin.weight.data.to(torch.float8_e4m3fn)
    stored.bias.data = lin.bias.data.to(torch.float8_e4m3fn)
    plain = accel._merged_linear(stored, torch.float32)
    assert plain.weight.dtype == torch.float32 and plain.weight.shape == lin.weight.shape
    # the per-channel scale keeps small rows that a plain cast flushes towards zero
    small = slice(0, 8)
    err_scaled = float((wo.weight_fp8.float() * wo.weight_scale - lin.weight)[small].norm())
    err_cast = float((plain.weight - lin.weight)[small].norm())
    assert err_scaled < err_cast


# ----------------------------------------------------------------------------------------------- stream


def test_stream_mode_streams_blocks_and_keeps_the_output(clip, reference):
    _, ref_out = reference
    gen = load_generator("tiny", memory_mode="stream", vram_limit_gb=0, speed="reference")
    pipe = gen.pipe
    plan = pipe.stream_plan
    assert gen.memory_mode == "stream" and plan["resident_blocks"] == 0 and plan["streamed_blocks"] == 2
    assert pipe.block_offloader is not None and pipe.text_swapper is not None
    assert "pinned host memory" in plan["text_encoder"]
    out = gen.generate(clip[0], clip[1], steps=4)
    assert out.shape == clip[0].shape
    assert np.abs(out.astype(int) - ref_out).max() <= 2  # only the merged LoRA's rounding differs
    roomy = load_generator("tiny", memory_mode="stream", vram_limit_gb=64, speed="reference").pipe
    assert roomy.block_offloader is None and roomy.text_swapper is None
    assert roomy.stream_plan["text_encoder"] == "resident" and roomy.stream_plan["streamed_blocks"] == 0


def test_out_of_memory_names_stream(clip, monkeypatch):
    from ex4d.errors import OutOfMemoryError

    gen = load_generator("tiny", speed="reference")

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gen.pipe, "generate_clip", oom)
    with pytest.raises(OutOfMemoryError, match="--memory-mode stream"):
        gen.generate(clip[0], clip[1], steps=1)


# -------------------------------------------------------------------------------------------- preview


def test_preview_cache_decisions():
    cache = PreviewCache(0.5, metric="x_mod")  # raw relative L1
    x = torch.zeros(1, 3, 4)
    cache.start(5)
    decisions = []
    for step, value in enumerate([1.0, 1.1, 1.2, 1.5, 1.6]):
        cache.set_step(step)
        skip = cache.should_skip("posi", torch.full((4,), value), x)
        if not skip:
            cache.store("posi", x, x + 1)
        decisions.append(skip)
    # step 0 and the last are computed; 0.1 + 0.09 < 0.5 skip; + 0.25 = 0.44 skip; last computed
    assert decisions == [False, True, True, True, False]
    assert cache.stats()["skipped_steps"] == [1, 2, 3] and cache.skipped_forwards == 3 and cache.forwards == 5
    assert torch.equal(cache.reuse("posi", x), x + 1)
    # the published Wan "t" curve is only rising up to ~0.34: a larger change always computes
    assert abs(rising_limit(TEACACHE_WAN21_I2V_480P["t"]) - 0.344) < 1e-3
    big = PreviewCache(1e9, metric="t")
    big.start(3)
    for step, value in enumerate([1.0, 2.0, 3.0]):
        big.set_step(step)
        assert not big.should_skip("posi", torch.full((4,), value), x)
        big.store("posi", x, x)
    with pytest.raises(ValueError, match="metric"):
        PreviewCache(0.1, metric="warp")


@pytest.mark.parametrize("batched", [False, True])
def test_preview_cache_threshold_zero_is_bit_identical(clip, batched):
    gen = load_generator("tiny", speed="reference")
    gen.pipe.batch_cfg = batched
    plain = gen.generate(clip[0], clip[1], steps=4)
    assert gen.last_run["preview_cache"] is None
    assert np.array_equal(gen.generate(clip[0], clip[1], steps=4, preview_cache=0), plain)
    # the cache's code path itself (probe, residual store) at threshold 0, on every probe
    for metric in ("t", "t_mod", "x_mod"):
        cache = PreviewCache(0.0, metric=metric)
        inner = gen.pipe.generate_clip

        def with_cache(*a, **k):
            gen.pipe.step_cache = cache
            return inner(*a, **k)

        gen.pipe.generate_clip = with_cache
        try:
            out = gen.generate(clip[0], clip[1], steps=4)
        finally:
            del gen.pipe.generate_clip
        assert np.array_equal(out, plain), metric
        assert cache.forwards == 8 and cache.skipped_forwards == 0


@pytest.mark.parametrize("batched", [False, True])
def test_preview_cache_skips_forwards(clip, batched, caplog):
    import logging

    gen = load_generator("tiny", speed="reference", preview_metric="x_mod")
    gen.pipe.batch_cfg = batched
    plain = gen.generate(clip[0], clip[1], steps=6)
    with caplog.at_level(logging.INFO, logger="ex4d.generate"):
        out = gen.generate(clip[0], clip[1], steps=6, preview_cache=10.0)
    stats = gen.last_run["preview_cache"]
    assert out.shape == plain.shape and out.dtype == np.uint8
    assert stats["forwards"] == 12 and stats["skipped_forwards"] == 8  # steps 1-4 of 6, both CFG branches
    assert stats["skipped_steps"] == [1, 2, 3, 4] and len(stats["probe_changes"]) == 4
    assert not np.array_equal(out, plain) and np.abs(out.astype(int) - plain).mean() < 40
    assert "skipped 8 of 12 DiT forwards" in caplog.text
    # random time-embedding weights change far beyond the published fit: the "t" probe computes every step
    gen.preview_metric = "t"
    assert np.array_equal(gen.generate(clip[0], clip[1], steps=6, preview_cache=10.0), plain)
    assert gen.last_run["preview_cache"]["skipped_forwards"] == 0
    # the default threshold of a generator applies when a call gives none
    gen.preview_metric, gen.preview_cache = "x_mod", 10.0
    gen.generate(clip[0], clip[1], steps=6)
    assert gen.last_run["preview_cache"]["skipped_forwards"] == 8


def test_preview_cache_over_windows(clip):
    color = np.concatenate([clip[0]] * 3)[:13]
    mask = np.concatenate([clip[1]] * 3)[:13]
    gen = load_generator("tiny", speed="reference", window=9, overlap=4, preview_metric="x_mod", preview_cache=10.0)
    out = gen.generate(color, mask, steps=4)
    stats = gen.last_run["preview_cache"]
    assert out.shape == color.shape and stats["steps"] == 8
    assert stats["skipped_steps"] == [1, 2, 5, 6]  # per window: first and last computed


def test_cli_speed_preview_and_vram_flags(tmp_path, capsys, clip):
    from ex4d.cli import main

    guides = tmp_path / "g.npz"
    np.savez(guides, color=clip[0], mask=clip[1])
    out = tmp_path / "shot.mp4"
    code = main(["generate", "--guides", str(guides), "--generator", "tiny", "--steps", "3", "--speed", "reference",
                 "--preview-cache", "0.2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and out.is_file(), err
    assert "generation: memory mode resident; speed reference" in err and "preview cache 0.2: skipped 0 of 6" in err
    code = main(["generate", "--guides", str(guides), "--generator", "tiny", "--vram-limit", "8", "--out", str(out)])
    assert code == 2 and "--vram-limit applies to --memory-mode stream" in capsys.readouterr().err
    code = main(["generate", "--guides", str(guides), "--generator", "tiny", "--memory-mode", "stream", "--vram-limit", "0",
                 "--speed", "reference", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and "memory mode stream" in err and "2 of 2 DiT blocks streamed" in err
