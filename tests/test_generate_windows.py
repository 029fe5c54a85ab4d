"""Long clips through the real tiny pipeline (windows + cross-fade), the VAE input of the mask condition,
and seeded random initialisation of the tiny instances."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")
pytest.importorskip("peft")

from ex4d.generate import load_generator  # noqa: E402
from ex4d.generate.windows import plan_windows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gen():
    return load_generator("tiny", window=9, overlap=4)


def test_clip_longer_than_the_window_runs_in_blended_windows(gen):
    rng = np.random.default_rng(0)
    t = 14
    color = rng.integers(0, 256, (t, 32, 32, 3), dtype=np.uint8)
    mask = np.ones((t, 32, 32), bool)
    mask[1:, :, 20:] = False
    assert plan_windows(t, 9, 4) == [(0, 9), (5, 14)]
    stages = []
    out = gen.generate(color, mask, steps=1, progress=lambda s, i, n, preview=None: stages.append((s, i, n)))
    assert out.shape == (t, 32, 32, 3) and out.dtype == np.uint8
    assert ("windows", 0, 2) in stages and ("denoise", 2, 2) in stages  # 1 step x 2 windows
    # the first window alone == a 9-frame generation of the same frames (window 0 is the release's run)
    first = gen.generate(color[:9], mask[:9], steps=1)  # fits one window
    np.testing.assert_array_equal(out[:5], first[:5])  # before the overlap
    assert not np.array_equal(out[5:9], first[5:9])  # cross-faded with the second window


@torch.no_grad()
def test_vae_sees_the_mask_mapped_twice_and_tiny_init_is_seeded(gen):
    a, b = gen, load_generator("tiny")
    for (name, p), (_, q) in zip(a.pipe.named_parameters(), b.pipe.named_parameters()):
        assert torch.equal(p, q), name
    pipe = a.pipe
    g = torch.Generator().manual_seed(0)
    color = torch.rand(3, 5, 32, 32, generator=g) * 2 - 1
    mask = torch.ones(3, 5, 32, 32)
    mask[:, 1:, :, 16:] = -1.0  # [-1, 1] as prepare_clip makes it
    tokens = pipe.encode_video_condition(color, mask)
    vae = lambda v: pipe._vae_encode(v)  # noqa: E731
    expected = pipe.condition_encoder(vae(color), vae(mask * 2 - 1))  # VAE input: -3 (hole) / +1 (valid)
    assert torch.equal(tokens, expected.flatten(2).transpose(1, 2))
    assert tokens.shape == (1, 2 * 2 * 2, 256)  # f=2, 32/8/2 = 2 per side
    wrong = pipe.condition_encoder(vae(color), vae(mask)).flatten(2).transpose(1, 2)
    assert not torch.equal(tokens, wrong)
