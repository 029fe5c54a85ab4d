"""Input checks, the release's mask erosion (seeded) and [-1,1] mapping, size/length rounding, windows.

numpy/OpenCV only: no torch, no diffsynth.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ex4d.errors import InputError
from ex4d.generate.conditioning import (check_inputs, erode_masks, erosion_kernels, fit_to_model, mask_from_gray,
                                        prepare_clip, round_frames, round_size)
from ex4d.generate.windows import blend_window, plan_windows


def clip(t=5, h=32, w=48, seed=0):
    rng = np.random.default_rng(seed)
    color = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    mask = np.ones((t, h, w), bool)
    mask[1:, 8:24, 20:40] = False
    return color, mask


def test_erosion_is_seeded_and_k_in_2_to_8():
    a, b = erosion_kernels(400, seed=0), erosion_kernels(400, seed=0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, erosion_kernels(400, seed=1))
    assert a.min() == 2 and a.max() == 8 and set(np.unique(a)) == set(range(2, 9))


def test_erosion_matches_a_k_by_k_box_and_keeps_full_frames_full():
    _, mask = clip()
    kernels = np.array([3, 2, 8, 5, 4])
    eroded = erode_masks(mask, seed=0, kernels=kernels)
    assert eroded[0].all()  # frame 0 (full mask) stays full
    for t, k in enumerate(kernels):
        expected = cv2.erode(mask[t].astype(np.uint8) * 255, np.ones((k, k), np.uint8)) > 127
        assert np.array_equal(eroded[t], expected)
    assert (eroded <= mask).all() and eroded[1:].sum() < mask[1:].sum()
    assert np.array_equal(erode_masks(mask, seed=7), erode_masks(mask, seed=7))


def test_prepare_clip_maps_to_minus_one_one():
    color, mask = clip()
    prepared = prepare_clip(color, mask, seed=0)
    assert prepared.color.shape == (3, 5, 32, 48) and prepared.mask.shape == (3, 5, 32, 48)
    assert prepared.color.dtype == np.float32
    holes = ~prepared.eroded
    assert np.all(prepared.color[:, holes] == -1.0)  # holes become -1
    assert set(np.unique(prepared.mask)) == {-1.0, 1.0}
    # the condition encoder maps the mask once more: the VAE sees -3 (hole) and +1 (valid)
    assert set(np.unique(prepared.mask * 2 - 1)) == {-3.0, 1.0}
    valid = prepared.eroded
    np.testing.assert_allclose(prepared.color[:, valid], (color[valid].T / 255.0) * 2 - 1, atol=1e-6)


def test_check_inputs_rejects_bad_clips():
    color, mask = clip()
    check_inputs(color, mask)
    with pytest.raises(InputError, match="5 frames but the mask has 4"):
        check_inputs(color, mask[:4])
    with pytest.raises(InputError, match="48x32 but the mask is 40x32"):
        check_inputs(color, mask[:, :, :40])
    with pytest.raises(InputError, match="uint8"):
        check_inputs(color.astype(np.float32), mask)
    with pytest.raises(InputError, match="bool"):
        check_inputs(color, mask.astype(np.uint8))


def test_mask_from_gray_counts_grey_pixels():
    m = np.zeros((2, 8, 8), np.uint8)
    m[:, :, 4:] = 255
    assert np.array_equal(mask_from_gray(m), m > 0)
    m[0, 0, :3] = 100
    m[1, 0, 0] = 200
    with pytest.warns(UserWarning, match="4 grey pixel"):
        out = mask_from_gray(m)
    assert out[1, 0, 0] and not out[0, 0, 0]  # 200 > 127.5 >= 100
    with pytest.raises(InputError, match="not binary: 4 grey"):
        mask_from_gray(m, strict=True)
    rgb = np.repeat(m[..., None], 3, axis=-1)
    with pytest.warns(UserWarning):
        assert mask_from_gray(rgb).shape == (2, 8, 8)


def test_rounding_rules():
    assert [round_frames(n) for n in (1, 2, 5, 6, 48, 49, 50)] == [1, 5, 5, 9, 49, 49, 53]
    assert round_size(512, 512) == (512, 512) and round_size(480, 854) == (480, 848) and round_size(5, 5) == (16, 16)
    color, mask = clip(h=40, w=50)
    with pytest.warns(UserWarning, match="50x40 is not a multiple of 16: generating at 48x48"):
        c, m, orig = fit_to_model(color, mask)
    assert c.shape == (5, 48, 48, 3) and m.shape == (5, 48, 48) and m.dtype == bool and orig == (40, 50)


def test_window_plan_covers_clip_with_overlap():
    assert plan_windows(49, 49, 8) == [(0, 49)]
    assert plan_windows(30, 49, 8) == [(0, 30)]
    w = plan_windows(120, 49, 8)
    assert w[0] == (0, 49) and w[-1][1] == 120 and all(e - s == 49 for s, e in w)
    assert all(b[0] < a[1] and a[1] - b[0] >= 8 for a, b in zip(w, w[1:]))  # every seam overlaps >= 8 frames
    assert plan_windows(90, 49, 8) == [(0, 49), (41, 90)]


def test_blend_window_cross_fades_linearly():
    result = np.zeros((10, 1, 1, 1), np.float32)
    blend_window(result, np.full((6, 1, 1, 1), 100.0, np.float32), 0, 0)
    blend_window(result, np.full((6, 1, 1, 1), 200.0, np.float32), 3, 6)
    values = result[:, 0, 0, 0]
    np.testing.assert_allclose(values[:3], 100.0)
    np.testing.assert_allclose(values[3:6], [125.0, 150.0, 175.0])  # ramp (i+1)/(overlap+1)
    np.testing.assert_allclose(values[6:9], 200.0)
