"""Learned depth models: tiny random-initialised configs of the real classes, written to a temporary
folder in each published layout (save_pretrained / torch.save) and loaded back through the real
loading code. Small shapes (48x64, 5-7 frames) so the file runs in well under a minute on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from ex4d import errors  # noqa: E402
from ex4d.depth.models import DisparityToDepth, load_depth_model  # noqa: E402
from ex4d.depth.models.align import AlignConfig, align_disparity_sequence, fit_scale_shift  # noqa: E402

T, H, W = 5, 48, 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~10x faster than two contending."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def frames(count=T, seed=0):
    """A smooth moving gradient with some texture: not constant, so depth varies."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for t in range(count):
        base = (xx * 3 + yy * 2 + 7 * t) % 256
        img = np.stack([base, (base * 0.5 + 60) % 256, 255 - base], axis=-1)
        out.append(np.clip(img + rng.randint(0, 20, img.shape), 0, 255))
    return np.asarray(out, dtype=np.uint8)


def check_depth(pred, count=T):
    assert pred.depth.shape == (count, H, W)
    assert pred.depth.dtype == np.float32
    assert np.isfinite(pred.depth).all() and (pred.depth > 0).all()
    assert pred.K is None and pred.kind == "relative"


# --------------------------------------------------------------------------------------------------
# Tiny checkpoints in the published layouts
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def da_dir(tmp_path_factory):
    """Depth-Anything-V2-*-hf snapshot layout: config.json, model.safetensors, preprocessor_config.json."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    folder = tmp_path_factory.mktemp("da2")
    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False, apply_layernorm=True)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8)
    model = DepthAnythingForDepthEstimation(config)
    with torch.no_grad():  # a positive output bias so the (ReLU'd) random prediction is not all zero
        model.head.conv3.bias.fill_(0.5)
    model.save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, do_pad=False,
                      resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dc_dir(tmp_path_factory):
    """DepthCrafter/ (UNet) + stable-video-diffusion-img2vid-xt/{vae,image_encoder,feature_extractor,scheduler}."""
    from transformers import CLIPImageProcessor

    from ex4d.depth.models.depthcrafter import DepthCrafter, tiny_configs

    folder = tmp_path_factory.mktemp("depthcrafter")
    configs = tiny_configs()
    model = DepthCrafter.build_random(configs, device="cpu", dtype="fp32")
    model.unet.save_pretrained(folder / "DepthCrafter")  # tencent/DepthCrafter: UNet files at the repo root
    # the published UNet config names the release's subclass; the loader must not care
    unet_config = folder / "DepthCrafter" / "config.json"
    data = json.loads(unet_config.read_text())
    data["_class_name"] = "DiffusersUNetSpatioTemporalConditionModelDepthCrafter"
    unet_config.write_text(json.dumps(data))
    svd = folder / "stable-video-diffusion-img2vid-xt"
    model.vae.save_pretrained(svd / "vae", variant="fp16")  # SVD ships fp16 variants too
    model.image_encoder.save_pretrained(svd / "image_encoder", variant="fp16")
    model.scheduler.save_pretrained(svd / "scheduler")
    fe = configs["feature_extractor"]
    CLIPImageProcessor(image_mean=fe["image_mean"], image_std=fe["image_std"]).save_pretrained(svd / "feature_extractor")
    return folder


@pytest.fixture(scope="module")
def vda_dir(tmp_path_factory):
    """video_depth_anything_vits.pth, a flat state dict in the release's key layout."""
    from ex4d.depth.models import video_depth_anything as vda

    folder = tmp_path_factory.mktemp("vda")
    model = vda.VideoDepthAnything.build_random(vda.TINY, device="cpu", dtype="fp32")
    with torch.no_grad():
        model.network.head.scratch.output_conv2[2].bias.fill_(0.5)
    torch.save(vda.ours_to_release(model.network.state_dict()), folder / vda.CHECKPOINT)
    return folder


# --------------------------------------------------------------------------------------------------
# Each model end to end
# --------------------------------------------------------------------------------------------------


def test_depth_anything_v2_predicts_aligned_depth_at_input_size(da_dir):
    steps = []
    model = load_depth_model("depth-anything-v2-small", da_dir, device="cpu", batch_size=2)
    pred = model.predict(frames(), progress=lambda stage, step, total, *a: steps.append((stage, step, total)))
    check_depth(pred)
    assert pred.info["working_size"] == [42, 56]  # DPT resize rule: aspect kept, multiple of 14
    assert len(pred.info["align_scale_shift"]) == T
    assert steps[-1] == ("depth", 3, 3)  # 5 frames in batches of 2
    assert pred.depth.std() > 0


def test_depth_anything_v2_variants_share_the_loader(da_dir):
    model = load_depth_model("depth-anything-v2-large", da_dir, device="cpu", temporal_align=False)
    check_depth(model.predict(frames()))


def test_depthcrafter_windows_are_deterministic_for_a_seed(dc_dir):
    # window 4 / overlap 2 on 7 frames: three windows, so the stitching and noise rotation run
    model = load_depth_model("depthcrafter", dc_dir, device="cpu", window_size=4, overlap=2)
    assert model.settings.num_inference_steps == 5 and model.settings.guidance_scale == 1.0
    first = model.predict(frames(7))
    check_depth(first, 7)
    again = model.predict(frames(7))
    np.testing.assert_array_equal(first.depth, again.depth)
    other = load_depth_model("depthcrafter", dc_dir, device="cpu", window_size=4, overlap=2, seed=7).predict(frames(7))
    assert not np.array_equal(first.disparity, other.disparity)
    check_depth(load_depth_model("depthcrafter", dc_dir, device="cpu", window_size=3, overlap=0,
                                 num_inference_steps=1).predict(frames(7)), 7)  # back-to-back windows


def test_depthcrafter_release_defaults_and_guidance(dc_dir):
    from ex4d.depth.models.depthcrafter import DepthCrafterSettings

    s = DepthCrafterSettings()
    assert (s.num_inference_steps, s.window_size, s.overlap, s.guidance_scale, s.seed) == (5, 110, 25, 1.0, 42)
    model = load_depth_model("depthcrafter", dc_dir, device="cpu", num_inference_steps=2, guidance_scale=1.5)
    assert model.working_size(50, 70) == (48, 72)  # nearest multiple of 8 (tiny: VAE x4, UNet x2)
    guided = model.predict(frames(3))
    check_depth(guided, 3)
    offloaded = load_depth_model("depthcrafter", dc_dir, device="cpu", num_inference_steps=2, guidance_scale=1.5,
                                 offload=True).predict(frames(3))
    np.testing.assert_array_equal(guided.depth, offloaded.depth)


def test_depthcrafter_compiled_gives_the_eager_depth_and_falls_back(dc_dir, monkeypatch):
    """settings.compile runs the UNet and the decoder through torch.compile (aot_eager here: no C++ compiler
    needed) with the eager result; a compiler that cannot build falls back to eager with one warning."""
    import torch

    from ex4d.depth.models import depthcrafter

    eager = load_depth_model("depthcrafter", dc_dir, device="cpu", num_inference_steps=2).predict(frames(3))
    monkeypatch.setattr(depthcrafter, "COMPILE_BACKEND", "aot_eager")
    compiled = load_depth_model("depthcrafter", dc_dir, device="cpu", num_inference_steps=2, compile=True)
    try:
        np.testing.assert_allclose(compiled.predict(frames(3)).depth, eager.depth, rtol=1e-4, atol=1e-5)
        assert all(c.worked and not c.eager for c in compiled._compiled.values()) and len(compiled._compiled) == 2

        def broken(graph, example_inputs):
            raise RuntimeError("no compiler here")

        monkeypatch.setattr(depthcrafter, "COMPILE_BACKEND", broken)
        fresh = load_depth_model("depthcrafter", dc_dir, device="cpu", num_inference_steps=2, compile=True)
        with pytest.warns(UserWarning, match="depthcrafter: compiling .* failed here .*running eagerly") as seen:
            fallback = fresh.predict(frames(3))
            fresh.predict(frames(3))
        assert len([w for w in seen if "compiling unet" in str(w.message)]) == 1
        np.testing.assert_allclose(fallback.depth, eager.depth, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_video_depth_anything_predicts_at_input_size(vda_dir):
    model = load_depth_model("video-depth-anything-small", vda_dir, device="cpu", input_size=56)
    assert model.network.config.embed_dim == 64 and model.network.config.num_frames == 32
    pred = model.predict(frames())
    check_depth(pred)
    assert pred.info["working_size"] == [56, 70]  # shorter side >= 56, multiple of 14
    assert pred.depth.std() > 0


def test_video_depth_anything_key_layout_of_the_published_small_checkpoint():
    """Our module names -> release names must give exactly video_depth_anything_vits.pth's layout."""
    from accelerate import init_empty_weights

    from ex4d.depth.models import video_depth_anything as vda

    with init_empty_weights():
        net = vda.build_network(vda.SMALL)
    keys = set(vda.ours_to_release(net.state_dict()))
    expected = {"pretrained.cls_token", "pretrained.mask_token", "pretrained.pos_embed",
                "pretrained.patch_embed.proj.weight", "pretrained.patch_embed.proj.bias",
                "pretrained.norm.weight", "pretrained.norm.bias"}
    for i in range(12):
        for part in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            expected |= {f"pretrained.blocks.{i}.{part}.weight", f"pretrained.blocks.{i}.{part}.bias"}
        expected |= {f"pretrained.blocks.{i}.ls1.gamma", f"pretrained.blocks.{i}.ls2.gamma"}
    for i in range(4):
        expected |= {f"head.projects.{i}.weight", f"head.projects.{i}.bias", f"head.scratch.layer{i + 1}_rn.weight"}
        for unit in ("out_conv", "resConfUnit1.conv1", "resConfUnit1.conv2", "resConfUnit2.conv1", "resConfUnit2.conv2"):
            expected |= {f"head.scratch.refinenet{i + 1}.{unit}.weight", f"head.scratch.refinenet{i + 1}.{unit}.bias"}
        mm = f"head.motion_modules.{i}.temporal_transformer."
        for part in ("norm", "proj_in", "proj_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                     "transformer_blocks.0.ff_norm", "transformer_blocks.0.norms.0", "transformer_blocks.0.norms.1"):
            expected |= {mm + part + ".weight", mm + part + ".bias"}
        for a in (0, 1):
            blk = mm + f"transformer_blocks.0.attention_blocks.{a}."
            expected |= {blk + "to_q.weight", blk + "to_k.weight", blk + "to_v.weight", blk + "to_out.0.weight",
                         blk + "to_out.0.bias", blk + "pos_encoder.pe"}
    for i in (0, 1, 3):
        expected |= {f"head.resize_layers.{i}.weight", f"head.resize_layers.{i}.bias"}
    for name in ("output_conv1", "output_conv2.0", "output_conv2.2"):
        expected |= {f"head.scratch.{name}.weight", f"head.scratch.{name}.bias"}
    assert keys == expected
    shapes = {k: tuple(v.shape) for k, v in vda.ours_to_release(net.state_dict()).items()}
    assert shapes["pretrained.pos_embed"] == (1, 1370, 384)
    assert shapes["pretrained.blocks.0.attn.qkv.weight"] == (1152, 384)
    assert shapes["head.projects.3.weight"] == (384, 384, 1, 1)
    assert shapes["head.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"] == (1, 32, 192)


def test_video_depth_anything_window_stitching_recovers_the_clip():
    from ex4d.depth.models import video_depth_anything as vda

    rng = np.random.RandomState(1)
    n = 60  # three windows
    truth = [rng.rand(4, 5).astype(np.float32) + 1.0 for _ in range(n)]
    step = vda.INFER_LEN - vda.OVERLAP
    padded = list(range(n)) + [n - 1] * ((step - n % step) % step + vda.OVERLAP)
    windows, previous = [], None
    for k, start in enumerate(range(0, n, step)):
        idx = padded[start:start + vda.INFER_LEN]
        if previous is not None:
            idx[:vda.OVERLAP] = [previous[j] for j in vda.KEYFRAMES]
        previous = idx
        s, b = 1.0 + 0.5 * k, 0.2 * k  # each window: its own scale and shift
        windows.append([(truth[i] - b) / s for i in idx])
    np.testing.assert_allclose(vda.stitch_windows(windows, n), np.stack(truth), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Alignment and the disparity -> depth mapping
# --------------------------------------------------------------------------------------------------


def test_fit_scale_shift_is_exact_on_affine_data():
    rng = np.random.RandomState(0)
    p = rng.rand(1000)
    s, b = fit_scale_shift(p, 2.5 * p - 0.7)
    assert s == pytest.approx(2.5) and b == pytest.approx(-0.7)
    assert fit_scale_shift(np.ones(10), np.arange(10.0)) == (1.0, 0.0)  # degenerate: identity


def test_temporal_alignment_recovers_known_scale_and_shift_despite_outliers():
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:H, 0:W]
    base = (1.0 + np.sin(xx / 7.0) + yy / H).astype(np.float32)
    scales, shifts = [1.0, 0.5, 2.0, 3.0, 0.8], [0.0, 0.3, -1.0, 2.0, 0.1]
    seq = np.stack([(base - b) / s for s, b in zip(scales, shifts)]).astype(np.float32)
    seq[3, :8, :8] += 50.0  # a "moving object": must not spoil the fit
    aligned, params = align_disparity_sequence(seq, AlignConfig())
    for t in range(T):
        assert params[t, 0] == pytest.approx(scales[t], rel=1e-3)
        assert params[t, 1] == pytest.approx(shifts[t], abs=1e-3)
    np.testing.assert_allclose(aligned[4], base, atol=1e-3)


def test_release_disparity_to_depth_mapping():
    m = DisparityToDepth()
    depth, n = m.apply(np.array([[[0.0, 0.5, 1.0]]], dtype=np.float32) * 7 + 3)  # any affine input
    np.testing.assert_allclose(n, [[[0.0, 0.5, 1.0]]])
    np.testing.assert_allclose(depth, [[[1e4, 10000 / 1950, 10000 / 3900]]], rtol=1e-6)
    scaled, _ = DisparityToDepth(median_depth=2.0).apply(np.random.RandomState(0).rand(2, 4, 4))
    assert np.median(scaled) == pytest.approx(2.0)
    with pytest.raises(errors.InputError):
        DisparityToDepth(median_depth=-1.0)
    with pytest.raises(errors.InputError):
        DisparityToDepth(near=10.0, far=1.0)


def test_median_depth_option_reaches_the_prediction(da_dir):
    pred = load_depth_model("da2", da_dir, device="cpu", median_depth=3.0).predict(frames())
    assert np.median(pred.depth) == pytest.approx(3.0, rel=1e-4)
    assert pred.info["mapping"]["median_depth"] == 3.0


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_missing_weights_name_every_file_and_the_download_command(tmp_path):
    with pytest.raises(errors.WeightsError) as e:
        load_depth_model("depth-anything-v2-small", tmp_path, device="cpu")
    msg = str(e.value)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert name in msg
    assert "hf download depth-anything/Depth-Anything-V2-Small-hf" in msg and "\n" not in msg

    with pytest.raises(errors.WeightsError) as e:
        load_depth_model("depthcrafter", tmp_path, device="cpu")
    msg = str(e.value)
    for name in ("DepthCrafter/config.json", "DepthCrafter/diffusion_pytorch_model", "vae/config.json",
                 "image_encoder/model", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json"):
        assert name in msg
    assert "hf download tencent/DepthCrafter" in msg and "stable-video-diffusion-img2vid-xt" in msg

    with pytest.raises(errors.WeightsError) as e:
        load_depth_model("video-depth-anything-small", tmp_path, device="cpu")
    assert "video_depth_anything_vits.pth" in str(e.value) and "Video-Depth-Anything-Small" in str(e.value)

    with pytest.raises(errors.WeightsError, match="does not exist"):
        load_depth_model("depthcrafter", tmp_path / "nowhere", device="cpu")
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.WeightsError, match="not a folder"):
        load_depth_model("depthcrafter", tmp_path / "file", device="cpu")


def test_one_missing_component_is_named(dc_dir, tmp_path):
    import shutil

    copy = tmp_path / "dc"
    shutil.copytree(dc_dir, copy)
    (copy / "stable-video-diffusion-img2vid-xt" / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(errors.WeightsError) as e:
        load_depth_model("depthcrafter", copy, device="cpu")
    assert "vae/diffusion_pytorch_model.safetensors or" in str(e.value)
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in str(e.value)
    assert "DepthCrafter/" not in str(e.value).split("download")[0]  # only the missing file is listed


def test_depthcrafter_snapshot_from_before_the_unet_moved_to_the_root(dc_dir, tmp_path):
    import shutil

    copy = tmp_path / "dc"
    shutil.copytree(dc_dir, copy)
    (copy / "DepthCrafter" / "unet").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (copy / "DepthCrafter" / name).rename(copy / "DepthCrafter" / "unet" / name)
    assert load_depth_model("depthcrafter", copy, device="cpu").unet.config.in_channels == 8


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_unreadable_weights_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0)
    try:
        with pytest.raises(errors.WeightsError, match="not readable"):
            load_depth_model("vda", folder, device="cpu")
    finally:
        folder.chmod(0o755)


def test_key_mismatch_lists_missing_and_unexpected_keys(da_dir, dc_dir, vda_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    # Depth Anything: one renamed tensor
    da = tmp_path / "da"
    shutil.copytree(da_dir, da)
    state = load_file(da / "model.safetensors")
    state["head.conv3.renamed"] = state.pop("head.conv3.weight")
    save_file(state, da / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(errors.WeightsError) as e:
        load_depth_model("da2", da, device="cpu")
    assert "missing: head.conv3.weight" in str(e.value) and "unexpected: head.conv3.renamed" in str(e.value)

    # DepthCrafter: a UNet tensor dropped
    dc = tmp_path / "dc"
    shutil.copytree(dc_dir, dc)
    path = dc / "DepthCrafter" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state.pop("conv_out.weight")
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(errors.WeightsError, match="1 missing: conv_out.weight"):
        load_depth_model("depthcrafter", dc, device="cpu")

    # Video Depth Anything: a renamed and a reshaped tensor
    state = torch.load(vda_dir / "video_depth_anything_vits.pth", weights_only=True)
    state["pretrained.blocks.0.attn.qkv_typo.weight"] = state.pop("pretrained.blocks.0.attn.qkv.weight")
    state["head.projects.0.bias"] = torch.zeros(3)
    (tmp_path / "vda").mkdir()
    torch.save(state, tmp_path / "vda" / "video_depth_anything_vits.pth")
    with pytest.raises(errors.WeightsError) as e:
        load_depth_model("vda", tmp_path / "vda", device="cpu")
    msg = str(e.value)
    assert "missing: backbone.encoder.layer.0.attention" in msg
    assert "unexpected: pretrained.blocks.0.attn.qkv_typo.weight" in msg
    assert "wrong shape: head.projects.0.bias (3,)" in msg


def test_corrupt_checkpoint_is_a_weights_error(tmp_path):
    (tmp_path / "video_depth_anything_vits.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(errors.WeightsError, match="cannot read weights file"):
        load_depth_model("vda", tmp_path, device="cpu")


def test_out_of_memory_names_the_setting_to_lower(dc_dir):
    from ex4d.depth.models.base import out_of_memory_as_error

    model = load_depth_model("depthcrafter", dc_dir, device="cpu")
    with pytest.raises(errors.OutOfMemoryError) as e:
        with out_of_memory_as_error(model.name, model.memory_hint(), (49, 512, 512)):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "window_size (now 110)" in str(e.value) and "49 frames of 512x512" in str(e.value)
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors pass through untouched
        with out_of_memory_as_error(model.name, model.memory_hint(), (1, 8, 8)):
            raise RuntimeError("unrelated")


def test_bad_names_settings_inputs_and_cancel(da_dir):
    with pytest.raises(errors.InputError, match="unknown depth model"):
        load_depth_model("midas", da_dir)
    with pytest.raises(errors.InputError, match="unknown setting"):
        load_depth_model("da2", da_dir, device="cpu", window_size=3)
    model = load_depth_model("da2", da_dir, device="cpu")
    with pytest.raises(errors.InputError):
        model.predict(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(errors.InputError):
        model.predict(np.zeros((2, 8, 8, 3), np.float32))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(errors.Cancelled):
        model.predict(frames(), cancel=cancel)


def test_package_import_does_not_import_torch():
    code = "import sys, ex4d.depth.models as m; m.canonical_name('vda'); assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
