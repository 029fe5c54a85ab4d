"""The draft generator: temporal propagation + Telea inpainting, valid pixels untouched."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ex4d.errors import Cancelled, InputError
from ex4d.generate import load_generator


def synthetic_shot(t=9, h=64, w=80, seed=0):
    """A static textured scene; a hole sweeps across it, so most hole pixels are seen in other frames."""
    rng = np.random.default_rng(seed)
    scene = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    color = np.repeat(scene[None], t, axis=0)
    mask = np.ones((t, h, w), bool)
    for i in range(1, t):
        x0 = 4 + 6 * i
        mask[i, 10:40, x0:x0 + 12] = False
    mask[:, 50:60, 2:8] = False  # hidden in every frame: left to inpainting
    guide = color.copy()
    guide[~mask] = 0
    return scene, guide, mask


def test_draft_fills_holes_and_keeps_valid_pixels_exactly():
    scene, guide, mask = synthetic_shot()
    gen = load_generator("draft")
    stages = []
    out = gen.generate(guide, mask, progress=lambda s, i, n, preview=None: stages.append((s, i, n)))
    assert out.shape == guide.shape and out.dtype == np.uint8
    assert np.array_equal(out[mask], guide[mask])  # valid pixels untouched, bit for bit
    # hole pixels visible in a nearby frame get that frame's exact colour (the scene is static)
    seen_elsewhere = ~mask & mask.any(axis=0, keepdims=True)
    assert np.array_equal(out[seen_elsewhere], np.broadcast_to(scene, guide.shape)[seen_elsewhere])
    # pixels hidden in every frame are inpainted (no black holes left)
    never = ~mask.any(axis=0)
    assert never.any() and (out[:, never] > 0).any(axis=-1).mean() > 0.9
    assert stages[-1] == ("fill", 9, 9)


def test_draft_is_fast_on_the_release_shape():
    rng = np.random.default_rng(1)
    t, h, w = 49, 512, 512
    color = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    mask = np.ones((t, h, w), bool)
    for i in range(1, t):
        mask[i, :, w - 4 * i:] = False  # an orbit-like disocclusion growing from the right
    color[~mask] = 0
    t0 = time.perf_counter()
    out = load_generator("draft").generate(color, mask)
    assert time.perf_counter() - t0 < 20.0  # seconds, on a shared CPU
    assert np.array_equal(out[mask], color[mask])


def test_draft_cancel_and_bad_input():
    _, guide, mask = synthetic_shot()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        load_generator("draft").generate(guide, mask, cancel=cancel)
    with pytest.raises(InputError):
        load_generator("draft").generate(guide, mask[:, :10])
