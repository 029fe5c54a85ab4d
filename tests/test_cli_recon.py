"""``ex4d recon`` / ``ex4d run`` end to end on the tiny clip, and every bad input: one-line error,
non-zero exit, nothing half-written in --out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ex4d.camera import CameraPath, Intrinsics, orbit_poses, read_transforms, write_transforms
from ex4d.cli import main
from ex4d.video import probe_video, read_video, write_npz_atomic, write_video

GUIDE_FILES = ("color_{n}.mp4", "mask_{n}.mp4", "render_{n}.npz", "cameras_{n}.json")


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def check_guides(out: Path, name: str, T: int, W: int, H: int) -> dict:
    for pattern in GUIDE_FILES:
        assert (out / pattern.format(n=name)).is_file(), pattern
    with np.load(out / f"render_{name}.npz") as z:
        color, mask = z["color"], z["mask"]
    assert color.shape == (T, H, W, 3) and color.dtype == np.uint8
    assert mask.shape == (T, H, W) and mask.dtype == np.bool_
    assert mask[0].all()  # frame 0 = the source camera: everything valid
    assert 0.05 < mask[-1].mean() < 1.0  # the move uncovers something
    assert (color[~mask] == 0).all()  # colour is masked
    mask_video = read_video(out / f"mask_{name}.mp4").frames[..., 0]
    assert mask_video.shape == (T, H, W)
    assert ((mask_video > 127) == mask).mean() > 0.97  # 255 = valid (mp4 edges may blur a little)
    info = probe_video(out / f"color_{name}.mp4")
    assert (info.num_frames, info.width, info.height) == (T, W, H)
    path = read_transforms(out / f"cameras_{name}.json")
    assert len(path) == T and (path.width, path.height) == (W, H)
    np.testing.assert_allclose(path.c2w[0], np.eye(4), atol=1e-9)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
    return {"color": color, "mask": mask, "path": path}


def test_recon_preset_in_process(tmp_path, tiny_clip, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        ["recon", tiny_clip.video, "--depth", tiny_clip.depth_file, "--cam", "orbit_right", "--angle", "20", "--out", out, "--quiet"],
        capsys,
    )
    assert code == 0, err
    g = check_guides(out, "orbit_right", 6, 64, 48)
    assert "intrinsics: depth file" in stdout  # K came from depth.npz
    np.testing.assert_allclose(g["path"].K[0], tiny_clip.K)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.format(n="orbit_right") for p in GUIDE_FILES)
    # again into the same folder, shorter: every file is replaced, nothing else is left behind
    code, _, err = run_cli(["recon", tiny_clip.video, "--depth", tiny_clip.depth_file, "--frames", "3", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.format(n="orbit_right") for p in GUIDE_FILES)
    assert probe_video(out / "color_orbit_right.mp4").num_frames == 3


def test_recon_trajectory_crop_size_mesh_as_subprocess(tmp_path, tiny_clip):
    """The console script, a transforms.json path (written at another resolution), --size/--fit crop,
    --frames and --save-mesh."""
    intr = Intrinsics.from_focal(112.0, 96, 96)  # a camera file exported at 2x the working size
    poses = orbit_poses(6, 4.0, yaw_deg=-25.0)
    write_transforms(CameraPath(poses, intr.K, 96, 96, name="my_move"), tmp_path / "transforms.json")
    out = tmp_path / "out"
    exe = Path(sys.executable).with_name("ex4d")
    assert exe.is_file(), f"console script missing next to {sys.executable}"
    proc = subprocess.run(
        [str(exe), "recon", str(tiny_clip.video), "--depth", str(tiny_clip.depth_file), "--trajectory", str(tmp_path / "transforms.json"),
         "--frames", "5", "--size", "48x48", "--fit", "crop", "--focal", "56", "--save-mesh", "--renderer", "torch", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "render" in proc.stderr  # the tqdm bar
    g = check_guides(out, "my_move", 5, 48, 48)
    # the trajectory's own intrinsics, rescaled to the working size
    np.testing.assert_allclose(g["path"].K[0], Intrinsics.from_focal(56.0, 48, 48).K)
    assert (out / "dwmesh_my_move.npz").is_file() and (out / "dwmesh_my_move_frame0.ply").is_file()
    with np.load(out / "dwmesh_my_move.npz") as z:
        assert z["vertices"].shape[0] == 5


def _generator_available(name: str) -> str | None:
    try:
        from ex4d.generate import load_generator
    except ImportError as e:
        return f"ex4d.generate is not importable yet ({e})"
    try:
        load_generator(name, models_dir=None, device="cpu")
    except Exception as e:  # noqa: BLE001 - the reason goes into the skip message
        return f"generator '{name}' cannot be loaded here: {e}"
    return None


def test_run_with_draft_generator(tmp_path, tiny_clip, capsys):
    reason = _generator_available("draft")
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        ["run", tiny_clip.video, "--depth", tiny_clip.depth_file, "--cam", "orbit_left", "--generator", "draft", "--out", out, "--quiet"],
        capsys,
    )
    assert code == 0, err
    g = check_guides(out, "orbit_left", 6, 64, 48)
    shot = read_video(out / "shot_orbit_left.mp4").frames
    assert shot.shape == (6, 48, 64, 3)
    # the holes are filled: no large black area where the guide had none
    assert (shot[-1][~g["mask"][-1]].max(axis=-1) > 10).mean() > 0.5


# ----------------------------------------------------------------------------------------- bad inputs


@pytest.fixture()
def bad_inputs(tmp_path, tiny_clip):
    """Builders of broken inputs; each returns CLI args replacing the good ones."""
    d = tmp_path / "inputs"
    d.mkdir()

    def depth_file(depth, name="depth.npz", **extra):
        return write_npz_atomic(d / name, depth=np.asarray(depth, np.float32), **extra)

    def trajectory(data, name="transforms.json"):
        (d / name).write_text(json.dumps(data))
        return d / name

    good_traj = {"fl_x": 56.0, "w": 64, "h": 48,
                 "frames": [{"transform_matrix": M.tolist()} for M in orbit_poses(6, 4.0, yaw_deg=10)]}
    depth = tiny_clip.depth
    cases = {}
    (d / "text.mp4").write_text("not a video")
    cases["unreadable_video"] = ([d / "text.mp4", "--depth", tiny_clip.depth_file], "not a readable video")
    (d / "empty.mp4").write_bytes(b"")
    cases["empty_video"] = ([d / "empty.mp4", "--depth", tiny_clip.depth_file], "empty")
    cases["missing_video"] = ([d / "none.mp4", "--depth", tiny_clip.depth_file], "not found")
    cases["depth_shape"] = ([tiny_clip.video, "--depth", depth_file(depth[:, :, :40], "shape.npz")], "aspect")
    cases["depth_frames"] = ([tiny_clip.video, "--depth", depth_file(depth[:4], "frames.npz")], "has 4 frames but the video has 6")
    cases["depth_longer"] = ([tiny_clip.video, "--depth", depth_file(np.concatenate([depth, depth[:1]]), "longer.npz")], "has 7 frames but the video has 6")
    z = depth.copy()
    z[2, 5, 5] = 0
    cases["depth_zero"] = ([tiny_clip.video, "--depth", depth_file(z, "zero.npz")], "zero or negative")
    z = depth.copy()
    z[3] *= -1
    cases["depth_negative"] = ([tiny_clip.video, "--depth", depth_file(z, "neg.npz")], "zero or negative")
    z = depth.copy()
    z[1, 0, 0] = np.nan
    cases["depth_nan"] = ([tiny_clip.video, "--depth", depth_file(z, "nan.npz")], "NaN")
    cases["depth_missing_key"] = ([tiny_clip.video, "--depth", write_npz_atomic(d / "nokey.npz", disparity=depth)], "no 'depth' array")
    cases["no_depth"] = ([tiny_clip.video], "no depth given")
    good = [tiny_clip.video, "--depth", tiny_clip.depth_file]
    bad = json.loads(json.dumps(good_traj))
    bad["frames"][2]["transform_matrix"] = bad["frames"][2]["transform_matrix"][:3]
    cases["traj_matrix_shape"] = (good + ["--trajectory", trajectory(bad, "shape.json")], "must be 4x4")
    bad = json.loads(json.dumps(good_traj))
    del bad["frames"][4]["transform_matrix"]
    cases["traj_missing_matrix"] = (good + ["--trajectory", trajectory(bad, "nomatrix.json")], "no 'transform_matrix'")
    bad = json.loads(json.dumps(good_traj))
    del bad["w"], bad["h"]
    cases["traj_missing_size"] = (good + ["--trajectory", trajectory(bad, "nosize.json")], "'w' and 'h'")
    bad = json.loads(json.dumps(good_traj))
    del bad["fl_x"]
    cases["traj_missing_focal"] = (good + ["--trajectory", trajectory(bad, "nofocal.json")], "no focal length")
    bad = json.loads(json.dumps(good_traj))
    bad["frames"] = bad["frames"][:4]
    cases["traj_too_short"] = (good + ["--trajectory", trajectory(bad, "short.json")], "has 4 frames but the video has 6")
    bad = json.loads(json.dumps(good_traj))
    bad["w"] = 48
    cases["traj_aspect"] = (good + ["--trajectory", trajectory(bad, "aspect.json")], "aspect ratio")
    cases["traj_missing_file"] = (good + ["--trajectory", d / "nope.json"], "not found")
    cases["unknown_preset"] = (good + ["--cam", "spin"], "unknown camera preset")
    cases["angle_too_big"] = (good + ["--cam", "orbit_up", "--angle", "120"], "90")
    cases["too_many_frames"] = (good + ["--frames", "9"], "only 6 frames")
    cases["odd_size"] = (good + ["--size", "63x48"], "even")
    cases["bad_size"] = (good + ["--size", "big"], "512x512")
    cases["bad_name"] = (good + ["--name", "../escape"], "shot name")
    cases["negative_focal"] = (good + ["--focal", "-5"], "--focal")
    cases["angle_nan"] = (good + ["--angle", "nan"], "--angle must be a finite number")
    cases["distance_nan"] = (good + ["--cam", "zoom_in", "--distance", "nan"], "--distance must be a finite number")
    cases["distance_negative"] = (good + ["--cam", "zoom_in", "--distance", "-1"], "--distance must be greater than 0")
    cases["fov_inf"] = (good + ["--fov", "inf"], "--fov must be a finite number")
    cases["device_string"] = (good + ["--device", "gpu0"], "--device gpu0: not a device name")
    cases["arc_with_angle"] = (good + ["--cam", "30", "--angle", "60"], "--cam 30 is EX-4D's fixed arc and takes no --angle")
    cases["empty_cam"] = (good + ["--cam", ""], "--cam is empty")
    return cases


BAD_CASES = [
    "unreadable_video", "empty_video", "missing_video", "depth_shape", "depth_frames", "depth_longer", "depth_zero",
    "depth_negative", "depth_nan", "depth_missing_key", "no_depth", "traj_matrix_shape", "traj_missing_matrix",
    "traj_missing_size", "traj_missing_focal", "traj_too_short", "traj_aspect", "traj_missing_file", "unknown_preset",
    "angle_too_big", "too_many_frames", "odd_size", "bad_size", "bad_name", "negative_focal", "angle_nan", "distance_nan",
    "distance_negative", "fov_inf", "device_string", "arc_with_angle", "empty_cam",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_error_nothing_written(tmp_path, bad_inputs, capsys, case):
    args, expected = bad_inputs[case]
    out = tmp_path / "out"
    code, stdout, err = run_cli(["recon", *args, "--out", out, "--quiet"], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1] == errors[0]  # the error is the last thing said
    assert expected in errors[0], errors[0]
    assert not out.exists()  # nothing half-written (not even an empty folder)


def test_failure_leaves_existing_out_untouched(tmp_path, bad_inputs, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "color_orbit_right.mp4").write_bytes(b"earlier result")
    args, _ = bad_inputs["traj_too_short"]
    code, _, _ = run_cli(["recon", *args, "--out", out, "--quiet"], capsys)
    assert code == 2
    assert [p.name for p in out.iterdir()] == ["color_orbit_right.mp4"]
    assert (out / "color_orbit_right.mp4").read_bytes() == b"earlier result"


def test_run_missing_weights_writes_nothing(tmp_path, tiny_clip, capsys):
    reason = _generator_available("draft")
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["run", tiny_clip.video, "--depth", tiny_clip.depth_file, "--generator", "ex4d", "--models", tmp_path / "no_models", "--out", out, "--quiet"],
        capsys,
    )
    assert code == 2 and err.rstrip().splitlines()[-1].startswith("error:")
    assert not out.exists()


def test_out_is_a_file(tmp_path, tiny_clip, capsys):
    out = tmp_path / "out"
    out.write_text("a file")
    code, _, err = run_cli(["recon", tiny_clip.video, "--depth", tiny_clip.depth_file, "--out", out, "--quiet"], capsys)
    assert code == 2 and "not a folder" in err
    assert out.read_text() == "a file"


@pytest.mark.slow
def test_recon_with_depth_model(tmp_path, tiny_clip, capsys):
    """--depth-model through the depth helper's real loader, on a tiny random-initialised Depth Anything
    V2 (transformers classes, saved as the public checkpoint folders are laid out)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("ex4d.depth.models.depth_anything_v2", reason="depth models not there yet")
    weights = tmp_path / "Depth-Anything-V2-Small-hf"
    backbone = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                         patch_size=14, image_size=56, out_indices=[1, 2, 3, 4], apply_layernorm=True,
                                         reshape_hidden_states=False)
    cfg = transformers.DepthAnythingConfig(backbone_config=backbone, fusion_hidden_size=16, neck_hidden_sizes=[8, 16, 32, 32],
                                           head_hidden_size=8, reassemble_hidden_size=32)
    transformers.DepthAnythingForDepthEstimation(cfg).save_pretrained(weights)
    (weights / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "keep_aspect_ratio": True, "ensure_multiple_of": 14, "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": 56, "width": 56}, "image_processor_type": "DPTImageProcessor"}))
    out = tmp_path / "out"
    code, stdout, err = run_cli(["recon", tiny_clip.video, "--depth-model", "depth-anything-v2-small", "--depth-weights", weights,
                                 "--median-depth", "3", "--cam", "zoom_in", "--device", "cpu", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert "intrinsics: EX-4D default" in stdout  # a depth model gives no intrinsics: say what was assumed
    for pattern in GUIDE_FILES:
        assert (out / pattern.format(n="zoom_in")).is_file()


def test_depth_model_without_weights(tmp_path, tiny_clip, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["recon", tiny_clip.video, "--depth-model", "depth-anything-v2-small", "--out", out, "--quiet"], capsys)
    assert code == 2 and "--depth-weights" in err and not out.exists()
    code, _, err = run_cli(["recon", tiny_clip.video, "--depth-model", "depth-anything-v2-small", "--depth-weights",
                            tmp_path / "missing", "--out", out, "--quiet"], capsys)
    assert code == 2 and err.rstrip().splitlines()[-1].startswith("error:") and not out.exists()


EXAMPLE = Path(__file__).parents[1] / "examples" / "synthetic-room"


def test_example_files_are_consistent():
    files = {p.name: p for p in EXAMPLE.iterdir()}
    assert {"video.mp4", "depth.npz", "camera_path.json"} <= set(files)
    assert sum(p.stat().st_size for p in EXAMPLE.iterdir()) < 2 * 1024 * 1024
    info = probe_video(files["video.mp4"])
    from ex4d.depth.files import check_depth, load_depth

    depth = load_depth(files["depth.npz"])
    assert depth.K is not None and depth.size == (info.width, info.height)
    check_depth(depth.depth, info.num_frames, (info.height, info.width))
    path = read_transforms(files["camera_path.json"])
    assert len(path) == info.num_frames and (path.width, path.height) == (info.width, info.height)


@pytest.mark.slow
def test_readme_main_job_on_the_example(tmp_path, capsys):
    """The README's fresh-machine command (on the first 8 frames, to keep the suite quick)."""
    reason = _generator_available("draft")
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["run", EXAMPLE / "video.mp4", "--depth", EXAMPLE / "depth.npz", "--cam", "orbit_right",
                                 "--angle", "60", "--generator", "draft", "--frames", "8", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert (out / "shot_orbit_right.mp4").is_file()
    assert probe_video(out / "shot_orbit_right.mp4").num_frames == 8


def test_write_failure_is_one_line_and_leaves_nothing(tmp_path, tiny_clip):
    """A failure while writing (here: a name that is a folder already, so the final move fails)."""
    from ex4d.errors import Ex4dError
    from ex4d.pipeline import ShotResult, write_shot
    from ex4d.render import Guides

    T, H, W = 2, 8, 10
    guides = Guides(np.zeros((T, H, W, 3), np.uint8), np.ones((T, H, W), bool), np.zeros((T, H, W), np.float32))
    path = CameraPath(np.repeat(np.eye(4)[None], T, 0), Intrinsics.from_focal(10, W, H).K, W, H, name="x")
    out = tmp_path / "out"
    (out / "render_x.npz").mkdir(parents=True)  # os.replace of a file onto a non-empty folder fails
    (out / "render_x.npz" / "keep").write_text("")
    (out / "color_x.mp4").write_bytes(b"earlier result")  # moved before render_x.npz: must come back
    with pytest.raises(Ex4dError, match="cannot write the results") as e:
        write_shot(out, "x", ShotResult(None, guides, path), 10.0)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["color_x.mp4", "render_x.npz"]  # all new files or none
    assert (out / "color_x.mp4").read_bytes() == b"earlier result"


@pytest.mark.parametrize("size,fit", [((48, 48), "crop"), ((64, 32), "resize")])
def test_fitted_shot_matches_ground_truth(tmp_path, size, fit):
    """Files -> fit -> mesh -> guides agree with an exact ray-cast of the synthetic scene seen by the
    fitted camera: frames, depth and intrinsics went through the same crop/scale. (A principal point
    off by 6 px - a crop that forgot to move it - drops the PSNR from ~23 dB to ~15 dB.)"""
    from ex4d.evaluate import score
    from ex4d.pipeline import load_shot_inputs, make_camera_path, run_shot
    from ex4d.synthetic import make_scene

    scene = make_scene(seed=1, width=96, height=64, num_frames=3)
    frames, depth = scene.source()
    write_video(tmp_path / "v.mp4", frames, 10)
    write_npz_atomic(tmp_path / "d.npz", depth=depth, K=scene.K)
    inputs = load_shot_inputs(tmp_path / "v.mp4", depth=tmp_path / "d.npz", size=size, fit=fit)
    assert inputs.intrinsics_source == "depth file"
    path = make_camera_path(inputs.num_frames, inputs.intrinsics, inputs.depth[0], cam="orbit_right", angle=15)
    result = run_shot(inputs.frames, inputs.depth, inputs.intrinsics, path, renderer="torch", device="cpu")
    gt_color, gt_visible, _ = scene.target_views(path)
    for t in range(3):
        s = score(result.guides.color[t], result.guides.mask[t], gt_color[t], gt_visible[t])
        assert s.psnr > 20.0 and s.precision > 0.99, (t, s)


def test_cut_short_video_is_blamed_not_the_depth(tmp_path, capsys):
    """A truncated copy: the error names the video, not the (correct) 24-frame depth."""
    from conftest import cut_clip, make_tiny_scene

    cut = cut_clip(tmp_path)
    _, depth, K = make_tiny_scene(24)
    write_npz_atomic(tmp_path / "depth.npz", depth=depth, K=K)
    out = tmp_path / "out"
    code, _, err = run_cli(["recon", cut, "--depth", tmp_path / "depth.npz", "--out", out, "--quiet"], capsys)
    assert code == 2 and not out.exists()
    assert "of 24 frames - the file is cut short or corrupt" in err.splitlines()[-1] and "depth has" not in err
    # only the first frame, which decodes fine: the user asked for just that
    code, _, err = run_cli(["recon", cut, "--depth", tmp_path / "depth.npz", "--frames", "1", "--out", out, "--quiet"], capsys)
    assert code == 0, err


def test_video_one_frame_short_uses_the_listed_depth_with_a_warning(tmp_path, capsys):
    """The mp4 lists 24 frames, 23 decode, the depth has 24 (one per listed frame): the footage is fine
    but for its last frame, so the shot uses 23 frames and the warning names the video as short."""
    from conftest import clip_missing_last_frame, make_tiny_scene

    short = clip_missing_last_frame(tmp_path)
    _, depth, K = make_tiny_scene(24)
    write_npz_atomic(tmp_path / "depth.npz", depth=depth, K=K)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"lists 24 frames but 23 decode \(the video is short, not the depth\); "
                      r"using the first 23 of the 24 depth maps"):
        code, _, err = run_cli(["recon", short, "--depth", tmp_path / "depth.npz", "--out", out, "--quiet"], capsys)
    assert code == 0 and "depth has" not in err, err
    assert probe_video(out / "color_orbit_right.mp4").num_frames == 23
    # depth of another length is still the depth's problem
    write_npz_atomic(tmp_path / "depth20.npz", depth=depth[:20], K=K)
    code, _, err = run_cli(["recon", short, "--depth", tmp_path / "depth20.npz", "--out", out, "--quiet"], capsys)
    assert code == 2 and "depth has 20 frames but the video has 23" in err


def test_large_size_warning_suggests_the_clips_own_aspect(tmp_path):
    """A portrait clip: the suggested preview size is portrait too (--fit resize would stretch 512x288)."""
    from conftest import make_tiny_scene
    from ex4d.pipeline import load_shot_inputs, preview_size

    assert preview_size(1920, 1080) == (512, 288) and preview_size(1080, 1920) == (288, 512)
    assert preview_size(1440, 1080) == (512, 384)
    frames, depth, _ = make_tiny_scene(2, 48, 64)
    write_video(tmp_path / "portrait.mp4", frames, 10)
    write_npz_atomic(tmp_path / "d.npz", depth=depth)
    with pytest.warns(UserWarning, match=r"--size 384x512 for a quicker preview"):
        load_shot_inputs(tmp_path / "portrait.mp4", depth=tmp_path / "d.npz", size=(1080, 1440))


# ------------------------------------------------------------------------------ output safety, set of a shot


def _shot_args(tiny_clip, out, *extra, video=None, depth=None, command="recon"):
    return [command, video or tiny_clip.video, "--depth", depth or tiny_clip.depth_file, "--out", out, "--quiet", *extra]


@pytest.mark.parametrize("command, video_name, depth_name", [
    ("run", "shot_orbit_right.mp4", None),  # the output shot would be written over the input video
    ("recon", None, "render_orbit_right.npz"),  # the guides npz over the depth file
    ("recon", "shot_orbit_right.mp4", None),  # recon would remove that shot as a stale member of the set
])
def test_output_that_is_an_input_is_refused_before_any_work(tmp_path, tiny_clip, capsys, command, video_name, depth_name):
    out = tmp_path / "out"
    out.mkdir()
    video, depth = tiny_clip.video, tiny_clip.depth_file
    if video_name:
        video = out / video_name
        video.write_bytes(tiny_clip.video.read_bytes())
    if depth_name:
        depth = out / depth_name
        depth.write_bytes(tiny_clip.depth_file.read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(_shot_args(tiny_clip, out, video=video, depth=depth, command=command), capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: --out:") and "would destroy it" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_output_through_a_symlinked_folder_is_still_the_input(tmp_path, tiny_clip, capsys):
    footage = tmp_path / "footage"
    footage.mkdir()
    video = footage / "shot_orbit_right.mp4"
    video.write_bytes(tiny_clip.video.read_bytes())
    (tmp_path / "link").symlink_to(footage)
    code, _, err = run_cli(_shot_args(tiny_clip, tmp_path / "link", video=video, command="run"), capsys)
    assert code == 2 and "would destroy it" in err
    assert video.read_bytes() == tiny_clip.video.read_bytes()


def test_empty_out_is_an_error_not_the_current_folder(tmp_path, tiny_clip, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(_shot_args(tiny_clip, ""), capsys)
    assert code == 2 and err.strip() == "error: --out is empty (an unset shell variable?); give a path"
    assert list(tmp_path.iterdir()) == []


def test_a_new_run_of_a_name_replaces_its_whole_set(tmp_path, tiny_clip, capsys):
    """run --angle 30, then recon --angle 60 --frames 3 of the same name: the earlier shot (8 frames at 30
    degrees) must not stay beside guides of 3 frames at 60; --name keeps both."""
    out = tmp_path / "out"
    code, _, err = run_cli(_shot_args(tiny_clip, out, "--angle", "30", "--save-mesh", command="run"), capsys)
    assert code == 0, err
    assert (out / "shot_orbit_right.mp4").is_file() and (out / "dwmesh_orbit_right.npz").is_file()
    (out / "notes.txt").write_text("the artist's")  # not part of the set: untouched
    code, stdout, err = run_cli(_shot_args(tiny_clip, out, "--angle", "60", "--frames", "3"), capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([p.format(n="orbit_right") for p in GUIDE_FILES] + ["notes.txt"])
    assert probe_video(out / "color_orbit_right.mp4").num_frames == 3
    assert read_transforms(out / "cameras_orbit_right.json").meta.get("angle_deg", 60) == 60
    line = stdout.strip().splitlines()[-1]
    assert line == (f"replaced the earlier 'orbit_right' shot in {out}; removed shot_orbit_right.mp4, dwmesh_orbit_right.npz, "
                    "dwmesh_orbit_right_frame0.ply (not made by this run); pass --name to keep both"), line
    code, stdout, err = run_cli(_shot_args(tiny_clip, out, "--angle", "45", "--name", "orbit_right_45"), capsys)
    assert code == 0 and "replaced" not in stdout
    assert (out / "color_orbit_right.mp4").is_file() and (out / "color_orbit_right_45.mp4").is_file()


def test_stale_members_stay_when_writing_fails(tmp_path):
    """The set is replaced all or nothing: a failed write removes no stale member of the earlier set."""
    from ex4d.errors import Ex4dError
    from ex4d.recon import write_guides
    from ex4d.render import Guides

    T, H, W = 2, 8, 10
    guides = Guides(np.zeros((T, H, W, 3), np.uint8), np.ones((T, H, W), bool), np.zeros((T, H, W), np.float32))
    path = CameraPath(np.repeat(np.eye(4)[None], T, 0), Intrinsics.from_focal(10, W, H).K, W, H, name="x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "shot_x.mp4").write_bytes(b"earlier shot")
    (out / "render_x.npz").mkdir()  # the new render_x.npz cannot be moved there
    (out / "render_x.npz" / "keep").write_text("")
    with pytest.raises(Ex4dError, match="cannot write the results"):
        write_guides(out, "x", guides, path, 10.0)
    assert sorted(p.name for p in out.iterdir()) == ["render_x.npz", "shot_x.mp4"]
    (out / "render_x.npz" / "keep").unlink()
    (out / "render_x.npz").rmdir()
    write_guides(out, "x", guides, path, 10.0)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.format(n="x") for p in GUIDE_FILES)


@pytest.mark.parametrize("args, expected", [
    (["--out", "{file}"], "exists and is not a folder"),
    (["--out", "{file}/sub"], "is a file, so the folder cannot be created"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--frames", "0"], "--frames must be at least 1"),
    (["--vram-limit", "nan"], "--vram-limit must be a finite number"),
])
def test_cheap_checks_come_before_reading_the_video(tmp_path, capsys, args, expected):
    """The video here is not readable: the error must be about the option, found before decoding."""
    bad_video = tmp_path / "text.mp4"
    bad_video.write_text("not a video")
    (tmp_path / "file").write_text("a file")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    out = [] if "--out" in args else ["--out", tmp_path / "out"]
    code, _, err = run_cli(["run", bad_video, "--depth", tmp_path / "d.npz", *out, *args, "--quiet"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and expected in err, err
    assert (tmp_path / "file").read_text() == "a file"


def test_generator_name_is_checked_by_the_parser(tmp_path, tiny_clip, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(tiny_clip.video), "--depth", str(tiny_clip.depth_file), "--generator", "Draft", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "invalid choice: 'Draft'" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_device_cuda_without_a_gpu(tmp_path, tiny_clip, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    code, _, err = run_cli(_shot_args(tiny_clip, tmp_path / "out", "--device", "cuda"), capsys)
    assert code == 2 and err.strip() == "error: --device cuda: no CUDA GPU is available here; use --device cpu"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, warning", [
    (["--cam", "dolly_left", "--angle", "20"], "--angle is ignored by --cam dolly_left"),
    (["--cam", "orbit_right", "--distance", "1"], "--distance is ignored by --cam orbit_right"),
    (["--cam", "60", "--distance", "1"], "--distance is ignored by --cam 60"),
    (["--cam", "60", "--pivot", "median"], "--pivot median is ignored by --cam 60"),
])
def test_camera_options_a_move_ignores_are_named(tmp_path, tiny_clip, capsys, args, warning):
    with pytest.warns(UserWarning, match=warning):
        code, _, err = run_cli(_shot_args(tiny_clip, tmp_path / "out", "--frames", "2", *args), capsys)
    assert code == 0, err


def test_arc_with_its_own_pivot_does_not_warn(tmp_path, tiny_clip, capsys):
    """--pivot ex4d is exactly the pivot EX-4D's arcs use: nothing is ignored, nothing to say."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, _, err = run_cli(_shot_args(tiny_clip, tmp_path / "out", "--frames", "2", "--cam", "90", "--pivot", "ex4d"), capsys)
    assert code == 0 and "pivot" not in err, err


def test_arc_with_its_own_angle_is_fine(tmp_path, tiny_clip, capsys):
    code, _, err = run_cli(_shot_args(tiny_clip, tmp_path / "out", "--frames", "2", "--cam", "30", "--angle", "30"), capsys)
    assert code == 0, err


def test_client_run_checks_the_same_options_before_sending(tmp_path, tiny_clip, capsys):
    """`ex4d client run` shares the camera options: the same errors, before any backend is contacted."""
    for extra, expected in ((["--out", ""], "--out is empty"), (["--out", tmp_path / "o", "--angle", "nan"], "--angle must be a finite"),
                            (["--out", tmp_path / "o", "--cam", "30", "--angle", "60"], "takes no --angle")):
        code, _, err = run_cli(["client", "run", tiny_clip.video, "--depth", tiny_clip.depth_file, "--address",
                                "tcp://127.0.0.1:9", *extra], capsys)
        assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and expected in err, err


def test_camera_file_carries_the_shots_name(tmp_path, tiny_clip, capsys):
    """--name or30 writes cameras_or30.json saying 'or30': reused as --trajectory it makes *_or30 again,
    not *_orbit_right (which would replace that set)."""
    out = tmp_path / "out"
    code, _, err = run_cli(_shot_args(tiny_clip, out, "--frames", "2", "--name", "or30"), capsys)
    assert code == 0, err
    assert read_transforms(out / "cameras_or30.json").name == "or30"
    code, stdout, err = run_cli(_shot_args(tiny_clip, tmp_path / "again", "--frames", "2", "--trajectory",
                                           out / "cameras_or30.json"), capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.format(n="or30") for p in GUIDE_FILES)


def test_unicode_shot_names_round_trip_through_file_names(tmp_path, tiny_clip, capsys):
    """左から.json and 右から.json name two moves (not both '___'), --name 左から is a name, and the
    camera file written for it reads back under the same name."""
    import unicodedata

    from ex4d.camera import plain_name
    from ex4d.recon import check_name

    assert plain_name("左から") == "左から" != plain_name("右から")
    assert plain_name(unicodedata.normalize("NFD", "café")) == "café" == check_name(unicodedata.normalize("NFD", "café"))
    for bad in ("a/b", "..", ".hidden", "tab\there", "x" * 65, ""):
        with pytest.raises(Exception, match="shot name"):
            check_name(bad)
    from ex4d.camera import path_to_transforms

    data = path_to_transforms(CameraPath(orbit_poses(2, 4.0, yaw_deg=10), tiny_clip.K, *tiny_clip.size))
    del data["ex4d"]["name"]  # as a file from another tool: its file name names the move
    for stem in ("左から", "右から"):
        (tmp_path / f"{stem}.json").write_text(json.dumps(data), encoding="utf-8")
        code, stdout, err = run_cli(_shot_args(tiny_clip, tmp_path / "out", "--frames", "2", "--trajectory",
                                               tmp_path / f"{stem}.json"), capsys)
        assert code == 0 and "replaced" not in stdout, err
    code, _, err = run_cli(_shot_args(tiny_clip, tmp_path / "named", "--frames", "2", "--name", "左から"), capsys)
    assert code == 0 and (tmp_path / "named" / "shot_左から.mp4").exists() is False, err
    assert (tmp_path / "named" / "color_左から.mp4").is_file()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(p.format(n=n) for p in GUIDE_FILES for n in ("左から", "右から"))
    again = read_transforms(tmp_path / "out" / "cameras_左から.json")
    assert again.name == "左から" == plain_name(Path("cameras_左から").stem.replace("cameras_", ""))


@pytest.mark.parametrize("cam, angle, hint", [
    ("30", "60", "use --cam 60 for that arc, or --cam orbit_right --angle 60"),
    ("180", "45", "use --cam orbit_right --angle 45 (EX-4D's arcs are 30, 60, 90, -30, -60, -90, 180)"),
    ("-60", "60", "use --cam -60 alone, or --cam orbit_left --angle 60"),  # never the opposite direction
    ("-30", "90", "use --cam -90 for that arc, or --cam orbit_left --angle 90"),
    ("30", "120", "EX-4D's arcs and the orbits go up to 90 degrees; use --cam 90 for that arc, or --cam orbit_right --angle 90"),
])
def test_arc_with_another_angle_suggests_a_valid_move_the_same_way(tmp_path, capsys, cam, angle, hint):
    code, _, err = run_cli(["recon", tmp_path / "unread.mp4", "--out", tmp_path / "out", "--cam", cam, "--angle", angle], capsys)
    assert code == 2 and err.strip() == (f"error: --cam {cam} is EX-4D's fixed arc and takes no --angle (got --angle "
                                         f"{angle}); {hint}"), err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("args", [
    ["recon", "{video}", "--depth", "{depth}", "--out", "/proc/ex4d-out"],
    ["eval", "--scenes", "10", "--json", "/proc/ex4d-eval.json"],
    ["generate", "--guides", "{depth}", "--generator", "draft", "--out", "/proc/ex4d-shot.mp4"],
])
def test_output_on_a_pseudo_file_system_fails_up_front(tiny_clip, capsys, args):
    """os.access says yes for root on /proc; a real probe (create + remove a file) finds it before any work."""
    args = [a.replace("{video}", str(tiny_clip.video)).replace("{depth}", str(tiny_clip.depth_file)) for a in args]
    code, stdout, err = run_cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot " in err and "/proc" in err, err
    assert not stdout
