"""The weights layout check (every missing file named) and the real loader on a release-layout folder
written from tiny random models (diffsynth's loader, converters and strict adapter loading)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("EX4D_CACHE_DIR", str(Path(tempfile.gettempdir()) / "ex4d-test-cache"))

from ex4d.errors import WeightsError  # noqa: E402
from ex4d.generate.weights import ADAPTER_NAMES, CLIP_FILE, DIT_SHARDS, T5_FILE, VAE_FILE, WAN_REPO, check_weights  # noqa: E402


def test_missing_weights_name_every_file_and_the_download_commands(tmp_path):
    with pytest.raises(WeightsError) as info:
        check_weights(tmp_path)
    msg = str(info.value)
    assert msg.startswith("missing 12 weight file(s)")
    for name in (*DIT_SHARDS, T5_FILE, VAE_FILE, CLIP_FILE, "google/umt5-xxl", "EX-4D/ex4d.ckpt"):
        assert name in msg
    assert f"huggingface-cli download {WAN_REPO} --local-dir {tmp_path / WAN_REPO}" in msg
    assert f"huggingface-cli download yihouxiang/EX-4D --local-dir {tmp_path / 'EX-4D'}" in msg
    assert "\n" not in msg


def test_partial_folder_lists_only_what_is_missing(tmp_path, monkeypatch):
    wan = tmp_path / WAN_REPO
    wan.mkdir(parents=True)
    for name in DIT_SHARDS[:5] + (VAE_FILE,):
        (wan / name).write_bytes(b"x")
    monkeypatch.setenv("EX4D_MODELS", str(tmp_path))
    with pytest.raises(WeightsError) as info:
        check_weights(None)  # from $EX4D_MODELS
    msg = str(info.value)
    assert msg.startswith("missing 6 weight file(s)")
    assert DIT_SHARDS[5] in msg and DIT_SHARDS[0] not in msg and VAE_FILE not in msg


def test_the_release_readme_flat_layout_is_accepted(tmp_path):
    flat = tmp_path / "Wan-AI"
    (flat / "google" / "umt5-xxl").mkdir(parents=True)
    for name in (*DIT_SHARDS, T5_FILE, VAE_FILE, CLIP_FILE):
        (flat / name).write_bytes(b"x")
    (flat / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    (tmp_path / "EX-4D").mkdir()
    (tmp_path / "EX-4D" / ADAPTER_NAMES[1]).write_bytes(b"x")
    layout = check_weights(tmp_path)
    assert layout.wan_dir == flat and layout.adapter.name == "ex4d.safetensors"


# --------------------------------------------------------------------------------------------------
# A release-layout folder of tiny models through the real loader
# --------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")
pytest.importorskip("peft")


def write_release_folder(root: Path, components, adapter_state) -> None:
    from safetensors.torch import save_file

    from ex4d.generate.architectures import tiny_tokenizer_dir

    wan = root / WAN_REPO
    (wan / "google").mkdir(parents=True)
    shutil.copytree(tiny_tokenizer_dir(), wan / "google" / "umt5-xxl")
    state = {k: v.contiguous() for k, v in components.dit.state_dict().items()}
    keys = sorted(state)
    for i, name in enumerate(DIT_SHARDS):
        save_file({k: state[k] for k in keys[i::7]}, str(wan / name))
    torch.save(components.text_encoder.state_dict(), wan / T5_FILE)
    torch.save(components.vae.model.state_dict(), wan / VAE_FILE)  # Wan's file has no "model." prefix
    torch.save(components.image_encoder.model.state_dict(), wan / CLIP_FILE)
    (root / "EX-4D").mkdir()
    torch.save(adapter_state, root / "EX-4D" / "ex4d.ckpt")


@pytest.fixture(scope="module")
def release_folder(tmp_path_factory):
    from ex4d.generate.architectures import build_random_components
    from ex4d.generate.loading import random_adapter_state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    components = build_random_components("tiny", seed=3)
    adapter = random_adapter_state(components, seed=4)
    write_release_folder(root, components, adapter)
    yield root, components, adapter
    torch.set_num_threads(threads)


def test_loader_reads_the_release_layout_exactly(release_folder):
    from ex4d.generate.generator import Ex4dGenerator
    from ex4d.generate.loading import load_ex4d_pipeline
    from ex4d.generate.pipeline import assemble_pipeline

    root, components, adapter = release_folder
    pipe = load_ex4d_pipeline(root, device="cpu", dtype=torch.float32, arch="tiny")
    assert pipe.adapter_report.layout.startswith("flat") and pipe.adapter_report.lora_tensors == 40
    assert torch.equal(pipe.dit.blocks[1].ffn[0].base_layer.weight, components.dit.blocks[1].ffn[0].weight)
    assert torch.equal(pipe.dit.blocks[0].self_attn.q.lora_B["default"].weight, adapter["blocks.0.self_attn.q.lora_B.default.weight"])
    assert torch.equal(pipe.vae.model.encoder.conv1.weight, components.vae.model.encoder.conv1.weight)
    assert torch.equal(pipe.image_encoder.model.visual.pos_embedding, components.image_encoder.model.visual.pos_embedding)
    assert torch.equal(pipe.text_encoder.token_embedding.weight, components.text_encoder.token_embedding.weight)

    rng = np.random.default_rng(0)
    color = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    mask = np.ones((5, 32, 32), bool)
    mask[1:, 8:24, 16:] = False
    loaded = Ex4dGenerator(pipe).generate(color, mask, steps=1)
    direct = Ex4dGenerator(assemble_pipeline(components, device="cpu", dtype=torch.float32, adapter_state=adapter))
    assert np.array_equal(loaded, direct.generate(color, mask, steps=1))


def test_corrupt_or_foreign_files_raise_weights_errors(release_folder, tmp_path):
    from ex4d.generate.loading import load_ex4d_pipeline

    root, _, _ = release_folder
    broken = tmp_path / "models"
    shutil.copytree(root, broken)
    wan = broken / WAN_REPO
    (wan / DIT_SHARDS[2]).write_bytes(os.urandom(256))
    with pytest.raises(WeightsError, match="cannot load the Wan2.1-I2V DiT"):
        load_ex4d_pipeline(broken, device="cpu", dtype=torch.float32, arch="tiny")
    shutil.copy(root / WAN_REPO / DIT_SHARDS[2], wan / DIT_SHARDS[2])
    shutil.copy(wan / T5_FILE, wan / VAE_FILE)  # a text encoder where the VAE should be
    with pytest.raises(WeightsError, match="cannot load the Wan VAE"):
        load_ex4d_pipeline(broken, device="cpu", dtype=torch.float32, arch="tiny")
