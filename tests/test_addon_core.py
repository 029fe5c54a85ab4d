"""The add-on's pure-Python core (addon/core) and `ex4d addon build`, in the project's environment (no bpy)."""

from __future__ import annotations

import ast
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from addon.core import cameras, shot, validity  # noqa: E402
from ex4d import __version__, camera  # noqa: E402


def test_validity_pack_round_trip_over_word_boundaries():
    rng = np.random.default_rng(0)
    fv = rng.random((70, 33)) > 0.4
    words = validity.pack(fv)
    assert words.dtype == np.int32 and words.shape == (3, 33)
    assert (validity.unpack(words, 70) == fv).all()
    assert (validity.unpack_frame(words, 31) == fv[31]).all()  # the sign bit


def test_face_mask_needs_every_vertex_painted_valid():
    corner_vertex = np.array([0, 1, 2, 2, 1, 3, 3, 4, 5])
    corner_start = np.array([0, 3, 6])
    painted = np.array([1, 1, 1, 0.2, 1, 1])
    m = validity.face_mask(np.array([True, True, False]), painted, corner_vertex, corner_start)
    assert m.tolist() == [True, False, False]


def test_fill_crop_maps_working_uvs_into_the_source():
    c = shot.FillCrop(640, 480, 512, 512)  # scale 512/480, 480x480 centre window
    uv = c.uv_to_source(np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]]))
    assert np.allclose(uv, [[80 / 640, 0.0], [560 / 640, 1.0], [0.5, 0.5]])
    assert np.allclose(shot.FillCrop(64, 48, 64, 48).uv_to_source([[0.25, 0.75]]), [[0.25, 0.75]])


def test_fill_crop_of_depth_and_intrinsics_match_the_frames():
    c = shot.FillCrop(8, 4, 4, 4)  # scale 1, keep the middle 4 columns
    d = np.arange(32, dtype=np.float32).reshape(1, 4, 8)
    assert (c.sample_nearest(d)[0] == d[0, :, 2:6]).all()
    up = shot.FillCrop(4, 3, 8, 6).sample_nearest(np.arange(12).reshape(1, 3, 4))
    assert up.shape == (1, 6, 8) and (up[0, ::2, ::2] == np.arange(12).reshape(3, 4)).all()
    K = np.array([[100.0, 0, 320], [0, 100.0, 240], [0, 0, 1]])
    Kw = shot.FillCrop(640, 480, 512, 512).intrinsics(K)
    assert np.allclose(Kw, [[100 * 512 / 480, 0, 256], [0, 100 * 512 / 480, 256], [0, 0, 1]])


@pytest.mark.parametrize("cx,cy", [(32.0, 24.0), (30.5, 26.0)])
def test_lens_round_trip(cx, cy):
    K = np.array([[55.4, 0, cx], [0, 55.4, cy], [0, 0, 1]])
    lens = cameras.lens_from_K(K, 64, 48)
    back = cameras.K_from_lens(lens.lens, lens.sensor_width, lens.shift_x, lens.shift_y, 64, 48)
    assert np.allclose(back, K)
    assert lens.lens == pytest.approx(55.4 * 36 / 64)


def test_rig_conversion_round_trip_and_source_camera_looks_along_blender_y():
    path = camera.preset_path("60", 5, camera.Intrinsics.from_focal(50, 64, 48), pivot=2.0)
    worlds = cameras.world_from_c2w(path.c2w)
    assert np.allclose(cameras.c2w_from_world(worlds), path.c2w)
    view_dir = worlds[0][:3, :3] @ np.array([0, 0, -1.0])  # frame 0 = source camera
    assert np.allclose(view_dir, [0, 1, 0])
    scaled = worlds.copy()
    scaled[:, :3, :3] *= 2.0  # a scaled camera object looks the same way
    assert np.allclose(cameras.c2w_from_world(scaled), path.c2w)


def test_manifest_is_a_valid_extension_manifest_with_the_package_version():
    m = tomllib.loads((ROOT / "blender_manifest.toml").read_text())
    assert m["schema_version"] == "1.0.0" and m["id"] == "ex4d" and m["type"] == "add-on"
    assert m["version"] == __version__
    assert m["blender_version_min"] == "4.2.0"
    assert set(m["permissions"]) == {"network", "files"}
    assert all(w.endswith(".whl") and "pyzmq" in w for w in m["wheels"])
    tags = " ".join(m["wheels"])
    for plat in ("manylinux", "win_amd64", "macosx"):
        assert f"cp311-cp311-{plat}" in tags or plat in tags


def test_addon_never_imports_torch_or_the_heavy_library():
    for p in (ROOT / "addon").rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("torch", "diffsynth", "cv2", "av"), (p, n)
                if n.startswith("ex4d"):
                    assert n in ("ex4d", "ex4d.protocol"), (p, n)  # only the source-checkout fallback


def test_build_zip_layout(tmp_path):
    from ex4d.commands.addon import BUNDLED_CORE, build_addon, manifest_wheels
    from ex4d.errors import Ex4dError

    try:
        z = build_addon(tmp_path, wheel_cache=ROOT / ".whl", log=lambda *a: None)
    except Ex4dError as e:  # an offline machine without the wheel cache
        pytest.skip(str(e))
    assert z.name == f"ex4d-{__version__}.zip"
    names = set(zipfile.ZipFile(z).namelist())
    assert {"blender_manifest.toml", "__init__.py", "core/__init__.py", "blender/operators.py",
            "_core/__init__.py", "_core/errors.py", "_core/camera.py", "_core/fit.py", "_core/depth_rules.py",
            "_core/protocol/client.py"} <= names
    assert {f"wheels/{w}" for w in manifest_wheels()} <= names
    assert not any("__pycache__" in n for n in names)
    # one source of truth: the bundled core is byte-identical to ex4d/
    zf = zipfile.ZipFile(z)
    for module in ("camera.py", "depth_rules.py", "fit.py"):
        assert zf.read(f"_core/{module}") == (ROOT / "ex4d" / module).read_bytes()
    assert len(BUNDLED_CORE) == 5


def test_build_without_wheels_and_cli(tmp_path):
    from ex4d.cli import main

    assert main(["addon", "build", "--out", str(tmp_path), "--no-wheels"]) == 0
    zf = zipfile.ZipFile(tmp_path / f"ex4d-{__version__}.zip")
    manifest = tomllib.loads(zf.read("blender_manifest.toml").decode())
    assert "wheels" not in manifest and not any(n.startswith("wheels/") for n in zf.namelist())


def test_missing_wheel_offline_is_a_clear_error(tmp_path, monkeypatch):
    from ex4d.commands import addon
    from ex4d.errors import Ex4dError

    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    with pytest.raises(Ex4dError, match="could not download wheel"):
        addon.fetch_wheels(["pyzmq-0.0.1-cp311-cp311-win_amd64.whl"], tmp_path, log=lambda *a: None)


def test_wheels_come_from_the_checkout_folder_before_any_download(tmp_path, monkeypatch):
    """A build with an empty cache uses .whl/ of the checkout (offline), without touching the network."""
    from ex4d.commands import addon

    name = "pyzmq-0.0.1-cp311-cp311-win_amd64.whl"
    folder = tmp_path / "whl"
    folder.mkdir()
    (folder / name).write_bytes(b"wheel")
    monkeypatch.setattr(addon.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    assert addon.fetch_wheels([name], tmp_path / "cache", log=lambda *a: None, also_in=[folder]) == [folder / name]
    assert addon.checkout_wheels() == ROOT / ".whl"



def test_pixel_aspect_is_read_from_the_container(tmp_path):
    """Blender's movie reader ignores the sample aspect ratio; the add-on reads the mp4 'pasp' box so an
    anamorphic clip is stretched to its display aspect, as the library reads it."""
    from fractions import Fraction

    from addon.core.pixel_aspect import read_pixel_aspect
    from ex4d.video import probe_video
    from tests.conftest import make_tiny_scene, write_clip

    frames, _, _ = make_tiny_scene(3, 48, 48)
    squeezed = write_clip(tmp_path / "anamorphic.mp4", frames, sample_aspect=Fraction(4, 3))
    square = write_clip(tmp_path / "square.mp4", frames)
    faststart = write_clip(tmp_path / "faststart.mp4", frames, sample_aspect=Fraction(2, 1),
                           container_options={"movflags": "faststart"})  # moov before the data
    assert read_pixel_aspect(squeezed) == Fraction(4, 3) == probe_video(squeezed).sample_aspect
    assert read_pixel_aspect(square) == 1
    assert read_pixel_aspect(faststart) == 2
    (tmp_path / "notes.txt").write_text("not a movie")
    (tmp_path / "cut.mp4").write_bytes(squeezed.read_bytes()[:40])
    for other in ("notes.txt", "cut.mp4", "missing.mp4"):
        assert read_pixel_aspect(tmp_path / other) == 1


def test_depth_rules_are_shared_by_the_cli_and_the_add_on():
    """One source of truth: the CLI's check_depth and the add-on use ex4d/depth_rules.py (numpy only)."""
    import numpy as np

    from addon.core import depth_rules
    from ex4d.depth.files import check_depth
    from ex4d.errors import DepthError

    d = np.ones((9, 96, 128), np.float32)
    check_depth(d, 9, (96, 128))
    for bad, words in ((np.ones((9, 96, 96), np.float32), "depth is 96x96"),
                       (np.ones((9, 128, 96), np.float32), "turned by 90 degrees"),
                       (np.ones((12, 96, 128), np.float32), "depth has 12 frames but the video has 9")):
        with pytest.raises(DepthError, match=words):
            check_depth(bad, 9, (96, 128))
        with pytest.raises(DepthError, match=words):
            depth_rules.check_frame_count(len(bad), 9)
            depth_rules.check_aspect(bad.shape[2], bad.shape[1], (96, 128))
    assert depth_rules.check_K(np.eye(3)).shape == (3, 3)
    assert depth_rules.check_K(np.stack([np.eye(3)] * 9), 9).shape == (9, 3, 3)
    for K, words in ((np.eye(2), "K must be 3x3"), (np.zeros((3, 3)), "focal"), (np.full((3, 3), np.nan), "NaN"),
                     (np.stack([np.eye(3)] * 4), "4 matrices"), ("abc", "K must be")):
        with pytest.raises(DepthError, match=words):
            depth_rules.check_K(K, 9)


def test_strip_names_keep_their_suffix_within_blenders_limit():
    long = "my_shot_ünï_東京__take_2_" * 3 + " EX4D orbit_right"
    names = [shot.fitted_name(long), shot.fitted_name(long, " guide"), shot.fitted_name(long, " source")]
    assert all(len(n.encode("utf-8")) <= shot.STRIP_NAME_BYTES for n in names)
    assert names[1].endswith(" guide") and names[2].endswith(" source") and len(set(names)) == 3
    assert shot.fitted_name("short", " guide") == "short guide"
