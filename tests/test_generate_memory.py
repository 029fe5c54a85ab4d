"""Memory modes and batched CFG on the tiny pipeline (bf16 on CPU: the same code paths as on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")
pytest.importorskip("peft")

from ex4d.generate import load_generator  # noqa: E402
from ex4d.generate.adapter import lora_modules  # noqa: E402

from conftest import small_guide_clip  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_and_reference():
    color, mask = small_guide_clip()
    gen = load_generator("tiny", speed="reference")
    reference = gen.generate(color, mask, steps=1)
    gen.pipe.batch_cfg = True
    batched = gen.generate(color, mask, steps=1)
    return color, mask, reference, batched


def test_batched_cfg_matches_two_passes(clip_and_reference):
    _, _, reference, batched = clip_and_reference
    assert np.abs(reference.astype(int) - batched).max() <= 1


@pytest.mark.parametrize("mode", ["resident", "offload", "fp8"])
def test_memory_modes_run_and_store_weights_as_promised(clip_and_reference, mode):
    color, mask, reference, _ = clip_and_reference
    gen = load_generator("tiny", dtype=torch.bfloat16, memory_mode=mode)
    pipe = gen.pipe
    assert pipe.memory_mode == mode and gen.memory_mode == mode
    dtypes = {p.dtype for p in pipe.dit.parameters()}
    if mode == "resident":
        assert len(lora_modules(pipe.dit)) == 20  # LoRA kept as separate fp32 peft layers
        assert all(p.dtype == torch.float32 for n, p in pipe.dit.named_parameters() if "lora_" in n)
        assert dtypes == {torch.bfloat16, torch.float32} and not pipe.vram_management_enabled
    else:
        assert not lora_modules(pipe.dit)  # merged into the base weights
    if mode == "offload":
        assert pipe.vram_management_enabled and getattr(pipe.dit, "vram_management_enabled", False)
    if mode == "fp8":
        assert pipe.dit.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
        assert pipe.dit.blocks[1].ffn[2].weight.dtype == torch.float8_e4m3fn
        assert pipe.dit.patch_embedding.weight.dtype == torch.bfloat16 and pipe.dit.blocks[0].modulation.dtype == torch.bfloat16
    out = gen.generate(color, mask, steps=1)
    assert out.shape == color.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - reference).mean() < 3.0  # bf16 (and fp8 storage) stay close to fp32
