"""The torch rasterizer against analytic cases and a brute-force reference; backend selection."""

import warnings

import numpy as np
import pytest
import torch

from ex4d.render import get_rasterizer, interpolate, projection_matrix, rasterize
from ex4d.render.raster_torch import rasterize as torch_rasterize


def _ndc(col, row, W, H):
    return (2 * col + 1) / W - 1, (2 * row + 1) / H - 1


def test_single_triangle_coverage_and_barycentrics():
    H, W = 8, 10
    pos = torch.tensor([[[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.0, 0.5, 0.0, 1.0]]])
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast = torch_rasterize(pos, tri, (H, W))
    for r in range(H):
        for c in range(W):
            x, y = _ndc(c, r, W, H)
            # Solve barycentrics in 2D (w = 1 everywhere).
            A = np.array([[-0.5, 0.5, 0.0], [-0.5, -0.5, 0.5], [1.0, 1.0, 1.0]])
            b = np.linalg.solve(A, [x, y, 1.0])
            inside = (b >= -1e-9).all()
            assert bool(rast[0, r, c, 3] > 0) == inside, (r, c)
            if inside:
                assert rast[0, r, c, 3] == 1
                np.testing.assert_allclose(rast[0, r, c, :2].numpy(), b[:2], atol=1e-5)


def test_zbuffer_keeps_nearest_regardless_of_order():
    big = [[-1.0, -1.0], [3.0, -1.0], [-1.0, 3.0]]
    def tri_at(depth):  # clip coordinates with w = depth (x, y scaled so the NDC shape is the same)
        return [[x * depth, y * depth, 0.0, depth] for x, y in big]
    for order in ((2.0, 5.0), (5.0, 2.0)):
        pos = torch.tensor([tri_at(order[0]) + tri_at(order[1])])
        tri = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
        rast = torch_rasterize(pos, tri, (6, 6))
        near_id = 1 + int(np.argmin(order))
        assert (rast[0, ..., 3] == near_id).all()


def test_perspective_correct_interpolation_on_a_slanted_plane():
    H, W = 24, 32
    K = np.array([[30.0, 0, W / 2], [0, 30.0, H / 2], [0, 0, 1]])
    P = torch.tensor(projection_matrix(K, W, H), dtype=torch.float32)
    # A plane slanted in depth: two triangles from z=-2 (left) to z=-6 (right), OpenGL camera at origin.
    verts = torch.tensor([[-3.0, -3.0, -2.0], [3.0, -3.0, -6.0], [-3.0, 3.0, -2.0], [3.0, 3.0, -6.0]])
    pos = (torch.cat([verts, torch.ones(4, 1)], 1) @ P.T)[None]
    tri = torch.tensor([[0, 1, 2], [1, 3, 2]], dtype=torch.int32)
    rast = torch_rasterize(pos, tri, (H, W))
    x_attr = interpolate(verts[:, :1], rast, tri, rasterizer=get_rasterizer("torch"))[0, ..., 0]
    checked = 0
    for r in range(H):
        for c in range(W):
            if rast[0, r, c, 3] == 0:
                continue
            # Ray through the pixel centre hits the plane z = -2 - (x + 3) * 4/6.
            dx, dy = (c + 0.5 - W / 2) / 30.0, -(r + 0.5 - H / 2) / 30.0
            # point = t * (dx, dy, -1): -t = -2 - (t dx + 3) * 2/3  ->  t (1 - 2/3 dx) = 4
            t = 4.0 / (1.0 - 2.0 / 3.0 * dx)
            assert abs(float(x_attr[r, c]) - t * dx) < 1e-3
            checked += 1
    assert checked > 100


def _brute(pos, tri, H, W):
    pos = pos.double().numpy()
    ids = np.zeros((pos.shape[0], H, W))
    dep = np.full((pos.shape[0], H, W), np.inf)
    for t in range(pos.shape[0]):
        for f, (a, b, c) in enumerate(tri.numpy()):
            M = pos[t, [a, b, c]][:, [0, 1, 3]].T
            if abs(np.linalg.det(M)) < 1e-12:
                continue
            Z = pos[t, [a, b, c], 2]
            for r in range(H):
                for col in range(W):
                    cc = np.linalg.solve(M, [(2 * col + 1) / W - 1, (2 * r + 1) / H - 1, 1.0])
                    if (cc >= -1e-9).all() and cc.sum() > 0 and -1 <= cc @ Z <= 1 and 1 / cc.sum() < dep[t, r, col]:
                        dep[t, r, col], ids[t, r, col] = 1 / cc.sum(), f + 1
    return ids


@pytest.mark.parametrize("behind", [False, True])
def test_matches_brute_force_on_random_triangles(behind):
    g = torch.Generator().manual_seed(3)
    H, W, V = 9, 13, 24
    pos = torch.randn(2, V, 4, generator=g)
    pos[..., 3] = torch.randn(2, V, generator=g) * 2 if behind else pos[..., 3].abs() * 2 + 0.2
    pos[..., 2] = pos[..., 3] * torch.rand(2, V, generator=g) * 1.2 - 0.1 * pos[..., 3]
    tri = torch.randint(0, V, (16, 3), generator=g).int()
    rast = torch_rasterize(pos, tri, (H, W))
    np.testing.assert_array_equal(rast[..., 3].numpy(), _brute(pos, tri, H, W))


def test_far_plane_clips():
    K = np.array([[10.0, 0, 4], [0, 10.0, 4], [0, 0, 1]])
    P = torch.tensor(projection_matrix(K, 8, 8, near=1e-3, far=1e3), dtype=torch.float32)
    def plane(z):
        v = torch.tensor([[-1e4, -1e4, z], [1e4, -1e4, z], [0.0, 1e4, z]])
        return (torch.cat([v, torch.ones(3, 1)], 1) @ P.T)[None]
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    assert (torch_rasterize(plane(-500.0), tri, (8, 8))[..., 3] == 1).all()
    assert (torch_rasterize(plane(-2000.0), tri, (8, 8))[..., 3] == 0).all()


def test_projection_matrix_matches_intrinsics_non_square():
    W, H = 40, 24
    K = np.array([[35.0, 0, 21.0], [0, 33.0, 11.0], [0, 0, 1]])
    P = projection_matrix(K, W, H)
    X = np.array([0.7, -0.4, -3.0, 1.0])  # OpenGL camera space
    clip = P @ X
    ndc = clip[:2] / clip[3]
    x_img, y_img = 21.0 + 35.0 * 0.7 / 3.0, 11.0 - 33.0 * (-0.4) / 3.0
    np.testing.assert_allclose(ndc, [2 * x_img / W - 1, 2 * y_img / H - 1])
    assert abs(clip[3] - 3.0) < 1e-12


def test_nvdiffrast_missing_falls_back_with_notice(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nvdiffrast", None)
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", None)
    with pytest.warns(UserWarning, match="nvdiffrast unavailable, using the torch rasterizer"):
        rz = get_rasterizer("nvdiffrast")
    assert rz.name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_rasterizer("auto", "cpu").name == "torch"  # CPU: no notice


def test_functional_api_shapes():
    pos = torch.tensor([[[-1.0, -1.0, 0.0, 1.0], [1.0, -1.0, 0.0, 1.0], [-1.0, 1.0, 0.0, 1.0]]]).repeat(3, 1, 1)
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast = rasterize(pos, tri, (5, 7))
    assert rast.shape == (3, 5, 7, 4)
    out = interpolate(torch.eye(3), rast, tri)
    assert out.shape == (3, 5, 7, 3)
    hit = rast[..., 3] > 0
    np.testing.assert_allclose(out.sum(-1)[hit].numpy(), 1.0, atol=1e-5)


def test_render_guides_torch_output_matches_numpy():
    """output="torch" leaves the guides on the render device; .numpy() gives the default result."""
    import numpy as np
    import torch

    from ex4d.camera import Intrinsics, preset_path
    from ex4d.dwmesh import build_dwmesh
    from ex4d.render import render_guides
    from ex4d.synthetic import make_scene

    scene = make_scene(3, 48, 32, 3)
    frames, depth = scene.source()
    mesh = build_dwmesh(depth, scene.K)
    path = preset_path("30", 3, Intrinsics.from_K(scene.K, 48, 32), depth0=depth[0])
    ref = render_guides(mesh, frames, path, rasterizer="torch")
    got = render_guides(mesh, torch.from_numpy(frames), path, rasterizer="torch", output="torch")
    assert isinstance(got.color, torch.Tensor) and got.color.dtype == torch.uint8
    back = got.numpy()
    for a, b in zip((ref.color, ref.mask, ref.depth), (back.color, back.mask, back.depth)):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert ref.mask[0].all()  # frame 0 of a preset is the source camera


@pytest.mark.parametrize("method", ["ours", "ex4d"])
@pytest.mark.parametrize("unit", [100.0, 1000.0])  # centimetres, millimetres
def test_guides_do_not_depend_on_the_depth_unit(method, unit):
    """The same scene in metres and in millimetres (camera moves scale with the depth) gives the same
    guides: the far border, the skirt and the clip planes follow camera.scene_scale."""
    from ex4d.camera import Intrinsics, preset_path, scene_scale
    from ex4d.dwmesh import DWMeshConfig, build_dwmesh
    from ex4d.render import render_guides
    from ex4d.synthetic import make_scene

    scene = make_scene(2, 64, 48, 4)
    frames, depth = scene.source()
    intr = Intrinsics.from_K(scene.K, 64, 48)
    out = []
    for d in (depth, depth * unit):
        mesh = build_dwmesh(d, scene.K, DWMeshConfig(method=method))
        path = preset_path("orbit_right", 4, intr, depth0=d[0], angle_deg=60)
        out.append((mesh, render_guides(mesh, frames, path, rasterizer="torch")))
    (metres, ref), (fine, got) = out
    assert metres.scene_scale == 1.0 and fine.scene_scale == pytest.approx(scene_scale(depth * unit), rel=0.05)  # a subsample
    assert fine.scene_scale > 1.0
    assert ref.mask[1:].mean() > 0.3  # a real move, not an empty guide
    assert (ref.mask != got.mask).mean() < 1e-3
    same = ref.mask & got.mask
    assert np.abs(ref.color.astype(int) - got.color.astype(int))[same].mean() < 0.5


def test_scene_scale_rule():
    from ex4d.camera import clip_planes, scene_scale

    rng = np.random.default_rng(0)
    metres = rng.uniform(1.0, 8.0, size=(4, 32, 32))
    assert scene_scale(metres) == 1.0 and clip_planes(1.0) == (1e-3, 1e3)
    assert scene_scale(metres * 1000) == pytest.approx(np.percentile(metres * 1000, 10) / 10)
    sky = metres.copy()
    sky[:, :20] = 1e10  # Cycles' background depth over most of the frame must not set the scale
    assert scene_scale(sky) == 1.0
    assert scene_scale(np.full((2, 4, 4), np.nan)) == 1.0
    near, far = clip_planes(150.0)
    assert (near, far) == pytest.approx((0.15, 1.5e5))


def _guides_for(depth, frames, K, cam="dolly_right", **kw):
    from ex4d.camera import Intrinsics, preset_path
    from ex4d.dwmesh import build_dwmesh
    from ex4d.render import render_guides

    T, H, W = depth.shape
    mesh = build_dwmesh(depth, K)
    path = preset_path(cam, T, Intrinsics.from_K(K, W, H), depth0=depth[0], **kw)
    return mesh, render_guides(mesh, frames, path, rasterizer="torch")


@pytest.mark.parametrize("far_background", [50.0, 600.0, 2000.0])
def test_far_content_stays_valid_and_the_sky_is_masked(far_background):
    """Background far behind a metre-scale subject (a valley at 600 m, 2 km) stays valid under a small
    move (the skirt and the far clip move behind it); the sky (Blender's 1e10) is masked, as the
    release's far clip masks it, and never becomes the pivot."""
    from ex4d.synthetic import make_scene

    scene = make_scene(2, 64, 48, 3)
    frames, depth = scene.source()
    far = depth.copy()
    far[:, :12] = far_background
    mesh, g = _guides_for(far, frames, scene.K, distance=0.3)
    assert mesh.clip_planes[1] > 2 * far_background
    assert g.mask[1:, 2:10].mean() > 0.9
    sky = depth.copy()
    sky[:, :12] = 1e10
    mesh, g = _guides_for(sky, frames, scene.K, distance=0.3)
    assert not g.mask[1:, :12].any()
    # ...and its vertices stay where float32 renderers (Blender's Workbench) can draw the mesh at all.
    assert float(-mesh.vertices[..., 2].min()) <= 2.0 * mesh.clip_planes[1] * 1.0001
    # Sky over most of frame 0: the orbit still turns around the subject, not around the sky.
    mostly_sky = depth.copy()
    mostly_sky[:, :40] = 1e10
    _, g = _guides_for(mostly_sky, frames, scene.K, cam="orbit_right", angle_deg=30)
    assert g.mask[1:, 40:].mean() > 0.5


def test_deep_scene_guides_do_not_depend_on_the_unit():
    """Content kilometres away: the same guides in metres and in tenths of metres."""
    from ex4d.synthetic import make_scene

    scene = make_scene(2, 64, 48, 3)
    frames, depth = scene.source()
    deep = depth.copy()
    deep[:, :16] = np.linspace(300.0, 2000.0, 64)[None, None, :]  # a far hillside
    masks = [_guides_for(deep / s, frames, scene.K, cam="orbit_right", angle_deg=20)[1].mask for s in (1.0, 10.0)]
    assert masks[0][1:, :16].mean() > 0.5
    assert (masks[0] != masks[1]).mean() < 1e-3


def test_depth_that_is_sky_everywhere_is_refused():
    from ex4d.camera import scene_scale
    from ex4d.dwmesh import build_dwmesh
    from ex4d.errors import DepthError

    sky = np.full((2, 12, 16), 1e10, np.float32)
    assert scene_scale(sky) == 1.0
    with pytest.raises(DepthError, match="sky everywhere"):
        build_dwmesh(sky, np.array([[20.0, 0, 8], [0, 20.0, 6], [0, 0, 1]]))
