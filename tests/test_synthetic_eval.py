"""Synthetic ground truth, the quality measures, the eval command and the example clip."""

import numpy as np
import pytest

from ex4d.evaluate import camera_path, render_method, score, splat_guides
from ex4d.synthetic import make_example, make_scene


def test_scenes_are_deterministic_and_distinct():
    a, da = make_scene(3, 48, 36, 2).source()
    b, db = make_scene(3, 48, 36, 2).source()
    c, _ = make_scene(4, 48, 36, 2).source()
    assert np.array_equal(a, b) and np.array_equal(da, db)
    assert not np.array_equal(a, c)
    assert np.isfinite(da).all() and (da > 0).all()


def test_source_view_is_fully_visible_and_depth_is_z_depth():
    scene = make_scene(1, 40, 30, 2)
    frames, depth = scene.source()
    view = scene.render(np.eye(4), scene.K, 40, 30, 1)
    assert scene.visible_from_source(view.points, 1, view.hit).all()
    np.testing.assert_allclose(-view.points[..., 2], depth[1], rtol=1e-5)


def test_point_behind_an_occluder_is_not_visible():
    scene = make_scene(1, 40, 30, 1)
    sphere = next(p for p in scene.primitives if type(p).__name__ == "Sphere")
    behind = sphere.center * (1.0 + 2.0 * sphere.radius / np.linalg.norm(sphere.center))  # on the ray, behind it
    outside = np.array([100.0, 0.0, -1.0])  # far outside the source frame
    assert not scene.visible_from_source(np.stack([behind, outside]), 0).any()


def test_score_counts():
    gt_vis = np.array([[True, True, False, False]])
    mask = np.array([[True, False, True, False]])
    col = np.zeros((1, 4, 3), np.uint8)
    s = score(col, mask, col, gt_vis)
    assert s.precision == 0.5 and s.recall == 0.5 and s.psnr == float("inf")


@pytest.mark.parametrize("family", ["orbit", "ex4d"])
def test_ours_meets_targets_on_a_small_unseen_scene(family):
    # Non-square, a seed outside the tuning set (0-5), 90 degrees.
    scene = make_scene(21, 72, 48, 3)
    frames, depth = scene.source()
    path = camera_path(family, 90, scene, depth[0], 3)
    gt_col, gt_vis, _ = scene.target_views(path)
    res = {}
    for m in ("ours", "ex4d", "splat"):
        g = render_method(m, frames, depth, scene.K, path)
        res[m] = score(g.color[1:], g.mask[1:], gt_col[1:], gt_vis[1:])
    assert res["ours"].precision >= 0.99
    assert res["ours"].recall > res["ex4d"].recall
    assert 0 < res["splat"].recall < 1


def test_splat_baseline_identity_camera_is_exact():
    from ex4d.camera import CameraPath

    scene = make_scene(2, 32, 24, 1)
    frames, depth = scene.source()
    g = splat_guides(frames, depth, scene.K, CameraPath(np.eye(4)[None], scene.K, 32, 24))
    assert g.mask.all() and np.array_equal(g.color, frames)


def test_eval_command_runs(capsys):
    from ex4d.cli import main

    assert main(["eval", "--scenes", "1", "--angles", "30", "--paths", "orbit", "--size", "32x24", "--frames", "2"]) == 0
    out = capsys.readouterr().out
    assert "| orbit | 30 | ours |" in out and "| orbit | 30 | splat |" in out
    assert main(["eval", "--methods", "nope", "--size", "32x24"]) == 2


QUICK_EVAL = ["eval", "--angles", "30", "--paths", "orbit", "--methods", "ours", "--size", "32x24", "--frames", "2"]


@pytest.mark.parametrize("args, message", [
    (["--scenes", "-1"], "error: --scenes: seeds must be 0 or more, got -1"),
    (["--scenes", ""], "error: --scenes is empty; give scene seeds such as 0,1,2"),
    (["--scenes", "1", "--json", "{tmp}/missing/x.json"], "error: --json {tmp}/missing/x.json: the folder {tmp}/missing does not exist"),
    (["--scenes", "1", "--json", "{tmp}"], "error: --json {tmp} is a folder; give a file name"),
    (["--scenes", "1", "--json", ""], "error: --json is empty (an unset shell variable?); give a path"),
])
def test_eval_bad_arguments_fail_first_in_one_line(tmp_path, capsys, args, message):
    from ex4d.cli import main

    (tmp_path / "keep.txt").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main([*QUICK_EVAL, *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == message.replace("{tmp}", str(tmp_path)), captured.err  # before the run: no progress bar
    assert not captured.out
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]  # no stray temporary file


def test_eval_json_is_written_without_temporary_files(tmp_path, capsys):
    import json

    from ex4d.cli import main

    assert main([*QUICK_EVAL, "--scenes", "1", "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows and rows[0]["seed"] == 1 and rows[0]["method"] == "ours"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]


def test_make_example_is_small_and_readable(tmp_path):
    import av

    info = make_example(tmp_path, width=128, height=96, num_frames=6)
    total = info["video"].stat().st_size + info["depth"].stat().st_size
    assert total < 2_000_000
    with av.open(str(info["video"])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (96, 128, 3)
    z = np.load(info["depth"])
    assert z["depth"].shape == (6, 96, 128) and z["depth"].dtype == np.float32 and z["K"].shape == (3, 3)
