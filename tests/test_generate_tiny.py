"""The full generate path on tiny random-initialised instances of the real diffsynth Wan classes (CPU).

DiT (WanModel), VAE (WanVideoVAE), umT5 text encoder (WanTextEncoder + an offline tokenizer), CLIP image
encoder (WanImageEncoder's classes), the EX-4D condition encoder and peft LoRA loaded from a synthetic
release-layout adapter state dict.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")
pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

from ex4d.errors import Cancelled, InputError  # noqa: E402
from ex4d.generate import load_generator  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return load_generator("tiny")


def guide_clip(t=5, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    color = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    mask = np.ones((t, h, w), bool)
    mask[1:, :, w // 2:] = False
    color[~mask] = 0
    return color, mask


def test_tiny_is_built_from_the_real_classes(tiny):
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_image_encoder import WanImageEncoder
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    from diffsynth.models.wan_video_vae import WanVideoVAE
    from diffsynth.pipelines.wan_video import WanVideoPipeline

    pipe = tiny.pipe
    assert isinstance(pipe, WanVideoPipeline)
    assert isinstance(pipe.dit, WanModel) and isinstance(pipe.vae, WanVideoVAE)
    assert isinstance(pipe.text_encoder, WanTextEncoder) and isinstance(pipe.image_encoder, WanImageEncoder)
    assert pipe.dit.in_dim == 36 and pipe.dit.has_image_input
    assert pipe.adapter_report is not None and pipe.adapter_report.lora_tensors == 40


def test_generate_shapes_dtypes_determinism_and_progress(tiny):
    color, mask = guide_clip()
    stages = []
    out = tiny.generate(color, mask, steps=2, seed=0, progress=lambda s, i, n, preview=None: stages.append((s, i, n)))
    assert out.shape == color.shape and out.dtype == np.uint8
    assert [s for s in stages if s[0] == "denoise"] == [("denoise", 0, 2), ("denoise", 1, 2), ("denoise", 2, 2)]
    assert stages[0][0] == "encode" and stages[-1][0] == "done"
    again = tiny.generate(color, mask, steps=2, seed=0)
    assert np.array_equal(out, again)  # same seed, same device -> same output
    other = tiny.generate(color, mask, steps=2, seed=1)
    assert not np.array_equal(out, other)


def test_cancel_between_steps(tiny):
    color, mask = guide_clip()
    cancel = threading.Event()

    def progress(stage, step, total, preview=None):
        if stage == "denoise" and step == 1:
            cancel.set()

    seen = []
    with pytest.raises(Cancelled):
        tiny.generate(color, mask, steps=3, progress=lambda *a, **k: (seen.append(a), progress(*a)), cancel=cancel)
    assert ("denoise", 1, 3) in seen and ("denoise", 2, 3) not in seen


def test_odd_size_and_length_are_rounded_with_warnings(tiny):
    color, mask = guide_clip(t=6, h=24, w=40)
    with pytest.warns(UserWarning) as record:
        out = tiny.generate(color, mask, steps=1)
    messages = " ".join(str(w.message) for w in record)
    assert "40x24 is not a multiple of 16: generating at 48x32" in messages
    assert "6 frames is not 4k+1: generating 9" in messages
    assert out.shape == (6, 24, 40, 3) and out.dtype == np.uint8


def test_bad_arguments(tiny):
    color, mask = guide_clip()
    with pytest.raises(InputError, match="steps"):
        tiny.generate(color, mask, steps=0)
    with pytest.raises(InputError, match="frames but the mask"):
        tiny.generate(color, mask[:3])
    with pytest.raises(InputError, match="unknown generator"):
        load_generator("big")
    with pytest.raises(InputError, match="unknown memory mode"):
        load_generator("tiny", memory_mode="swap")
