"""ex4d.camera: conventions, transforms.json round trips, the Blender rig, the EX-4D release's presets
(checked against the poses it saved for the flower clip) and our presets' geometry; bad camera files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ex4d import camera as C
from ex4d.errors import CameraFileError, InputError


def random_poses(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        if np.linalg.det(q) < 0:
            q[:, 0] *= -1
        M = np.eye(4)
        M[:3, :3], M[:3, 3] = q, rng.normal(size=3)
        out.append(M)
    return np.stack(out)


# --------------------------------------------------------------------------------------- conventions


def test_gl_cv_round_trips():
    P = random_poses(5)
    np.testing.assert_allclose(C.cv_to_gl(C.gl_to_cv(P)), P, atol=1e-12)
    np.testing.assert_allclose(C.gl_to_cv(np.eye(4)), np.diag([1.0, -1, -1, 1]))
    # an OpenCV camera looks along its +z: in GL axes that is -z of the same camera
    cv = C.gl_to_cv(P)
    np.testing.assert_allclose(cv[:, :3, 2], -P[:, :3, 2], atol=1e-12)
    np.testing.assert_allclose(cv[:, :3, 3], P[:, :3, 3])  # same camera centre


def test_ex4d_extrinsics_round_trip():
    P = random_poses(4, seed=1)
    np.testing.assert_allclose(C.ex4d_extrinsics_to_c2w(C.c2w_to_ex4d_extrinsics(P)), P, atol=1e-12)
    # the release's frame 0 is diag(1,-1,-1,1): our source camera, identity
    np.testing.assert_allclose(C.ex4d_extrinsics_to_c2w(np.diag([1.0, -1, -1, 1])), np.eye(4), atol=1e-12)


def test_unprojection_convention_matches_depth():
    """Pixel centre (x, y) with z-depth d -> ((x-cx)/fx d, -(y-cy)/fy d, -d): in front of the camera (-z)."""
    K = C.Intrinsics(50.0, 50.0, 32.0, 24.0, 64, 48)
    x, y, d = 10.5, 40.5, 3.0
    p = np.array([(x - K.cx) / K.fx * d, -(y - K.cy) / K.fy * d, -d])
    # back through the OpenCV camera of the same pose (identity in GL) -> the pixel again
    pc = C.gl_to_cv(np.eye(4))[:3, :3].T @ p
    assert pc[2] == pytest.approx(d)
    assert K.fx * pc[0] / pc[2] + K.cx == pytest.approx(x)
    assert K.fy * pc[1] / pc[2] + K.cy == pytest.approx(y)


def test_blender_rig_matrix():
    rig = C.EX4D_TO_BLENDER
    assert np.linalg.det(rig[:3, :3]) == pytest.approx(1.0)
    np.testing.assert_allclose(rig[:3, :3] @ rig[:3, :3].T, np.eye(3), atol=1e-12)
    # the source camera (identity in ex4d) becomes an upright Blender camera looking along +y
    cam_world = rig @ np.eye(4)
    np.testing.assert_allclose(cam_world[:3, :3] @ [0, 0, -1], [0, 1, 0], atol=1e-12)  # view direction
    np.testing.assert_allclose(cam_world[:3, :3] @ [0, 1, 0], [0, 0, 1], atol=1e-12)  # camera up = Blender up
    # = a Blender camera rotated 90 degrees about x (as artists add one)
    a = math.radians(90)
    Rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    np.testing.assert_allclose(rig[:3, :3], Rx, atol=1e-12)
    # round trip: c2w_ex4d = inv(rig) @ matrix_world
    P = random_poses(3, seed=2)
    np.testing.assert_allclose(np.linalg.inv(rig) @ (rig @ P), P, atol=1e-12)


# --------------------------------------------------------------------------------------- transforms.json


def test_transforms_write_read_exact(tmp_path):
    P = random_poses(6, seed=3)
    P[0] = np.eye(4)
    K = np.repeat(C.Intrinsics(61.25, 60.5, 31.75, 24.125, 64, 48).K[None], 6, axis=0)
    K[3, 0, 0] = 70.0  # one frame with its own focal length (a zoom)
    path = C.CameraPath(P, K, 64, 48, name="mine", meta={"preset": "custom"})
    C.write_transforms(path, tmp_path / "cameras_mine.json")
    assert [p.name for p in tmp_path.iterdir()] == ["cameras_mine.json"]
    back = C.read_transforms(tmp_path / "cameras_mine.json")
    assert np.array_equal(back.c2w, path.c2w) and np.array_equal(back.K, path.K)
    assert (back.width, back.height, back.name) == (64, 48, "mine")
    data = json.loads((tmp_path / "cameras_mine.json").read_text())
    assert {"fl_x", "fl_y", "cx", "cy", "w", "h", "frames"} <= set(data)
    assert "fl_x" in data["frames"][3] and "fl_x" not in data["frames"][1]


def test_transforms_opencv_flag_is_converted():
    P = random_poses(3, seed=4)
    P[0] = np.eye(4)
    data = {"fl_x": 50, "w": 64, "h": 48, "ex4d": {"convention": "opencv"},
            "frames": [{"transform_matrix": C.gl_to_cv(M).tolist()} for M in P]}
    back = C.transforms_to_path(data)
    np.testing.assert_allclose(back.c2w, P, atol=1e-12)


def test_absolute_world_poses_are_rebased_onto_the_source_camera():
    """A NeRF / Blender export holds absolute world poses; the move must start at the source view."""
    P = random_poses(5, seed=7)
    P[0] = np.eye(4)
    world = random_poses(1, seed=8)[0]
    world[:3, 3] *= 10.0  # somewhere in a big scene
    frames = [{"transform_matrix": (world @ M).tolist()} for M in P]
    with pytest.warns(UserWarning, match="absolute world poses"):
        back = C.transforms_to_path({"fl_x": 50, "w": 64, "h": 48, "frames": frames})
    np.testing.assert_allclose(back.c2w, P, atol=1e-9)
    # Said in the file: absolute is re-based without a warning; camera-relative is used as it is.
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        stated = C.transforms_to_path({"fl_x": 50, "w": 64, "h": 48, "ex4d": {"world": "absolute"}, "frames": frames})
        kept = C.transforms_to_path({"fl_x": 50, "w": 64, "h": 48, "ex4d": {"world": "camera-relative"}, "frames": frames})
    np.testing.assert_allclose(stated.c2w, P, atol=1e-9)
    np.testing.assert_allclose(kept.c2w, world @ P, atol=1e-12)
    with pytest.raises(CameraFileError, match="unknown world"):
        C.transforms_to_path({"fl_x": 50, "w": 64, "h": 48, "ex4d": {"world": "global"}, "frames": frames})


def test_our_files_keep_a_move_that_starts_off_the_source_camera(tmp_path):
    P = random_poses(4, seed=9)  # frame 0 is not the identity: an artist's move may start anywhere
    path = C.CameraPath(P, C.Intrinsics.from_focal(50, 64, 48).K, 64, 48, name="offset")
    C.write_transforms(path, tmp_path / "cameras_offset.json")
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        back = C.read_transforms(tmp_path / "cameras_offset.json")
    assert np.array_equal(back.c2w, path.c2w)


def test_camera_file_with_bom_and_a_spaced_name(tmp_path):
    P = random_poses(3, seed=10)
    P[0] = np.eye(4)
    data = {"fl_x": 50, "w": 64, "h": 48, "frames": [{"transform_matrix": M.tolist()} for M in P]}
    f = tmp_path / "my camera v2.json"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())  # a UTF-8 byte-order mark, as Windows tools write
    back = C.read_transforms(f)
    assert back.name == "my_camera_v2"
    np.testing.assert_allclose(back.c2w, P)
    assert C.plain_name("..//x y") == "__x_y" and C.plain_name("") == "trajectory"


def test_transforms_camera_angle_x():
    data = {"camera_angle_x": math.radians(90), "w": 64, "h": 48, "frames": [{"transform_matrix": np.eye(4).tolist()}]}
    assert C.transforms_to_path(data).K[0, 0, 0] == pytest.approx(32.0)


def _base(n=3):
    P = random_poses(n, seed=5)
    P[0] = np.eye(4)
    return {"fl_x": 50.0, "w": 64, "h": 48, "frames": [{"transform_matrix": M.tolist()} for M in P]}


def _mutate(kind):
    d = _base()
    if kind == "3x4":
        d["frames"][1]["transform_matrix"] = d["frames"][1]["transform_matrix"][:3]
    elif kind == "4x3":
        d["frames"][1]["transform_matrix"] = [row[:3] for row in d["frames"][1]["transform_matrix"]]
    elif kind == "ragged":
        d["frames"][1]["transform_matrix"][2] = [1, 2]
    elif kind == "text":
        d["frames"][1]["transform_matrix"] = "identity"
    elif kind == "no_frames":
        del d["frames"]
    elif kind == "empty_frames":
        d["frames"] = []
    elif kind == "no_size":
        del d["w"]
    elif kind == "no_matrix":
        del d["frames"][2]["transform_matrix"]
    elif kind == "no_focal":
        del d["fl_x"]
    elif kind == "zero_focal":
        d["fl_x"] = 0
    elif kind == "opencv_unflagged":
        d["frames"] = [{"transform_matrix": C.gl_to_cv(np.array(f["transform_matrix"])).tolist()} for f in d["frames"]]
    elif kind == "mirrored":
        M = np.array(d["frames"][1]["transform_matrix"])
        M[:3, 0] *= -1
        d["frames"][1]["transform_matrix"] = M.tolist()
    elif kind == "scaled":
        M = np.array(d["frames"][1]["transform_matrix"])
        M[:3, :3] *= 2
        d["frames"][1]["transform_matrix"] = M.tolist()
    elif kind == "projective":
        d["frames"][1]["transform_matrix"][3] = [0, 0, 1, 0]
    elif kind == "nan":
        d["frames"][1]["transform_matrix"][0][3] = float("nan")
    elif kind == "bad_convention":
        d["ex4d"] = {"convention": "directx"}
    elif kind == "not_object":
        d = [d]
    return d


BAD_FILES = {
    "3x4": "must be 4x4", "4x3": "must be 4x4", "ragged": "not a numeric 4x4", "text": "4x4",
    "no_frames": "'frames'", "empty_frames": "'frames'", "no_size": "'w' and 'h'", "no_matrix": "frame 2 has no 'transform_matrix'",
    "no_focal": "no focal length", "zero_focal": "focal", "opencv_unflagged": "probably in the OpenCV",
    "mirrored": "mirrored", "scaled": "not orthonormal", "projective": "last row", "nan": "NaN",
    "bad_convention": "unknown convention", "not_object": "JSON object",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_camera_files(tmp_path, kind):
    f = tmp_path / "transforms.json"
    f.write_text(json.dumps(_mutate(kind)))
    with pytest.raises(CameraFileError) as e:
        C.read_transforms(f)
    assert BAD_FILES[kind] in str(e.value) and "\n" not in str(e.value)


def test_unreadable_camera_files(tmp_path):
    with pytest.raises(CameraFileError, match="not found"):
        C.read_transforms(tmp_path / "none.json")
    (tmp_path / "t.json").write_text("{ not json")
    with pytest.raises(CameraFileError, match="not a readable JSON"):
        C.read_transforms(tmp_path / "t.json")


def test_path_shorter_than_video():
    path = C.CameraPath(np.repeat(np.eye(4)[None], 4, 0), np.eye(3) * [50, 50, 1], 64, 48, name="p")
    assert len(path.take(3)) == 3
    with pytest.raises(CameraFileError, match="has 4 frames but the video has 6"):
        path.take(6)


# --------------------------------------------------------------------------------------- EX-4D presets


def test_release_180_preset_matches_its_saved_poses(flower_dir):
    z = np.load(flower_dir / "camera_180.npz")
    E = z["extrinsics"].astype(np.float64)
    assert E.shape == (49, 4, 4)
    np.testing.assert_allclose(z["intrinsics"], [[500, 0, 256], [0, 500, 256], [0, 0, 1]])
    # solve the radius (min depth + 0.15 of that clip) from the camera centres: eye = r * f(a)
    centres = np.stack([-np.linalg.inv(e[:3, :3]) @ e[:3, 3] for e in E])
    a = np.linspace(0.0, 2 * math.pi, 49)
    f = np.stack([np.sin(a), (np.cos(a) - 1) * C.EX4D_RISE, np.zeros_like(a)], axis=1)
    r = float((centres * f).sum() / (f * f).sum())
    assert 0.15 < r < 100
    ours = C.ex4d_preset_extrinsics("180", 49, r)
    for i in range(49):  # every pose, float32 precision of the file
        np.testing.assert_allclose(ours[i], E[i], atol=2e-6, err_msg=f"frame {i}")
    c2w = C.ex4d_extrinsics_to_c2w(E)
    np.testing.assert_allclose(c2w[0], np.eye(4), atol=1e-6)
    # through our preset_path too: same poses in our convention
    path = C.preset_path("180", 49, C.Intrinsics.from_focal(500, 512, 512), pivot=r)
    np.testing.assert_allclose(path.c2w, c2w, atol=2e-6)
    # "180" is a sweep of about +-45 degrees, not 180: at mid-clip the view is 1/sqrt(2.04) off axis
    assert C.relative_angle_deg(path.c2w).max() == pytest.approx(math.degrees(math.acos(1 / math.sqrt(2.04))), abs=0.05)


@pytest.mark.parametrize("preset", ["30", "60", "90", "-30"])
def test_release_arcs(preset):
    r = 2.0
    path = C.preset_path(preset, 13, C.Intrinsics.from_focal(500, 512, 512), pivot=r)
    np.testing.assert_allclose(path.c2w[0], np.eye(4), atol=1e-12)
    theta = float(preset)
    # last frame: yaw to theta, eye on the arc around the pivot (0, 0, -r) in our world
    eye = path.c2w[-1, :3, 3]
    t = math.radians(theta)
    c = abs(math.cos(t))
    # the release's OpenCV world has y down: its rise (c - 1) * 0.2 * r < 0 is up, +y in ours
    np.testing.assert_allclose(eye, [r * math.sin(t), (1 - c) * C.EX4D_RISE * r, -(r - r * c)], atol=1e-9)


# --------------------------------------------------------------------------------------- our presets


def _project(path, i, point):
    w2c = np.linalg.inv(path.c2w[i])
    pc = C.gl_to_cv(np.eye(4))[:3, :3].T @ (w2c[:3, :3] @ point + w2c[:3, 3])
    K = path.K[i]
    return np.array([K[0, 0] * pc[0] / pc[2] + K[0, 2], K[1, 1] * pc[1] / pc[2] + K[1, 2]]), pc[2]


@pytest.mark.parametrize("preset,angle", [("orbit_right", 60), ("orbit_left", 45), ("orbit_up", 30), ("orbit_down", 20), ("orbit_right", 90)])
def test_orbits_keep_pivot_centred_reach_angle_no_roll(preset, angle):
    intr = C.Intrinsics.from_focal(60, 64, 48)
    depth0 = np.full((48, 64), 3.0)
    depth0[10:20, 10:20] = 1.0
    path = C.preset_path(preset, 9, intr, depth0=depth0, angle_deg=angle)
    pivot = path.meta["pivot"]
    assert pivot == pytest.approx(3.0)  # median pivot
    np.testing.assert_allclose(path.c2w[0], np.eye(4), atol=1e-12)
    for i in range(9):
        xy, z = _project(path, i, np.array([0.0, 0.0, -pivot]))
        np.testing.assert_allclose(xy, [32.0, 24.0], atol=1e-9)  # pivot stays at the image centre
        assert z == pytest.approx(pivot)  # at constant distance
        right = path.c2w[i, :3, 0]
        assert abs(right[1]) < 1e-12  # no roll: the camera's x axis stays horizontal
    ang = C.relative_angle_deg(path.c2w)
    assert ang[-1] == pytest.approx(angle, abs=1e-9)
    assert np.all(np.diff(ang) > 0)
    # direction: orbit_right moves the camera to +x, orbit_up to +y
    eye = path.c2w[-1, :3, 3]
    sign = {"orbit_right": (0, 1), "orbit_left": (0, -1), "orbit_up": (1, 1), "orbit_down": (1, -1)}[preset]
    assert np.sign(eye[sign[0]]) == sign[1]


@pytest.mark.parametrize("preset,axis,sign", [("zoom_in", 2, -1), ("zoom_out", 2, 1), ("dolly_left", 0, -1), ("dolly_right", 0, 1), ("crane_up", 1, 1), ("crane_down", 1, -1)])
def test_translations(preset, axis, sign):
    intr = C.Intrinsics.from_focal(60, 64, 48)
    path = C.preset_path(preset, 5, intr, pivot=2.0)
    np.testing.assert_allclose(path.c2w[:, :3, :3], np.repeat(np.eye(3)[None], 5, 0), atol=1e-12)
    move = path.c2w[-1, :3, 3]
    assert np.sign(move[axis]) == sign and np.count_nonzero(np.abs(move) > 1e-12) == 1
    assert abs(move[axis]) == pytest.approx((0.3 if preset.startswith("zoom") else 0.2) * 2.0)


def test_preset_errors():
    intr = C.Intrinsics.from_focal(60, 64, 48)
    with pytest.raises(InputError, match="unknown camera preset"):
        C.preset_path("spin", 5, intr, pivot=1.0)
    with pytest.raises(InputError, match="90"):
        C.preset_path("orbit_right", 5, intr, pivot=1.0, angle_deg=120)
    with pytest.raises(InputError, match="depth"):
        C.preset_path("orbit_right", 5, intr)
    with pytest.raises(InputError, match="no valid depth"):
        C.preset_path("orbit_right", 5, intr, depth0=np.zeros((4, 4)))


def test_resolve_intrinsics_order():
    K = np.array([[40.0, 0, 16], [0, 40.0, 12], [0, 0, 1]])
    assert C.resolve_intrinsics(64, 48, focal_px=70)[1] == "user focal"
    intr, src = C.resolve_intrinsics(64, 48, file_K=K, file_size=(32, 24))
    assert src == "depth file" and intr.fx == pytest.approx(80.0) and intr.cx == pytest.approx(32.0)
    with pytest.warns(UserWarning, match="EX-4D's default"):
        intr, src = C.resolve_intrinsics(512, 256)
    assert intr.fx == pytest.approx(500.0) and src.startswith("EX-4D default")
    with pytest.raises(InputError):
        C.resolve_intrinsics(64, 48, focal_px=50, fov_deg=60)


def test_atomic_write_text_leaves_nothing_behind_on_failure(tmp_path):
    (tmp_path / "taken").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        C.atomic_write_text(tmp_path / "taken", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    C.atomic_write_text(tmp_path / "ok.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json", "taken"]


def test_a_move_made_for_other_units_is_noticed(tmp_path):
    """A camera file written for a scene in metres, used on millimetre depth: a warning, not a silent
    pan in place; the same units pass quietly."""
    import warnings as _w

    intr = C.Intrinsics.from_focal(50, 64, 48)
    metres = np.full((48, 64), 3.0)
    path = C.preset_path("orbit_right", 5, intr, depth0=metres, angle_deg=30)
    C.write_transforms(path, tmp_path / "cameras_orbit_right.json")
    back = C.read_transforms(tmp_path / "cameras_orbit_right.json")
    assert back.meta["pivot"] == pytest.approx(3.0) and "world" not in back.meta
    with _w.catch_warnings():
        _w.simplefilter("error")
        C.check_units(back, metres * 1.5)
    with pytest.warns(UserWarning, match="same units"):
        C.check_units(back, metres * 1000)
