"""EX-4D adapter on tiny real diffsynth Wan classes: condition hook, LoRA targets, strict checkpoint loading."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")
pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

from ex4d.errors import WeightsError  # noqa: E402
from ex4d.generate.adapter import (  # noqa: E402
    LAYOUT_FLAT,
    LAYOUT_PREFIXED,
    AdapterCheckpointError,
    VideoConditionEncoder,
    adapter_state_dict,
    add_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    read_state_dict,
)
from ex4d.generate.architectures import ARCHITECTURES, make_condition_encoder, make_dit  # noqa: E402
from ex4d.generate.pipeline import ex4d_model_fn  # noqa: E402

TINY = ARCHITECTURES["tiny"]


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    return make_dit(TINY).eval().requires_grad_(False)


def dit_inputs(seed=1, frames=2, h=4, w=6, batch=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(1, 16, frames, h, w, generator=g),
        timestep=torch.tensor([700.0]),
        context=torch.randn(batch, 7, TINY.dit["text_dim"], generator=g),
        clip_feature=torch.randn(1, 257, 1280, generator=g),
        y=torch.randn(1, 20, frames, h, w, generator=g),
    )


def encoder_tokens(encoder, frames=2, h=4, w=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = encoder(torch.randn(1, 16, frames, h, w, generator=g), torch.randn(1, 16, frames, h, w, generator=g))
    return out.flatten(2).transpose(1, 2)


def test_condition_encoder_layout_and_zero_output():
    enc = VideoConditionEncoder(16, 1024, 5120)
    names = {n: tuple(p.shape) for n, p in enc.named_parameters()}
    assert names == {
        "latent_encoder.0.weight": (1024, 32, 1, 1, 1), "latent_encoder.0.bias": (1024,),
        "latent_encoder.2.weight": (1024, 1024, 1, 1, 1), "latent_encoder.2.bias": (1024,),
        "latent_encoder.4.weight": (1024, 1024, 1, 1, 1), "latent_encoder.4.bias": (1024,),
        "latent_patch_embedding.weight": (5120, 1024, 1, 2, 2), "latent_patch_embedding.bias": (5120,),
    }
    assert abs(sum(p.numel() for p in enc.parameters()) / 1e6 - 23.1) < 0.1  # the facts' 23.1 M
    small = make_condition_encoder(TINY)
    out = small(torch.randn(1, 16, 3, 4, 6), torch.randn(1, 16, 3, 4, 6))
    assert out.shape == (1, TINY.dit["dim"], 3, 2, 3)
    assert torch.count_nonzero(out) == 0


@torch.no_grad()
def test_zero_initialised_encoder_and_fresh_lora_leave_base_prediction_exactly_unchanged():
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    base = tiny_dit()
    inputs = dit_inputs()
    reference = model_fn_wan_video(dit=base, **inputs)
    adapted = add_lora(tiny_dit())  # peft init: lora_B = 0
    tokens = encoder_tokens(make_condition_encoder(TINY))
    out = ex4d_model_fn(adapted, video_tokens=tokens, **inputs)
    assert out.shape == (1, 16, 2, 4, 6)
    assert torch.equal(out, reference)


@torch.no_grad()
def test_hook_matches_diffsynth_control_adapter_path_and_batched_cfg():
    """Our explicit model function == diffsynth's model_fn_wan_video with dit.control_adapter (batch 1)."""
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    dit = tiny_dit()
    encoder = make_condition_encoder(TINY)
    torch.nn.init.normal_(encoder.latent_patch_embedding.weight, std=0.05)
    g = torch.Generator().manual_seed(3)
    lat_c, lat_m = torch.randn(1, 16, 2, 4, 6, generator=g), torch.randn(1, 16, 2, 4, 6, generator=g)
    grid = encoder(lat_c, lat_m)
    inputs = dit_inputs()

    class Hook(torch.nn.Module):  # diffsynth adds control_adapter(x) to the patch-embedded grid
        def forward(self, _):
            return grid

    dit.control_adapter = Hook()
    reference = model_fn_wan_video(dit=dit, control_camera_latents_input=torch.zeros(1), **inputs)
    dit.control_adapter = None
    ours = ex4d_model_fn(dit, video_tokens=grid.flatten(2).transpose(1, 2), **inputs)
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, model_fn_wan_video(dit=dit, **inputs))  # the tokens do act

    # batched CFG (context batch 2) == two separate passes
    neg = torch.randn_like(inputs["context"])
    both = ex4d_model_fn(dit, video_tokens=grid.flatten(2).transpose(1, 2), **{**inputs, "context": torch.cat([inputs["context"], neg])})
    single_neg = ex4d_model_fn(dit, video_tokens=grid.flatten(2).transpose(1, 2), **{**inputs, "context": neg})
    torch.testing.assert_close(both[:1], ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:], single_neg, rtol=1e-5, atol=1e-5)


def test_lora_targets_rank_and_dtype():
    dit = add_lora(tiny_dit())
    modules = lora_modules(dit)
    layers = TINY.dit["num_layers"]
    assert len(modules) == layers * 10  # self q,k,v,o + cross q,k,v,o + ffn.0 + ffn.2 per block
    suffixes = sorted({n.split(".", 2)[2] for n in modules})
    assert suffixes == sorted([f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"])
    assert not any("k_img" in n or "v_img" in n for n in modules)
    for m in modules.values():
        assert m.r["default"] == 16 and m.scaling["default"] == 1.0
    lora_params = {n: p for n, p in dit.named_parameters() if "lora_" in n}
    assert all(p.dtype == torch.float32 for p in lora_params.values())
    assert "blocks.0.self_attn.q.lora_A.default.weight" in lora_params
    # the full model: 40 blocks x 10 layers, 76.7 M LoRA parameters (the facts)
    d, f = 5120, 13824
    full = 40 * (8 * 16 * (d + d) + 16 * (d + f) + 16 * (f + d))
    assert abs(full / 1e6 - 76.7) < 0.1


@torch.no_grad()
def test_merged_lora_matches_separate_lora():
    dit = add_lora(tiny_dit())
    for n, p in dit.named_parameters():
        if "lora_" in n:
            p.normal_(std=0.05)
    inputs = dit_inputs()
    separate = ex4d_model_fn(dit, **inputs)
    assert merge_lora(dit) == TINY.dit["num_layers"] * 10
    assert not lora_modules(dit)
    torch.testing.assert_close(ex4d_model_fn(dit, **inputs), separate, rtol=1e-4, atol=1e-4)


def _random_adapter(seed=5):
    dit = add_lora(tiny_dit())
    enc = make_condition_encoder(TINY)
    g = torch.Generator().manual_seed(seed)
    for module in (dit, enc):
        for n, p in module.named_parameters():
            if module is enc or "lora_" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.02
    return dit, enc


def test_checkpoint_round_trip_both_layouts(tmp_path):
    from safetensors.torch import save_file

    src_dit, src_enc = _random_adapter()
    flat = adapter_state_dict(src_dit, src_enc)
    assert "blocks.1.ffn.2.lora_B.default.weight" in flat and "latent_patch_embedding.bias" in flat
    torch.save(flat, tmp_path / "ex4d.ckpt")
    save_file(adapter_state_dict(src_dit, src_enc, layout="prefixed"), str(tmp_path / "ex4d.safetensors"))
    for name, layout in (("ex4d.ckpt", LAYOUT_FLAT), ("ex4d.safetensors", LAYOUT_PREFIXED)):
        dit, enc = add_lora(tiny_dit()), make_condition_encoder(TINY)
        report = load_adapter(dit, enc, read_state_dict(tmp_path / name), name)
        assert report.layout == layout and report.lora_tensors == 40 and report.encoder_tensors == 8
        assert torch.equal(dit.blocks[1].cross_attn.v.lora_A["default"].weight, src_dit.blocks[1].cross_attn.v.lora_A["default"].weight)
        assert torch.equal(enc.latent_encoder[2].weight, src_enc.latent_encoder[2].weight)
        assert "layout" in report.summary()


def test_mismatched_checkpoint_fails_loudly_listing_keys(tmp_path):
    src_dit, src_enc = _random_adapter()
    state = adapter_state_dict(src_dit, src_enc)
    del state["blocks.0.self_attn.q.lora_A.default.weight"]
    del state["latent_encoder.4.bias"]
    state["blocks.0.cross_attn.k_img.lora_A.default.weight"] = torch.zeros(16, 256)
    state["something_else.weight"] = torch.zeros(3)
    state["blocks.1.ffn.0.lora_B.default.weight"] = torch.zeros(7, 16)
    dit, enc = add_lora(tiny_dit()), make_condition_encoder(TINY)
    with pytest.raises(AdapterCheckpointError) as info:
        load_adapter(dit, enc, state, "bad.ckpt")
    msg = str(info.value)
    assert "missing 2" in msg and "blocks.0.self_attn.q.lora_A.default.weight" in msg and "latent_encoder.4.bias" in msg
    assert "unexpected 2" in msg and "k_img" in msg and "something_else.weight" in msg
    assert "wrong shape 1" in msg and "blocks.1.ffn.0.lora_B.default.weight (7, 16)" in msg
    assert "\n" not in msg


def test_corrupt_and_missing_checkpoint_files(tmp_path):
    bad = tmp_path / "ex4d.ckpt"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(AdapterCheckpointError, match="corrupt or not a checkpoint"):
        read_state_dict(bad)
    src_dit, src_enc = _random_adapter()
    torch.save(adapter_state_dict(src_dit, src_enc), tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterCheckpointError, match="corrupt"):
        read_state_dict(tmp_path / "cut.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterCheckpointError, match="corrupt"):
        read_state_dict(tmp_path / "bad.safetensors")
    torch.save({"state_dict": adapter_state_dict(src_dit, src_enc), "epoch": 2}, tmp_path / "nested.ckpt")
    assert len(read_state_dict(tmp_path / "nested.ckpt")) == 48
    torch.save({"step": 3}, tmp_path / "notensors.ckpt")
    with pytest.raises(AdapterCheckpointError, match="not a flat tensor state dict"):
        read_state_dict(tmp_path / "notensors.ckpt")
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "nope.ckpt")


@torch.no_grad()
def test_timestep_embedding_uses_the_fp32_timestep_in_a_bf16_model():
    dit = tiny_dit().to(torch.bfloat16)
    inputs = {k: (v.to(torch.bfloat16) if k != "timestep" else v) for k, v in dit_inputs().items()}
    precise = ex4d_model_fn(dit, **{**inputs, "timestep": torch.tensor([993.7])})
    rounded = ex4d_model_fn(dit, **{**inputs, "timestep": torch.tensor([993.7]).to(torch.bfloat16)})  # -> 992
    assert torch.equal(rounded, ex4d_model_fn(dit, **{**inputs, "timestep": torch.tensor([992.0])}))
    assert not torch.equal(precise, rounded)
