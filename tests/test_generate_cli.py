"""``ex4d generate`` end to end on real mp4 files (PyAV), its input errors, and bench/generate_gpu.py's
argument parsing and tiny CPU path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ex4d.cli import main  # noqa: E402
from ex4d.video import read_video, write_video  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def guides(tmp_path_factory):
    d = tmp_path_factory.mktemp("guides")
    rng = np.random.default_rng(0)
    t, h, w = 9, 32, 48
    color = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    mask = np.ones((t, h, w), bool)
    mask[1:, :, 30:] = False
    color[~mask] = 0
    write_video(d / "color.mp4", color, 15)
    write_video(d / "mask.mp4", (mask * 255).astype(np.uint8), 15)
    write_video(d / "mask_short.mp4", (mask[:7] * 255).astype(np.uint8), 15)
    write_video(d / "mask_small.mp4", (mask[:, :, :32] * 255).astype(np.uint8), 15)
    grey = (mask * 255).astype(np.uint8)
    grey[:, :4, :4] = 128
    write_video(d / "mask_grey.mp4", grey, 15)
    np.savez(d / "render.npz", color=color, mask=mask)
    return d, color, mask


def run(capsys, *args):
    code = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def one_thread():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffsynth")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cli_tiny_generator_on_mp4_guides(guides, tmp_path, capsys, one_thread):
    d, color, _ = guides
    out = tmp_path / "shot.mp4"
    code, stdout, err = run(capsys, "--color-video", d / "color.mp4", "--mask-video", d / "mask.mp4", "--generator", "tiny",
                            "--steps", "1", "--out", out)
    assert code == 0, err
    assert "wrote" in stdout and out.is_file()
    video = read_video(out)
    assert video.frames.shape == color.shape and abs(video.fps - 15) < 1e-6


def test_cli_draft_from_lossless_guides_keeps_valid_pixels(guides, tmp_path, capsys):
    d, color, mask = guides
    out = tmp_path / "draft.mp4"
    code, _, err = run(capsys, "--guides", d / "render.npz", "--generator", "draft", "--frames", "5", "--size", "64x32", "--out", out)
    assert code == 0, err
    assert read_video(out).frames.shape == (5, 32, 64, 3)


@pytest.mark.parametrize("args, message", [
    (("--mask-video", "mask_short.mp4"), "the colour video has 9 frames but the mask video has 7"),
    (("--mask-video", "mask_small.mp4"), "the colour video is 48x32 but the mask video is 32x32"),
    (("--mask-video", "mask_grey.mp4", "--strict-mask"), "the mask is not binary"),
    (("--mask-video", "mask.mp4", "--frames", "12"), "--frames 12 asks for more frames than the guides have (9)"),
    (("--mask-video", "mask.mp4", "--size", "big"), "--size must look like 512x512"),
    (("--mask-video", "mask.mp4", "--generator", "ex4d", "--models", "{tmp}/none"), "missing 12 weight file(s)"),
    (("--mask-video", "mask.mp4", "--fps", "0"), "--fps must be greater than 0"),
    (("--mask-video", "mask.mp4", "--fps", "-24"), "--fps must be greater than 0"),
    (("--mask-video", "mask.mp4", "--fps", "nan"), "--fps must be a finite number"),
    (("--mask-video", "mask.mp4", "--mask-threshold", "2"), "--mask-threshold must be between 0 and 1"),
    (("--mask-video", "mask.mp4", "--mask-threshold", "nan"), "--mask-threshold must be a finite number"),
    (("--mask-video", "mask.mp4", "--size", "97x65"), "--size 97x65: width and height must be even numbers"),
    (("--mask-video", "mask.mp4", "--steps", "0"), "--steps must be at least 1"),
    (("--mask-video", "mask.mp4", "--cfg", "inf"), "--cfg must be a finite number"),
    (("--mask-video", "mask.mp4", "--device", "gpu0"), "--device gpu0: not a device name"),
])
def test_cli_input_errors(guides, tmp_path, capsys, args, message):
    d, _, _ = guides
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    args = [str(d / a) if a.startswith("mask") and a.endswith(".mp4") else a for a in args]
    out = tmp_path / "x.mp4"
    code, _, err = run(capsys, "--color-video", d / "color.mp4", *args, "--generator" if "--generator" not in args else "--seed",
                       "draft" if "--generator" not in args else "0", "--out", out)
    assert code == 2
    assert message in err and err.startswith("error: ")
    assert not out.exists()


def test_cli_grey_mask_warns_with_count(guides, tmp_path, capsys):
    d, _, _ = guides
    with pytest.warns(UserWarning, match=r"the mask is not binary: \d+ grey pixel\(s\).*binarised at 0.5"):
        code, _, err = run(capsys, "--color-video", d / "color.mp4", "--mask-video", d / "mask_grey.mp4", "--generator",
                           "draft", "--out", tmp_path / "g.mp4")
    assert code == 0, err


def test_bench_arguments_and_tiny_cpu_run(tmp_path, capsys, one_thread):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import generate_gpu
    finally:
        sys.path.remove(str(REPO / "bench"))
    args = generate_gpu.parse_args(["--mode", "fp8"])
    assert (args.steps, args.frames, args.width, args.height, args.cfg) == (25, 49, 512, 512, 5.0)
    assert [c["mode"] for c in args.config_list] == ["fp8"]
    args = generate_gpu.parse_args(["--configs", "resident,resident/reference,stream@24,offload@0/steps=5,"
                                    "resident/preview=0.1/metric=x_mod"])
    assert [(c["mode"], c["vram_limit"], c["speed"], c["steps"], c["preview"]) for c in args.config_list] == [
        ("resident", None, "fast", None, 0.0), ("resident", None, "reference", None, 0.0), ("stream", 24.0, "fast", None, 0.0),
        ("offload", 0.0, "fast", 5, 0.0), ("resident", None, "fast", None, 0.1)]
    for bad in (["--size", "500x500"], ["--mode", "swap"], ["--configs", "fp8@3"], ["--configs", "resident/warp"]):
        with pytest.raises(SystemExit):
            generate_gpu.parse_args(bad)
    out = tmp_path / "r.json"
    code = generate_gpu.main(["--tiny", "--device", "cpu", "--steps", "3", "--frames", "5", "--size", "32x32",
                              "--configs", "resident,stream@0,resident/preview=5/metric=x_mod", "--json-out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["arch"] == "tiny", report
    configs = report["configs"]
    assert list(configs) == ["resident", "stream@0", "resident/preview=5/metric=x_mod"]
    for entry in configs.values():
        assert entry["ok"], entry.get("error")
        assert entry["output_shape"] == [5, 32, 32, 3]
        for key in ("seconds_per_step", "total_seconds", "encode_seconds", "decode_seconds", "build_seconds"):
            assert entry[key] >= 0
    assert configs["stream@0"]["stream_plan"]["streamed_blocks"] == 2
    assert configs["stream@0"]["psnr_db_vs"]["resident"] > 60  # streaming changes nothing; the merged LoRA rounds once
    preview = configs["resident/preview=5/metric=x_mod"]
    assert preview["skipped_forwards"] == 2 and preview["forwards"] == 6  # the middle step of 3, both branches
    assert preview["psnr_db_vs"]["resident"] < 100.0
    assert set(json.loads(capsys.readouterr().out)["configs"]) == set(configs)


def _generate_errors(capsys, *args) -> str:
    code, stdout, err = run(capsys, *args)
    assert code == 2 and "Traceback" not in err and not stdout, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def test_truncated_guides_npz_is_one_line_naming_the_file(guides, tmp_path, capsys):
    d, _, _ = guides
    trunc = tmp_path / "trunc.npz"
    data = (d / "render.npz").read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    err = _generate_errors(capsys, "--guides", trunc, "--generator", "draft", "--out", tmp_path / "x.mp4")
    assert err == f"error: --guides {trunc}: not a complete .npz file (truncated or corrupt)"
    assert not (tmp_path / "x.mp4").exists()


def test_out_problems_are_found_before_loading_guides_or_models(guides, tmp_path, capsys):
    """ex4d with missing weights would fail too: the --out problem must be what is reported, first."""
    d, _, _ = guides
    common = ["--color-video", d / "color.mp4", "--mask-video", d / "mask.mp4", "--generator", "ex4d", "--models", tmp_path / "none"]
    err = _generate_errors(capsys, *common, "--out", tmp_path)
    assert err == f"error: --out {tmp_path} is a folder; give a file name"
    err = _generate_errors(capsys, *common, "--out", tmp_path / "missing" / "x.mp4")
    assert "does not exist" in err
    err = _generate_errors(capsys, *common, "--out", "")
    assert err == "error: --out is empty (an unset shell variable?); give a path"


def test_out_that_is_an_input_is_refused(guides, tmp_path, capsys):
    d, _, _ = guides
    colour = tmp_path / "color.mp4"
    colour.write_bytes((d / "color.mp4").read_bytes())
    err = _generate_errors(capsys, "--color-video", colour, "--mask-video", d / "mask.mp4", "--generator", "draft",
                           "--out", colour)
    assert err.endswith("would destroy it (choose another --out file)") and "--name" not in err  # generate has no --name
    assert colour.read_bytes() == (d / "color.mp4").read_bytes()


def test_guides_npz_keeps_the_source_frame_rate(guides, tmp_path, capsys):
    """recon stores the source fps in render_<name>.npz; generate writes the shot at that rate
    (23.976 fps footage must not come back 15 fps and 1.6x too long), unless --fps says otherwise."""
    d, color, mask = guides
    np.savez(tmp_path / "render.npz", color=color, mask=mask, fps=np.float64(24000 / 1001))
    code, stdout, err = run(capsys, "--guides", tmp_path / "render.npz", "--generator", "draft", "--out", tmp_path / "a.mp4")
    assert code == 0, err
    assert abs(read_video(tmp_path / "a.mp4").fps - 24000 / 1001) < 1e-3
    assert "23.976 fps" in stdout
    code, _, err = run(capsys, "--guides", tmp_path / "render.npz", "--generator", "draft", "--fps", "30", "--out", tmp_path / "b.mp4")
    assert code == 0, err
    assert abs(read_video(tmp_path / "b.mp4").fps - 30) < 1e-6


def test_old_guides_npz_without_fps_warns_and_writes_15(guides, tmp_path, capsys):
    d, _, _ = guides
    with pytest.warns(UserWarning, match="stores no frame rate.*15 fps: pass --fps"):
        code, _, err = run(capsys, "--guides", d / "render.npz", "--generator", "draft", "--out", tmp_path / "a.mp4")
    assert code == 0, err
    assert abs(read_video(tmp_path / "a.mp4").fps - 15) < 1e-6


def test_recon_guides_store_the_video_fps(tmp_path, tiny_clip):
    from ex4d.pipeline import load_shot_inputs, make_camera_path, run_shot, write_shot

    inputs = load_shot_inputs(tiny_clip.video, depth=tiny_clip.depth_file, num_frames=2)
    path = make_camera_path(inputs.num_frames, inputs.intrinsics, inputs.depth[0], cam="orbit_right")
    write_shot(tmp_path, "x", run_shot(inputs.frames, inputs.depth, inputs.intrinsics, path, renderer="torch", device="cpu"), inputs.fps)
    with np.load(tmp_path / "render_x.npz") as z:
        assert float(z["fps"]) == pytest.approx(tiny_clip.fps)


def test_odd_guides_print_the_size_written(tmp_path, capsys):
    """Guides of an odd size are padded by the encoder: the summary says the size in the file."""
    rng = np.random.default_rng(1)
    color = rng.integers(0, 256, (3, 33, 47, 3), dtype=np.uint8)
    np.savez(tmp_path / "odd.npz", color=color, mask=np.ones((3, 33, 47), bool), fps=np.float64(10))
    with pytest.warns(UserWarning, match="padded 47x33 to 48x34"):
        code, stdout, err = run(capsys, "--guides", tmp_path / "odd.npz", "--generator", "draft", "--out", tmp_path / "o.mp4")
    assert code == 0, err
    assert "48x34" in stdout and read_video(tmp_path / "o.mp4").frames.shape[1:3] == (34, 48)


def test_mask_threshold_1_is_refused_before_reading(guides, tmp_path, capsys):
    """valid = brighter than threshold x 255: at 1 nothing is valid, the whole shot would be invented."""
    d, _, _ = guides
    err = _generate_errors(capsys, "--color-video", d / "color.mp4", "--mask-video", tmp_path / "not-read.mp4",
                           "--mask-threshold", "1", "--generator", "draft", "--out", tmp_path / "x.mp4")
    assert err == ("error: --mask-threshold must be between 0 and 1, 1 excluded (a valid pixel is brighter than "
                   "threshold x 255), got 1")


@pytest.mark.parametrize("source", ["npz", "video"])
def test_mask_without_a_valid_pixel_is_an_error(guides, tmp_path, capsys, source):
    d, color, mask = guides
    empty = np.zeros_like(mask)
    if source == "npz":
        np.savez(tmp_path / "render.npz", color=color, mask=empty)
        args = ["--guides", tmp_path / "render.npz"]
    else:
        write_video(tmp_path / "mask.mp4", empty.astype(np.uint8), 15)
        args = ["--color-video", d / "color.mp4", "--mask-video", tmp_path / "mask.mp4"]
    err = _generate_errors(capsys, *args, "--generator", "draft", "--out", tmp_path / "x.mp4")
    assert "no valid guide pixel in any frame" in err and "check --mask-threshold" in err
    assert not (tmp_path / "x.mp4").exists()


def test_mostly_empty_mask_warns(guides, tmp_path, capsys):
    d, color, mask = guides
    few = np.zeros_like(mask)
    few[0, :2, :2] = True  # 4 of 13824 pixels
    np.savez(tmp_path / "render.npz", color=color, mask=few)
    with pytest.warns(UserWarning, match=r"only 0\.03% of guide pixels are valid"):
        code, _, err = run(capsys, "--guides", tmp_path / "render.npz", "--generator", "draft", "--out", tmp_path / "x.mp4")
    assert code == 0, err


@pytest.mark.parametrize("name, expected", [
    ("newdir/", "ends in a separator (a folder); give a video file name such as {out}shot.mp4"),
    ("x.npz", "the shot is written as MP4 (H.264); give a file name ending in .mp4"),
    ("x.png", "the shot is written as MP4 (H.264); give a file name ending in .mp4"),
    ("x.gif", "the shot is written as MP4 (H.264); give a file name ending in .mp4"),
    ("shot", "the shot is written as MP4 (H.264); give a file name ending in .mp4"),
])
def test_out_must_be_an_mp4_file_name(guides, tmp_path, capsys, name, expected):
    """write_video writes MP4: 'newdir/' must not become a file called newdir, nor x.gif hold MP4 data."""
    d, _, _ = guides
    out = str(tmp_path / name) + ("/" if name.endswith("/") else "")
    err = _generate_errors(capsys, "--guides", d / "render.npz", "--generator", "draft", "--out", out)
    assert err == f"error: --out {out}" + (" " if name.endswith("/") else ": ") + expected.format(out=out)
    assert list(tmp_path.iterdir()) == []


def test_guides_that_are_not_a_guides_file(guides, tmp_path, capsys):
    np.savez(tmp_path / "depth.npz", depth=np.ones((2, 4, 4), np.float32))
    err = _generate_errors(capsys, "--guides", tmp_path / "depth.npz", "--generator", "draft", "--out", tmp_path / "x.mp4")
    assert err == (f"error: --guides {tmp_path / 'depth.npz'}: not a guides file (no 'color' or 'mask' array; "
                   "render_<name>.npz from ex4d recon has 'color' and 'mask')")
