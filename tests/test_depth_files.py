"""Depth from files: npz/npy, 16-bit PNG sequences, OpenEXR (Blender channel names), validation, fitting."""

from __future__ import annotations

import numpy as np
import pytest

from ex4d.depth.files import check_depth, depth_K_at_video_size, fit_depth, load_depth, pick_exr_depth_channel
from ex4d.errors import DepthError, InputError
from ex4d.video import fit_box, fit_frames


def one_line(e) -> str:
    text = str(e.value)
    assert text and "\n" not in text
    return text


# ----------------------------------------------------------------------------------------- npz / npy


def test_npz_with_K(tiny_clip):
    data = load_depth(tiny_clip.depth_file)
    np.testing.assert_array_equal(data.depth, tiny_clip.depth)
    np.testing.assert_array_equal(data.K, tiny_clip.K)
    assert data.size == (64, 48) and data.depth.dtype == np.float32


def test_npz_single_frame_and_scale(tmp_path):
    np.savez(tmp_path / "d.npz", depth=np.full((4, 6), 2.0, np.float64))
    data = load_depth(tmp_path / "d.npz", scale=0.5)
    assert data.depth.shape == (1, 4, 6) and data.K is None and data.depth.dtype == np.float32
    assert float(data.depth[0, 0, 0]) == 1.0


def test_npy(tmp_path):
    np.save(tmp_path / "d.npy", np.ones((3, 4, 6), np.float32))
    assert load_depth(tmp_path / "d.npy").depth.shape == (3, 4, 6)


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"disparity": np.ones((2, 4, 4))}, "no 'depth' array"),
        ({"depth": np.ones((2, 4, 4)), "K": np.eye(4)}, "3x3"),
        ({"depth": np.ones((2, 4, 4)), "K": np.zeros((3, 3))}, "positive focal"),
        ({"depth": np.ones((2, 2, 4, 4))}, r"\(T,H,W\)"),
        ({"depth": np.array(["a", "b"])}, "shape|numeric"),
        ({"depth": np.ones((0, 4, 4))}, "empty"),
    ],
)
def test_bad_npz(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DepthError) as e:
        load_depth(tmp_path / "d.npz")
    assert __import__("re").search(match, one_line(e))


def test_missing_unknown_and_corrupt(tmp_path):
    with pytest.raises(DepthError, match="not found"):
        load_depth(tmp_path / "nope.npz")
    (tmp_path / "d.txt").write_text("1 2 3")
    with pytest.raises(DepthError, match="unknown depth format"):
        load_depth(tmp_path / "d.txt")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DepthError) as e:
        load_depth(tmp_path / "bad.npz")
    one_line(e)
    with pytest.raises(InputError):
        load_depth(tmp_path / "d.txt", scale=-1.0)


# ----------------------------------------------------------------------------------------- PNG


def _write_pngs(folder, values, dtype=np.uint16, channels=None):
    import cv2

    folder.mkdir(exist_ok=True)
    for i, v in enumerate(values):
        im = np.asarray(v, dtype=dtype)
        if channels:
            im = np.stack([im] * channels, axis=-1)
        assert cv2.imwrite(str(folder / f"depth_{i:04d}.png"), im)


def test_png16_folder_and_glob(tmp_path):
    maps = [np.full((6, 8), 1000 + 250 * i) for i in range(3)]
    maps[1][2, 3] = 65535
    _write_pngs(tmp_path / "seq", maps)
    data = load_depth(tmp_path / "seq")  # default 1/1000: millimetres -> metres
    assert data.depth.shape == (3, 6, 8) and data.K is None
    assert data.depth[0, 0, 0] == pytest.approx(1.0) and data.depth[2, 0, 0] == pytest.approx(1.5)
    assert data.depth[1, 2, 3] == pytest.approx(65.535)
    data = load_depth(str(tmp_path / "seq" / "depth_*.png"), scale=0.01)
    assert data.depth[1, 0, 0] == pytest.approx(12.5)


def test_png_sequence_without_zero_padding_is_in_frame_order(tmp_path):
    """depth_1 .. depth_12: sorted as text, depth_10 would come second and every later frame would be
    matched to the wrong video frame."""
    import cv2

    folder = tmp_path / "seq"
    folder.mkdir()
    for i in range(1, 13):
        assert cv2.imwrite(str(folder / f"depth_{i}.png"), np.full((4, 6), 1000 * i, np.uint16))
    expected = np.arange(1, 13, dtype=np.float32)
    for source in (folder, str(folder / "depth_*.png")):
        data = load_depth(source)
        np.testing.assert_allclose(data.depth[:, 0, 0], expected)


def test_existing_paths_with_glob_characters_are_used_as_they_are(tmp_path):
    """'shot [v2]' is a folder name, not a character class."""
    import cv2

    folder = tmp_path / "dep" / "shot [v2]"
    folder.mkdir(parents=True)
    np.savez(folder / "depth.npz", depth=np.full((2, 4, 6), 3.0, np.float32))
    assert load_depth(folder / "depth.npz").depth.shape == (2, 4, 6)
    pngs = folder / "png [a]"
    pngs.mkdir()
    for i in range(3):
        assert cv2.imwrite(str(pngs / f"d{i}.png"), np.full((4, 6), 1000 + i, np.uint16))
    assert load_depth(pngs).depth.shape == (3, 4, 6)
    assert load_depth(str(pngs / "*.png")).depth.shape == (3, 4, 6)  # a real glob inside such a folder
    with pytest.raises(DepthError, match="no depth files match"):
        load_depth(str(folder / "*.exr"))


@pytest.mark.parametrize("kind,match", [("8bit", "16-bit"), ("rgb", "one channel"), ("sizes", "different sizes"), ("empty", "no .png")])
def test_bad_png_sequences(tmp_path, kind, match):
    folder = tmp_path / "seq"
    if kind == "8bit":
        _write_pngs(folder, [np.full((4, 4), 9)], dtype=np.uint8)
    elif kind == "rgb":
        im = np.zeros((4, 4, 3), np.uint16)
        im[..., 0] = 100
        import cv2

        folder.mkdir()
        cv2.imwrite(str(folder / "a.png"), im)
    elif kind == "sizes":
        _write_pngs(folder, [np.ones((4, 4)), np.ones((4, 5))])
    else:
        folder.mkdir()
    with pytest.raises(DepthError, match=match) as e:
        load_depth(folder)
    one_line(e)


def test_glob_without_matches(tmp_path):
    with pytest.raises(DepthError, match="no depth files match"):
        load_depth(str(tmp_path / "*.png"))


# ----------------------------------------------------------------------------------------- OpenEXR


def test_exr_channel_choice():
    assert pick_exr_depth_channel(["ViewLayer.Combined.R", "ViewLayer.Depth.Z", "ViewLayer.Combined.G"]) == "ViewLayer.Depth.Z"
    assert pick_exr_depth_channel(["R", "G", "B", "Z"]) == "Z"
    assert pick_exr_depth_channel(["depth"]) == "depth"
    assert pick_exr_depth_channel(["V"]) == "V"
    assert pick_exr_depth_channel(["R", "G", "B"]) is None


def test_exr_blender_layout(tmp_path):
    OpenEXR = pytest.importorskip("OpenEXR", reason="optional 'openexr' package not installed")
    Z = np.linspace(1.0, 9.0, 5 * 7, dtype=np.float32).reshape(5, 7)
    for i in range(2):
        channels = {"ViewLayer.Combined.R": np.zeros_like(Z), "ViewLayer.Combined.A": np.ones_like(Z), "ViewLayer.Depth.Z": Z + i}
        OpenEXR.File([OpenEXR.Part({}, channels)]).write(str(tmp_path / f"frame_{i:04d}.exr"))
    data = load_depth(tmp_path)
    assert data.depth.shape == (2, 5, 7)
    np.testing.assert_array_equal(data.depth[1], Z + 1)
    one = load_depth(tmp_path / "frame_0000.exr")
    np.testing.assert_array_equal(one.depth[0], Z)

    OpenEXR.File([OpenEXR.Part({}, {"R": Z, "G": Z})]).write(str(tmp_path / "rgb.exr"))
    with pytest.raises(DepthError, match="no depth channel") as e:
        load_depth(tmp_path / "rgb.exr")
    one_line(e)
    (tmp_path / "broken.exr").write_bytes(b"v/1\x01 not an exr")
    with pytest.raises(DepthError, match="OpenEXR") as e:
        load_depth(tmp_path / "broken.exr")
    one_line(e)


# ----------------------------------------------------------------------------------------- validation


def test_check_depth_accepts_good_and_other_resolution():
    d = np.ones((3, 24, 32), np.float32)
    assert check_depth(d, 3, (48, 64)).shape == (3, 24, 32)  # half resolution, same aspect
    assert check_depth(np.ones((5, 48, 64)), 3, (48, 64), allow_longer=True).shape == (3, 48, 64)


@pytest.mark.parametrize(
    "depth,frames,match",
    [
        (np.ones((2, 48, 64)), 3, "has 2 frames but the video has 3"),
        (np.ones((4, 48, 64)), 3, "has 4 frames but the video has 3"),
        (np.ones((3, 48, 48)), 3, "aspect"),
        (np.ones((3, 48)), 3, r"\(T,H,W\)"),
        (np.where(np.arange(3 * 48 * 64).reshape(3, 48, 64) == 7000, np.nan, 1.0), 3, "NaN or infinite.*frame 2"),
        (np.where(np.arange(3 * 48 * 64).reshape(3, 48, 64) == 5, np.inf, 1.0), 3, "NaN or infinite.*frame 0"),
        (np.zeros((3, 48, 64)), 3, "9216 depth values are zero or negative"),
        (-np.ones((3, 48, 64)), 3, "zero or negative"),
    ],
)
def test_check_depth_refuses(depth, frames, match):
    with pytest.raises(DepthError, match=match) as e:
        check_depth(depth, frames, (48, 64))
    one_line(e)


# ----------------------------------------------------------------------------------------- fitting


def test_fit_depth_nearest_keeps_values_and_matches_frames():
    """Depth and frames go through the same box: a depth edge stays where the colour edge is."""
    T, H0, W0 = 2, 48, 80
    depth = np.full((T, H0, W0), 5.0, np.float32)
    depth[:, :, 37:] = 2.0  # edge at x = 37
    frames = np.zeros((T, H0, W0, 3), np.uint8)
    frames[:, :, 37:] = 255
    for mode, (W, H) in [("crop", (32, 32)), ("resize", (40, 24)), ("crop", (96, 48))]:
        fd = fit_depth(depth, (W0, H0), W, H, mode)
        ff = fit_frames(frames, W, H, mode)
        assert fd.shape == (T, H, W) and set(np.unique(fd)) <= {2.0, 5.0}  # no blended depths
        edge_depth = np.argmax(fd[0, H // 2] == 2.0)
        edge_color = np.argmax(ff[0, H // 2, :, 0] >= 128)
        assert abs(int(edge_depth) - int(edge_color)) <= 1, (mode, W, H)


def test_fit_depth_from_lower_resolution():
    """Half-resolution depth lands on the same picture as full-resolution frames."""
    depth = np.full((1, 24, 40), 5.0, np.float32)
    depth[:, :, 20:] = 2.0  # x >= 40 in video pixels
    fd = fit_depth(depth, (80, 48), 32, 32, "crop")  # crop x0 = 16 of 80 -> edge at (40-16)*32/48 = 16
    edge = int(np.argmax(fd[0, 16] == 2.0))
    box = fit_box(80, 48, 32, 32, "crop")
    assert abs(edge - (40 - box.x0) * 32 / box.w) <= 1


def test_depth_K_rescaled_to_video(tmp_path):
    K = np.array([[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]])
    np.savez(tmp_path / "d.npz", depth=np.ones((1, 24, 32), np.float32), K=K)
    data = load_depth(tmp_path / "d.npz")
    K2 = depth_K_at_video_size(data, (64, 48))
    np.testing.assert_allclose(K2, [[60, 0, 32], [0, 60, 24], [0, 0, 1]])


@pytest.mark.blender
def test_exr_from_a_real_blender_render(tmp_path):
    """Blender 5's multilayer EXR is multi-part (one part per pass) and its Z pass is planar z-depth."""
    import subprocess
    from pathlib import Path

    pytest.importorskip("OpenEXR", reason="optional 'openexr' package not installed")
    repo = Path(__file__).parents[1]
    blender_python = repo / ".venv-blender" / "bin" / "python"
    if not blender_python.is_file():
        pytest.skip("the bpy environment .venv-blender is not installed (bash .ci/setup makes it)")
    proc = subprocess.run(
        [str(blender_python), str(repo / "tests" / "blender" / "render_zpass.py"), "--", str(tmp_path), "CYCLES", "BLENDER_WORKBENCH"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for engine in ("CYCLES", "BLENDER_WORKBENCH"):
        data = load_depth(tmp_path / f"z_{engine}.exr")
        z = data.depth[0]
        assert z.shape == (24, 32)
        assert z[12, 16] == pytest.approx(5.0, abs=1e-3)  # the plane, straight ahead
        plane = z < 100
        # the plane spans many pixels off axis; radial distance would grow to 5/cos(angle) there
        assert plane.sum() > 50 and np.allclose(z[plane], 5.0, atol=1e-3)
        assert (z[~plane] > 100).all() and np.isfinite(z).all()  # sky = far, not NaN/inf


# ----------------------------------------------------------------------------------------- depth against real videos


def _anamorphic_shot(tmp_path):
    from fractions import Fraction

    from conftest import write_clip

    stored = np.zeros((2, 108, 144, 3), np.uint8)
    stored[:, :, 72:] = 255
    return write_clip(tmp_path / "anamorphic.mp4", stored, sample_aspect=Fraction(4, 3))


def test_anamorphic_depth_at_display_or_stored_size(tmp_path):
    """Depth for a 144x108 clip with 4:3 pixels (displayed 192x108) may be made from the displayed
    (square-pixel) pictures or from the stored ones; both land on the same working-size picture, and a
    K in either's pixels gives the same intrinsics."""
    from ex4d.pipeline import load_shot_inputs

    video = _anamorphic_shot(tmp_path)
    display = np.full((2, 108, 192), 5.0, np.float32)
    display[:, :, 96:] = 2.0
    stored = np.full((2, 108, 144), 5.0, np.float32)
    stored[:, :, 72:] = 2.0
    K_display = np.array([[120.0, 0, 96], [0, 120.0, 54], [0, 0, 1]])
    K_stored = np.array([[90.0, 0, 72], [0, 120.0, 54], [0, 0, 1]])  # same lens in 4:3-wide pixels
    np.savez(tmp_path / "display.npz", depth=display, K=K_display)
    np.savez(tmp_path / "stored.npz", depth=stored, K=K_stored)
    results = [load_shot_inputs(video, depth=tmp_path / f"{name}.npz", size=(96, 54)) for name in ("display", "stored")]
    for r in results:
        assert r.frames.shape == (2, 54, 96, 3) and r.source_size == (192, 108)
        assert int(np.argmax(r.depth[0, 27] == 2.0)) == 48
        assert abs(int(np.argmax(r.frames[0, 27, :, 1] > 127)) - 48) <= 1  # colour edge where the depth edge is
        assert (r.intrinsics.fx, r.intrinsics.fy, r.intrinsics.cx) == pytest.approx((60.0, 60.0, 48.0))
    np.testing.assert_array_equal(results[0].depth, results[1].depth)

    np.savez(tmp_path / "square.npz", depth=np.ones((2, 100, 100), np.float32))
    with pytest.raises(DepthError, match=r"non-square pixels\); give depth at 192x108 or 144x108") as e:
        load_shot_inputs(video, depth=tmp_path / "square.npz")
    one_line(e)


def test_rotated_video_and_depth_in_the_stored_orientation(tmp_path):
    """A portrait phone clip (stored landscape, turned 90 degrees clockwise): depth in the stored
    orientation is refused with the reason; at 180 degrees the shape cannot tell, so a warning says
    which orientation the depth must be in."""
    from conftest import with_display_rotation
    from ex4d.pipeline import load_shot_inputs
    from ex4d.video import write_video

    frames, depth, _ = __import__("conftest").make_tiny_scene(2)  # stored 64x48
    plain = write_video(tmp_path / "plain.mp4", frames, 10)
    portrait = with_display_rotation(plain, tmp_path / "portrait.mp4", 90)
    np.savez(tmp_path / "stored.npz", depth=depth)
    with pytest.raises(DepthError, match="rotated 90 degrees clockwise for display; depth must be in the displayed orientation") as e:
        load_shot_inputs(portrait, depth=tmp_path / "stored.npz")
    one_line(e)
    np.savez(tmp_path / "upright.npz", depth=np.ascontiguousarray(np.rot90(depth, -1, axes=(1, 2))))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shape shows the orientation: nothing to warn about
        assert load_shot_inputs(portrait, depth=tmp_path / "upright.npz", focal=50).depth.shape == (2, 64, 48)

    flipped = with_display_rotation(plain, tmp_path / "flipped.mp4", 180)
    with pytest.warns(UserWarning, match=r"rotated 180 degrees for display; .* must be in the displayed \(upright\) orientation"):
        load_shot_inputs(flipped, depth=tmp_path / "stored.npz", focal=50)


def test_rotation_warning_for_square_pictures_only_when_the_shape_cannot_tell():
    d = np.ones((1, 8, 8), np.float32)
    with pytest.warns(UserWarning, match="rotated 90 degrees clockwise"):
        check_depth(d, 1, (8, 8), rotation=270)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_depth(np.ones((1, 8, 6), np.float32), 1, (8, 6), rotation=270)
        check_depth(d, 1, (8, 8))
