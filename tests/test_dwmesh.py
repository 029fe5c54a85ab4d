"""DW-mesh invariants, re-rendering against analytic warps, and file round trips."""

import numpy as np
import pytest
import torch

from ex4d.camera import CameraPath
from ex4d.dwmesh import (DWMeshConfig, build_dwmesh, load_npz, read_obj, read_ply, save_npz, save_obj, save_ply,
                         save_usd, usd_available)
from ex4d.errors import DepthError, InputError
from ex4d.render import get_rasterizer, mvp_matrices, render_guides


def _K(W, H, f=40.0):
    return np.array([[f, 0, W / 2], [0, f * 1.02, H / 2], [0, 0, 1.0]])


def test_ex4d_face_count_and_far_border():
    T, H, W = 2, 9, 13
    depth = torch.full((T, H, W), 3.0)
    mesh = build_dwmesh(depth, _K(W, H), DWMeshConfig(method="ex4d"))
    assert mesh.faces.shape == (2 * (H - 1) * (W - 1) + 2, 3)
    assert mesh.faces.dtype == torch.int32
    assert mesh.vertices.shape == (T, H * W, 3) and mesh.vertices.dtype == torch.float32
    z = -mesh.vertices[..., 2].reshape(T, H, W)
    assert torch.allclose(z[:, 0], torch.tensor(100.0)) and torch.allclose(z[:, :, -1], torch.tensor(100.0))
    assert torch.allclose(z[:, 1:-1, 1:-1], torch.tensor(3.0))
    # Ring faces are thin (invalid), their vertices lose alpha; the plane's interior stays valid.
    assert not mesh.face_valid[:, 1 : 2 * (W - 1)].any()  # face 0 lies wholly on the far ring
    assert mesh.vertex_alpha.reshape(T, H, W)[:, 4, 6].eq(1).all()
    assert mesh.vertex_alpha.reshape(T, H, W)[:, 1, 6].eq(0).all()


def test_unprojection_and_uv_conventions():
    H, W = 6, 8
    K = _K(W, H)
    mesh = build_dwmesh(torch.full((1, H, W), 2.0), K, DWMeshConfig(method="ours"))
    v = mesh.vertices[0, 2 * W + 5].double().numpy()  # row 2, col 5 -> pixel centre (5.5, 2.5)
    np.testing.assert_allclose(v, [(5.5 - W / 2) / K[0, 0] * 2, -(2.5 - H / 2) / K[1, 1] * 2, -2.0], rtol=1e-6)
    np.testing.assert_allclose(mesh.uv[2 * W + 5].numpy(), [5.5 / W, 1 - 2.5 / H], rtol=1e-6)


@pytest.mark.parametrize("method", ["ours", "ex4d"])
def test_plane_from_shifted_camera_matches_homography(method):
    H, W, d = 30, 40, 4.0
    K = _K(W, H)
    mesh = build_dwmesh(torch.full((1, H, W), d), K, DWMeshConfig(method=method))
    # Target camera: translated and slightly rotated (c2w), same intrinsics.
    a = np.radians(3.0)
    c2w = np.eye(4)
    c2w[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    c2w[:3, 3] = [0.15, -0.1, 0.05]
    path = CameraPath(c2w[None], K, W, H)
    rz = get_rasterizer("torch")
    mvp = torch.tensor(mvp_matrices(path), dtype=torch.float32)
    pos = torch.cat([mesh.vertices, torch.ones(1, H * W if method == "ex4d" else mesh.vertices.shape[1], 1)], -1) @ mvp.transpose(1, 2)
    rast = rz.rasterize(pos, mesh.faces, (H, W))
    uv = rz.interpolate(mesh.uv, rast, mesh.faces)[0].numpy()
    valid = mesh.face_valid[0][(rast[0, ..., 3].long() - 1).clamp_min(0)].numpy() & (rast[0, ..., 3] > 0).numpy()
    # Analytic: target pixel ray (OpenCV axes) hits the plane z_cv = d of the source camera.
    M = np.linalg.inv(np.diag([1, -1, -1, 1]) @ np.eye(4)) @ c2w @ np.diag([1, -1, -1, 1])  # target cv -> source cv
    R, t = M[:3, :3], M[:3, 3]
    errs = []
    for r in range(H):
        for c in range(W):
            if not valid[r, c]:
                continue
            ray = R @ np.linalg.solve(K, [c + 0.5, r + 0.5, 1.0])
            s = (d - t[2]) / ray[2]
            p = t + s * ray
            x, y = K[0, 0] * p[0] / p[2] + K[0, 2], K[1, 1] * p[1] / p[2] + K[1, 2]
            if 1.0 < x < W - 1 and 1.0 < y < H - 1:
                errs.append(max(abs(uv[r, c, 0] * W - x), abs((1 - uv[r, c, 1]) * H - y)))
    assert len(errs) > 0.5 * H * W
    assert max(errs) < 2e-3


@pytest.mark.parametrize("method", ["ours", "ex4d"])
def test_depth_step_invalidates_exactly_the_step(method):
    H, W = 10, 14
    depth = torch.full((1, H, W), 2.0)
    depth[:, :, 7:] = 6.0
    mesh = build_dwmesh(depth, _K(W, H, f=60.0), DWMeshConfig(method=method))
    invalid = ~mesh.face_valid[0, : 2 * (H - 1) * (W - 1)].reshape(H - 1, W - 1, 2).any(-1)
    inner = invalid[1:-1, 1:-1] if method == "ex4d" else invalid  # the release's ring faces are invalid too
    cols = np.nonzero(inner.any(0).numpy())[0] + (1 if method == "ex4d" else 0)
    assert cols.tolist() == [6]  # the quads between pixel columns 6 and 7
    assert inner[:, 6 - (1 if method == "ex4d" else 0)].all()


def test_ours_keeps_oblique_planes_valid():
    # A floor seen at a grazing angle: inverse depth is affine in the rows, steep in depth but continuous.
    H, W = 40, 30
    K = _K(W, H, f=30.0)
    rows = np.arange(H) + 0.5
    ray_y = (rows - H / 2) / K[1, 1]  # downward component per unit depth (OpenCV y)
    with np.errstate(divide="ignore"):
        depth = np.where(ray_y > 0.02, 1.0 / np.maximum(ray_y, 1e-9), 50.0)  # floor 1 unit below the camera
    depth = np.repeat(depth[:, None], W, 1)[None].astype(np.float32)
    mesh = build_dwmesh(torch.from_numpy(depth), K, DWMeshConfig(method="ours"))
    floor_rows = np.nonzero(ray_y > 0.05)[0]
    fv = mesh.face_valid[0, : 2 * (H - 1) * (W - 1)].reshape(H - 1, W - 1, 2)
    assert fv[floor_rows[0] + 1 : -1].all()


def test_non_square_and_bad_input():
    mesh = build_dwmesh(np.full((3, 7, 11), 1.5, np.float32), _K(11, 7), DWMeshConfig(method="ours"))
    assert mesh.vertices.shape[:2] == (3, 7 * 11 + 2 * (2 * (7 + 11) + 4))  # pixels, lip ring, far ring
    with pytest.raises(DepthError):
        build_dwmesh(np.zeros((1, 5, 5), np.float32), _K(5, 5))
    with pytest.raises(InputError):
        DWMeshConfig(method="nope")
    with pytest.raises(InputError):
        build_dwmesh(np.ones((2, 5, 5), np.float32), np.ones((3, 3, 3)))


def test_file_round_trips(tmp_path):
    T, H, W = 2, 6, 9
    depth = torch.rand(T, H, W) + 1.0
    mesh = build_dwmesh(depth, _K(W, H), DWMeshConfig(method="ours"))
    back = load_npz(save_npz(mesh, tmp_path / "shot.npz"))
    for name in ("vertices", "faces", "uv", "face_valid", "vertex_alpha"):
        assert torch.equal(getattr(back, name), getattr(mesh, name).cpu())
    assert back.size == (H, W) and back.method == "ours" and np.allclose(back.K, mesh.K)
    assert not list(tmp_path.glob(".*tmp"))

    frame = (np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)
    ply = read_ply(save_ply(mesh, tmp_path / "f.ply", frame_rgb=frame, t=1))
    np.testing.assert_array_equal(ply["positions"], mesh.vertices[1].numpy())
    np.testing.assert_array_equal(ply["faces"], mesh.faces.numpy())
    np.testing.assert_array_equal(ply["valid"], mesh.face_valid[1].numpy())
    np.testing.assert_array_equal(ply["colors"][: H * W, :3], frame.reshape(-1, 3))

    obj = read_obj(save_obj(mesh, tmp_path / "f.obj", t=0))
    np.testing.assert_allclose(obj["positions"], mesh.vertices[0].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(obj["uv"], mesh.uv.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(obj["faces"], mesh.faces.numpy())


def test_scene_scale_travels_with_the_mesh_file(tmp_path):
    """A millimetre-scale mesh keeps its scale through its npz; an older file without it gets it from
    its grid vertices."""
    T, H, W = 2, 12, 16
    depth = (torch.rand(T, H, W) + 2.0) * 1000.0
    mesh = build_dwmesh(depth, _K(W, H), DWMeshConfig(method="ours"))
    assert mesh.scene_scale > 100
    assert load_npz(save_npz(mesh, tmp_path / "mm.npz")).scene_scale == pytest.approx(mesh.scene_scale)
    with np.load(tmp_path / "mm.npz") as z:
        np.savez(tmp_path / "old.npz", **{k: z[k] for k in z.files if k != "scene_scale"})
    assert load_npz(tmp_path / "old.npz").scene_scale == pytest.approx(mesh.scene_scale, rel=0.05)
    # The skirt sits behind the scene (it was clamped to 500 units: in front of a millimetre scene).
    skirt_depth = -mesh.vertices[:, -1, 2]
    assert (skirt_depth > depth.amax(dim=(1, 2))).all()


@pytest.mark.skipif(not usd_available(), reason="usd-core not installed (optional extra 'usd')")
def test_usd_export(tmp_path):
    from pxr import Usd, UsdGeom

    mesh = build_dwmesh(torch.rand(3, 5, 6) + 1.0, _K(6, 5))
    path = save_usd(mesh, tmp_path / "shot.usdc")
    stage = Usd.Stage.Open(str(path))
    pts = UsdGeom.Mesh(stage.GetPrimAtPath("/DWMesh")).GetPointsAttr()
    np.testing.assert_allclose(np.array(pts.Get(2)), mesh.vertices[2].numpy(), rtol=1e-6)


def test_render_guides_source_camera_and_shapes():
    T, H, W = 3, 12, 16
    K = _K(W, H)
    depth = torch.full((T, H, W), 3.0)
    frames = (np.random.default_rng(1).random((T, H, W, 3)) * 255).astype(np.uint8)
    c2w = np.stack([np.eye(4)] * T)
    c2w[1:, 0, 3] = 0.05
    for method in ("ours", "ex4d", "torn"):
        mesh = build_dwmesh(depth, K, DWMeshConfig(method=method))
        g = render_guides(mesh, frames, CameraPath(c2w, K, W, H), rasterizer="torch")
        assert g.color.shape == (T, H, W, 3) and g.color.dtype == np.uint8
        assert g.mask.shape == (T, H, W) and g.mask.dtype == bool and g.depth.dtype == np.float32
        assert g.mask[0].all() and np.array_equal(g.color[0], frames[0])  # the source camera itself
        assert (g.color[1][~g.mask[1]] == 0).all()
        assert g.mask[1].mean() > 0.4


def test_ours_keeps_border_pixels_and_closes_outside_the_image():
    H, W = 8, 10
    depth = torch.full((1, H, W), 3.0)
    mesh = build_dwmesh(depth, _K(W, H), DWMeshConfig(method="ours"))
    z = -mesh.vertices[0, : H * W, 2].reshape(H, W)
    assert torch.allclose(z, torch.tensor(3.0))  # the real outer ring is kept
    n_ring = 2 * (H + W) + 4
    lip, far = mesh.vertices[0, H * W : H * W + n_ring], mesh.vertices[0, H * W + n_ring :]
    assert torch.allclose(-lip[:, 2], torch.tensor(3.0)) and (-far[:, 2] >= 100.0).all()
    n_grid = 2 * (H - 1) * (W - 1)
    valid = mesh.face_valid[0]
    assert valid[:n_grid].all()
    faces = mesh.faces.long()
    touches_far = (faces >= H * W + n_ring).any(1)
    assert not valid[touches_far].any()  # curtain and back plate never count as seen
    assert valid[n_grid:][~touches_far[n_grid:]].all()  # lip faces of a continuous plane are valid


def test_torn_deletes_invalid_faces_and_recipe_erodes():
    # A near square in front of a far wall, seen from a camera moved sideways.
    H, W = 24, 32
    K = _K(W, H, f=30.0)
    depth = torch.full((1, H, W), 8.0)
    depth[:, 8:16, 10:20] = 2.0
    frames = np.full((1, H, W, 3), 200, np.uint8)
    c2w = np.eye(4)[None].copy()
    c2w[0, 0, 3] = 0.6
    path = CameraPath(c2w, K, W, H)
    masks = {}
    for method in ("ours", "ex4d", "torn"):
        mesh = build_dwmesh(depth, K, DWMeshConfig(method=method))
        masks[method] = render_guides(mesh, frames, path, rasterizer="torch").mask[0]
    # Torn (the recipe with invalid faces deleted) shows wall pixels the recipe's kept faces cover.
    assert (masks["torn"] & ~masks["ex4d"]).any()
    # The recipe's zeroed vertex alpha erodes valid pixels around invalid faces; ours does not.
    assert masks["ours"].sum() > masks["ex4d"].sum()


def test_touches_valid_face_matches_scatter():
    """The slice formulation of "pixel touches a valid grid face" equals a plain scatter over the faces."""
    from ex4d.dwmesh import _touches_valid_face, grid_faces

    T, H, W = 2, 5, 7
    faces = grid_faces(H, W)
    valid = torch.rand(T, faces.shape[0], generator=torch.Generator().manual_seed(0)) > 0.7
    ref = torch.zeros(T, H * W)
    ref.scatter_add_(1, faces.reshape(1, -1).expand(T, -1), valid.float().repeat_interleave(3, 1))
    got = _touches_valid_face(valid, T, H, W).reshape(T, -1)
    assert torch.equal(got, ref > 0)
