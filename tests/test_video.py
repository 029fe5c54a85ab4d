"""ex4d.video on the real EX-4D clip and on small written clips: probe, read, fit, write, bad files."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import cut_clip, make_tiny_scene, with_display_rotation, write_clip
from ex4d.camera import Intrinsics
from ex4d.errors import InputError, VideoError
from ex4d.video import (
    atomic_path,
    fit_box,
    fit_frames,
    fit_intrinsics,
    probe_video,
    read_video,
    write_npz_atomic,
    write_video,
)


def test_probe_real_clip(flower_dir):
    info = probe_video(flower_dir / "input.mp4")
    assert (info.num_frames, info.width, info.height) == (49, 512, 512)
    assert info.fps == pytest.approx(30.0)
    assert info.codec == "h264"


def test_read_real_clip(flower_dir):
    clip = read_video(flower_dir / "input.mp4")
    assert clip.frames.shape == (49, 512, 512, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(30.0)
    assert clip.frames.std() > 10  # real picture content, not a blank decode
    part = read_video(flower_dir / "input.mp4", max_frames=4, start=10)
    assert part.frames.shape[0] == 4
    np.testing.assert_array_equal(part.frames, clip.frames[10:14])


def test_read_past_end_and_bad_counts(flower_dir):
    with pytest.raises(VideoError, match="past the end"):
        read_video(flower_dir / "input.mp4", start=49)
    with pytest.raises(InputError):
        read_video(flower_dir / "input.mp4", max_frames=0)


def test_write_read_round_trip(tmp_path, tiny_clip):
    frames = tiny_clip.frames
    out = write_video(tmp_path / "clip.mp4", frames, 24.0)
    info = probe_video(out)
    assert (info.num_frames, info.width, info.height, info.fps) == (6, 64, 48, 24.0)
    back = read_video(out).frames
    assert back.shape == frames.shape
    # yuv420p halves chroma resolution: a saturated 4-pixel texture loses some colour (the real clip: ~1.3)
    assert np.abs(back.astype(int) - frames).mean() < 8.0
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp file left over


def test_write_ntsc_rate_and_grey(tmp_path):
    grey = (np.arange(3 * 16 * 16).reshape(3, 16, 16) % 2 * 255).astype(np.uint8)
    out = write_video(tmp_path / "mask.mp4", grey, 30000 / 1001)
    info = probe_video(out)
    assert info.fps == pytest.approx(29.97, abs=1e-3)
    assert read_video(out).frames.shape == (3, 16, 16, 3)


def test_write_pads_odd_sizes_and_says_so(tmp_path):
    frames = np.zeros((2, 47, 63, 3), np.uint8)
    with pytest.warns(UserWarning, match="padded 63x47 to 64x48"):
        write_video(tmp_path / "odd.mp4", frames, 10)
    assert (probe_video(tmp_path / "odd.mp4").width, probe_video(tmp_path / "odd.mp4").height) == (64, 48)


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"old")
    with pytest.raises(InputError):
        write_video(target, np.zeros((2, 8, 8, 3), np.float32), 10)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]


def test_npz_atomic(tmp_path):
    path = write_npz_atomic(tmp_path / "render_x.npz", color=np.ones((2, 3, 4, 3), np.uint8), mask=np.ones((2, 3, 4), bool))
    assert path.name == "render_x.npz" and [p.name for p in tmp_path.iterdir()] == ["render_x.npz"]
    with np.load(path) as z:
        assert z["mask"].dtype == np.bool_ and z["color"].shape == (2, 3, 4, 3)


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "text", "truncated", "audio_only"])
def test_bad_videos_are_one_line_errors(tmp_path, tiny_clip, kind):
    path = tmp_path / "bad.mp4"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n")
    elif kind == "truncated":
        path.write_bytes(tiny_clip.video.read_bytes()[:600])
    elif kind == "audio_only":
        import av

        with av.open(str(path), "w", format="mp4") as c:
            s = c.add_stream("aac", rate=8000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 8000
            for p in s.encode(frame):
                c.mux(p)
            for p in s.encode():
                c.mux(p)
    for fn in (probe_video, read_video):
        with pytest.raises(VideoError) as e:
            fn(path)
        assert "\n" not in str(e.value) and str(e.value)


def test_cut_short_video_is_an_error_naming_the_video(tmp_path):
    """The index lists 24 frames but the data ends early: threaded decoding stops quietly after a few.
    That is a broken copy, not a shorter clip (which would then be blamed on the depth)."""
    cut = cut_clip(tmp_path)
    assert probe_video(cut).num_frames == 24
    with pytest.raises(VideoError, match=r"decoded \d+ of 24 frames - the file is cut short or corrupt") as e:
        read_video(cut)
    assert "\n" not in str(e.value) and str(cut) in str(e.value)
    with pytest.raises(VideoError, match=r"decoded \d+ of 20 frames"):
        read_video(cut, max_frames=20)
    # asking for only the first frames, which are intact, is fine
    assert read_video(cut, max_frames=1).num_frames == 1


def test_complete_videos_pass_the_frame_count_check(tmp_path):
    frames, _, _ = make_tiny_scene(5)
    clip = write_clip(tmp_path / "fast.mp4", frames, container_options={"movflags": "faststart"})
    assert read_video(clip).num_frames == 5
    assert read_video(clip, start=2).num_frames == 3


@pytest.mark.parametrize("mode,size", [("resize", (40, 24)), ("crop", (32, 32)), ("crop", (60, 20)), ("resize", (160, 96))])
def test_fitting_while_decoding_equals_fitting_afterwards(tmp_path, mode, size):
    """read_video(size=...) fits each frame as it is decoded (bounded memory); the pixels are the ones
    fit_frames gives on the whole decoded clip (the old path), interpolation included."""
    frames, _, _ = make_tiny_scene(4, 80, 48)
    clip = write_video(tmp_path / "v.mp4", frames, 10)
    whole = read_video(clip)
    fitted = read_video(clip, size=size, fit=mode)
    np.testing.assert_array_equal(fitted.frames, fit_frames(whole.frames, *size, mode))
    assert fitted.source_size == whole.source_size == (80, 48)
    part = read_video(clip, max_frames=2, start=1, size=size, fit=mode)
    np.testing.assert_array_equal(part.frames, fit_frames(whole.frames[1:3], *size, mode))


def test_fitting_while_decoding_holds_one_full_frame_at_a_time(tmp_path):
    """30 frames of 640x480 read at 64x48: numpy memory stays far below the 27 MB of the full clip."""
    import tracemalloc

    yy, xx = np.mgrid[0:480, 0:640]
    frames = np.stack([np.stack([(xx + 7 * t) % 256, yy % 256, (xx + yy) % 256], -1) for t in range(30)]).astype(np.uint8)
    clip = write_video(tmp_path / "big.mp4", frames, 10)
    del frames
    tracemalloc.start()
    try:
        small = read_video(clip, size=(64, 48))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert small.frames.shape == (30, 48, 64, 3)
    full_frame = 640 * 480 * 3
    assert peak < 4 * full_frame, peak / full_frame


def test_fit_resize_and_crop_shapes():
    frames = np.zeros((2, 48, 80, 3), np.uint8)
    assert fit_frames(frames, 40, 24, "resize").shape == (2, 24, 40, 3)
    assert fit_frames(frames, 32, 32, "crop").shape == (2, 32, 32, 3)
    assert fit_box(80, 48, 32, 32, "crop") == fit_box(80, 48, 32, 32, "crop")
    assert fit_box(80, 48, 32, 32, "crop").x0 == 16
    with pytest.raises(InputError):
        fit_frames(frames, 32, 32, "stretch")


@pytest.mark.parametrize("mode,size", [("resize", (40, 40)), ("crop", (32, 32)), ("crop", (60, 20)), ("resize", (160, 96))])
def test_fit_intrinsics_follow_the_pixels(mode, size):
    """A 3D point projects through the fitted K onto the pixel where the fitted image shows it."""
    W0, H0 = 80, 48
    intr = Intrinsics(70.0, 66.0, 41.0, 23.0, W0, H0)
    point = np.array([0.3, -0.2, 2.0])  # OpenCV-style camera coords for the projection check
    x, y = intr.fx * point[0] / point[2] + intr.cx, intr.fy * point[1] / point[2] + intr.cy
    img = np.zeros((1, H0, W0, 3), np.uint8)
    img[0, int(y), int(x)] = 255  # pixel whose centre is nearest (x, y) rounded down
    W, H = size
    fitted = fit_frames(img, W, H, mode)[0, ..., 0].astype(float)
    K = fit_intrinsics(intr, W, H, mode)
    px = K.fx * point[0] / point[2] + K.cx
    py = K.fy * point[1] / point[2] + K.cy
    # the spot's centre of mass, in image coordinates (pixel centres at +0.5)
    ys, xs = np.nonzero(fitted)
    wts = fitted[ys, xs]
    cx, cy = (xs + 0.5) @ wts / wts.sum(), (ys + 0.5) @ wts / wts.sum()
    # the spot was placed at the pixel's centre, not at (x, y): compare with that centre projected
    src_cx, src_cy = int(x) + 0.5, int(y) + 0.5
    box = fit_box(W0, H0, W, H, mode)
    exp_x = (src_cx - box.x0) * W / box.w
    exp_y = (src_cy - box.y0) * H / box.h
    assert cx == pytest.approx(exp_x, abs=0.6) and cy == pytest.approx(exp_y, abs=0.6)
    # and the fitted K maps the true point the same way as the box maps the source pixel grid
    assert px == pytest.approx((x - box.x0) * W / box.w, abs=1e-9)
    assert py == pytest.approx((y - box.y0) * H / box.h, abs=1e-9)


def test_phone_rotation_is_applied(tmp_path):
    """A phone's portrait clip: landscape pictures + a display matrix saying 'turn 90 degrees clockwise'
    (the track header's matrix, as iPhones write it). Frames come out upright, as players show them."""
    import struct

    stored = np.zeros((2, 48, 64, 3), np.uint8)
    stored[:, :10, :20] = 255  # a block at the stored picture's top-left
    raw = bytearray(write_video(tmp_path / "plain.mp4", stored, 10).read_bytes())
    tkhd = raw.find(b"tkhd")
    assert tkhd > 0 and raw[tkhd + 4] == 0  # version 0 track header: the matrix starts 44 bytes after 'tkhd'
    raw[tkhd + 44 : tkhd + 80] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    (tmp_path / "portrait.mp4").write_bytes(bytes(raw))

    info = probe_video(tmp_path / "portrait.mp4")
    assert (info.width, info.height, info.rotation) == (48, 64, 270)
    frames = read_video(tmp_path / "portrait.mp4").frames
    assert frames.shape == (2, 64, 48, 3)
    ys, xs = np.nonzero(frames[0, ..., 0] > 128)
    # turned clockwise: the block is now at the top-right, 10 wide and 20 tall
    assert (ys.min(), xs.max()) == (0, 47) and ys.max() <= 20 and xs.min() >= 37


def test_anamorphic_video_is_desqueezed_to_square_pixels(tmp_path):
    """Stored 144x108 with 4:3 pixels = displayed 192x108 (16:9). Frames come out at the display aspect,
    so geometry (square pixels) and the written guides are right."""
    from fractions import Fraction

    import av

    stored = np.zeros((3, 108, 144, 3), np.uint8)
    stored[:, :, 72:] = 255  # right half white: the edge is at the middle in any aspect
    stored[:, 20:40, 36:72, 0] = 255  # a red block, stored x 36..72 = displayed 48..96
    clip = write_clip(tmp_path / "anamorphic.mp4", stored, sample_aspect=Fraction(4, 3))
    with av.open(str(clip)) as c:
        assert c.streams.video[0].sample_aspect_ratio == Fraction(4, 3)  # PyAV wrote and reads it back

    info = probe_video(clip)
    assert (info.width, info.height, info.sample_aspect) == (192, 108, Fraction(4, 3))
    assert info.stored_upright_size == (144, 108)
    clip_frames = read_video(clip)
    assert clip_frames.frames.shape == (3, 108, 192, 3) and clip_frames.source_size == (192, 108)
    row = clip_frames.frames[0, 60, :, 1].astype(int)
    assert abs(int(np.argmax(row > 127)) - 96) <= 1  # the edge stays in the middle
    red = np.nonzero((clip_frames.frames[0, 30, :, 0] > 127) & (clip_frames.frames[0, 30, :, 1] < 128))[0]
    assert abs(red.min() - 48) <= 1 and abs(red.max() - 95) <= 1  # the block is 48 wide, not 36
    # fitted while decoding: through the display picture, both modes
    half = read_video(clip, size=(96, 54)).frames
    assert half.shape == (3, 54, 96, 3) and abs(int(np.argmax(half[0, 30, :, 1] > 127)) - 48) <= 1
    square = read_video(clip, size=(108, 108), fit="crop").frames  # centre 108 of the 192 displayed
    assert abs(int(np.argmax(square[0, 60, :, 1] > 127)) - 54) <= 1
    assert np.abs(square[0].astype(int) - fit_frames(clip_frames.frames, 108, 108, "crop")[0]).mean() < 8


def test_upside_down_clip_is_turned(tmp_path):
    frames = np.zeros((2, 48, 64, 3), np.uint8)
    frames[:, :10, :20] = 255  # top-left as stored
    clip = with_display_rotation(write_video(tmp_path / "plain.mp4", frames, 10), tmp_path / "flipped.mp4", 180)
    info = probe_video(clip)
    assert (info.width, info.height, info.rotation) == (64, 48, 180)
    ys, xs = np.nonzero(read_video(clip).frames[0, ..., 0] > 128)
    assert ys.min() >= 37 and xs.min() >= 43 and (ys.max(), xs.max()) == (47, 63)  # now bottom-right
