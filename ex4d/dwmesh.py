"""The depth-watertight mesh (DW-mesh): one vertex per pixel, a full grid of triangles, per frame.

Three methods (``DWMeshConfig.method``):

* ``"ex4d"`` - the EX-4D release's recipe exactly: the outer pixel ring is pulled to
  ``border_depth`` (100), two triangles per 2x2 pixel quad plus two triangles joining the four image
  corners (F = 2(H-1)(W-1) + 2), a face is invalid when its smallest interior angle is below
  ``min_angle_deg`` (2.5 deg), and invalidity is expressed by zeroing the RGBA of the invalid faces'
  vertices: the guide mask is interpolated alpha > 125/255.
* ``"torn"`` - the release's ablation: the same mesh with the invalid faces deleted.
* ``"ours"`` (default) - keeps the real outer pixel ring and adds a skirt OUTSIDE the image (one ring
  of vertices on the image boundary rays at a far depth, plus a back plate), so the mesh is still
  watertight; invalidity is per face (no erosion of valid pixels next to invalid faces); a face is
  invalid when one of its edges is a depth discontinuity - a step in inverse depth that is an outlier
  against the steps on both sides of it (planes have constant steps in inverse depth, however oblique,
  so oblique floors and walls stay valid) and larger than ``jump_footprints`` pixel footprints - or
  when the source sees it at a grazing angle above ``max_grazing_deg``.

Geometry is vectorised torch over a batch of frames (CPU or CUDA). Coordinates are OUR world (the
source camera at that frame, OpenGL axes): pixel centre (x, y) with z-depth d ->
((x - cx)/fx d, -(y - cy)/fy d, -d) (docs/architecture.md).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .camera import clip_planes, content_depth, scene_scale, sky_depth
from .errors import DepthError, InputError

METHODS = ("ours", "ex4d", "torn")
INVALID_TESTS = ("angle", "stretch", "dz_dxy", "ours")


@dataclass(frozen=True)
class DWMeshConfig:
    """How the DW-mesh is built. The release's constants are kept under their own names."""

    method: str = "ours"
    # --- the EX-4D release ---
    border_depth: float = 100.0  # depth the outer pixel ring is pulled to (ex4d / torn)
    min_angle_deg: float = 2.5  # a face with a smaller interior angle is invalid (ex4d / torn)
    stretch_ratio: float = 0.013  # the release's stretch test (largest edge extent / frame z-range); unused in DW mode
    dz_dxy_max: float = 2.0  # the release's alternative filter: max|dz| / max(|dx|,|dy|) over edges > 2
    invalid_test: str | None = None  # None = the method's own ("angle" for ex4d/torn, "ours" for ours)
    alpha_threshold: float = 125.0 / 255.0  # mask = interpolated alpha > this (ex4d / torn)
    # --- ours ---
    jump_footprints: float = 2.0  # a depth step counts as a discontinuity when larger than this many pixel footprints
    jump_ratio: float = 2.0  # ... and this many times larger than the steps on both sides (curved surfaces grow steps gradually)
    max_grazing_deg: float = 88.0  # faces the source sees more edge-on than this are invalid
    skirt_scale: float = 4.0  # skirt depth = max(border_depth, skirt_scale * the frame's largest depth), below the far clip
    color_sampling: str | None = None  # "uv" (bilinear from the source frame) or "vertex"; None = method default

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown DW-mesh method '{self.method}' (one of {', '.join(METHODS)})")
        if self.invalid_test is not None and self.invalid_test not in INVALID_TESTS:
            raise InputError(f"unknown invalid-face test '{self.invalid_test}' (one of {', '.join(INVALID_TESTS)})")
        if self.color_sampling not in (None, "uv", "vertex"):
            raise InputError("color_sampling must be 'uv' or 'vertex'")

    @property
    def test(self) -> str:
        return self.invalid_test or ("ours" if self.method == "ours" else "angle")

    @property
    def sampling(self) -> str:
        return self.color_sampling or ("vertex" if self.method in ("ex4d", "torn") else "uv")


@dataclass
class DWMesh:
    """A DW-mesh for T frames sharing one topology.

    vertices (T,V,3) float32, faces (F,3) int32, uv (V,2) float32, face_valid (T,F) bool,
    vertex_alpha (T,V) float32 (the release's zeroed RGBA; all ones for ``ours``), vertex_pixel (V,)
    int64 = the source pixel (row * W + col) giving each vertex its colour, size = (H, W) of the
    source frames, K (T,3,3) float64.
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    uv: torch.Tensor
    face_valid: torch.Tensor
    vertex_alpha: torch.Tensor
    vertex_pixel: torch.Tensor
    size: tuple[int, int]
    K: np.ndarray
    config: DWMeshConfig = field(default_factory=DWMeshConfig)
    # camera.scene_scale of the depth it was built from: the far border, the skirt and the renderer's
    # clip planes are multiplied by it (1 for depth in metres).
    scene_scale: float = 1.0
    # The renderer's far clip plane (camera.clip_planes): None = the release's 1e3 x scene_scale.
    clip_far: float | None = None

    @property
    def clip_planes(self) -> tuple[float, float]:
        near, far = clip_planes(self.scene_scale)
        return near, far if self.clip_far is None else float(self.clip_far)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def num_frames(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def num_grid_vertices(self) -> int:
        return self.size[0] * self.size[1]

    def to(self, device) -> "DWMesh":
        return replace(
            self,
            vertices=self.vertices.to(device),
            faces=self.faces.to(device),
            uv=self.uv.to(device),
            face_valid=self.face_valid.to(device),
            vertex_alpha=self.vertex_alpha.to(device),
            vertex_pixel=self.vertex_pixel.to(device),
        )

    def frame(self, t: int) -> "DWMesh":
        return replace(
            self,
            vertices=self.vertices[t : t + 1],
            face_valid=self.face_valid[t : t + 1],
            vertex_alpha=self.vertex_alpha[t : t + 1],
            K=self.K[t : t + 1],
        )

    def vertex_colors(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-vertex colours (T,V,C) from frames (T,H,W,C) through ``vertex_pixel``."""
        T, H, W, C = frames.shape
        flat = frames.reshape(T, H * W, C)
        return flat[:, self.vertex_pixel.to(frames.device)]


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _as_depth(depth) -> torch.Tensor:
    if isinstance(depth, np.ndarray):
        depth = torch.from_numpy(np.ascontiguousarray(depth))
    if not isinstance(depth, torch.Tensor):
        raise DepthError("depth must be a (T,H,W) array or tensor")
    if depth.ndim == 2:
        depth = depth[None]
    if depth.ndim != 3:
        raise DepthError(f"depth must have shape (T,H,W), got {tuple(depth.shape)}")
    if depth.shape[1] < 2 or depth.shape[2] < 2:
        raise DepthError(f"depth frames must be at least 2x2 pixels, got {depth.shape[2]}x{depth.shape[1]}")
    return depth.float()


def _as_K(K, T: int) -> np.ndarray:
    K = K.detach().cpu().numpy() if isinstance(K, torch.Tensor) else np.asarray(K)
    K = K.astype(np.float64)
    if K.shape == (3, 3):
        K = np.broadcast_to(K, (T, 3, 3)).copy()
    if K.shape != (T, 3, 3):
        raise InputError(f"intrinsics K must be (3,3) or ({T},3,3), got {K.shape}")
    if not np.isfinite(K).all() or (K[:, 0, 0] <= 0).any() or (K[:, 1, 1] <= 0).any():
        raise InputError("intrinsics K must be finite with positive focal lengths")
    return K


def unproject(depth: torch.Tensor, K: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Image points (xs, ys) (broadcastable to depth's (T,...)) with z-depth -> world points (T,...,3)."""
    fx, fy, cx, cy = (K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2])
    shape = (-1,) + (1,) * (depth.ndim - 1)
    X = (xs - cx.view(shape)) / fx.view(shape) * depth
    Y = -(ys - cy.view(shape)) / fy.view(shape) * depth
    return torch.stack([X, Y, -depth], dim=-1)


def grid_faces(H: int, W: int, device=None) -> torch.Tensor:
    """Two triangles per 2x2 pixel quad, (2(H-1)(W-1), 3) int64, quad-major (face 2q, 2q+1)."""
    i, j = torch.meshgrid(torch.arange(H - 1, device=device), torch.arange(W - 1, device=device), indexing="ij")
    tl = (i * W + j).reshape(-1)
    tr, bl, br = tl + 1, tl + W, tl + W + 1
    f = torch.stack([torch.stack([tl, bl, tr], -1), torch.stack([tr, bl, br], -1)], dim=1)
    return f.reshape(-1, 3)


_TOPOLOGY_CACHE: dict = {}


def _cached(key, build):
    """Topology depends on (H, W) only: build it once per size and device (a few MB), reuse per shot."""
    if key not in _TOPOLOGY_CACHE:
        if len(_TOPOLOGY_CACHE) > 16:
            _TOPOLOGY_CACHE.clear()
        _TOPOLOGY_CACHE[key] = build()
    return _TOPOLOGY_CACHE[key]


def _skirt(H: int, W: int, device=None):
    """The ``ours`` border: a lip and a skirt OUTSIDE the pixel grid, on the image boundary.

    The source saw each border pixel's whole footprint, up to the image boundary: a ring of "lip"
    vertices on the boundary rays (at the nearest border pixel's depth) carries the surface that far.
    Behind it a "curtain" joins the lip to a ring of far vertices on the same rays, and a back plate
    closes the far ring: the mesh stays watertight without moving any real pixel.

    Returns (xs, ys) image points of the ring vertices (n of them), the nearest border pixel of each,
    and the faces: lip faces (pixels <-> lip), curtain + back plate faces. Vertex ids: pixels
    0..HW-1, lip HW..HW+n-1, far ring HW+n..HW+2n-1.
    """
    target, device = device, None  # topology is built on the CPU (a few thousand items), then moved
    He, We = H + 2, W + 2
    ext = torch.full((He, We), -1, dtype=torch.long, device=device)
    ext[1:-1, 1:-1] = torch.arange(H * W, device=device).view(H, W)
    ring = ext < 0
    n = int(ring.sum())
    ext[ring] = H * W + torch.arange(n, device=device)
    ii, jj = torch.nonzero(ring, as_tuple=True)
    xs = torch.where(jj == 0, 0.0, torch.where(jj == We - 1, float(W), jj.float() - 0.5))
    ys = torch.where(ii == 0, 0.0, torch.where(ii == He - 1, float(H), ii.float() - 0.5))
    nearest = (ii - 1).clamp(0, H - 1) * W + (jj - 1).clamp(0, W - 1)
    fe = grid_faces(He, We, device)
    q = torch.arange(fe.shape[0], device=device) // 2
    qi, qj = q // (We - 1), q % (We - 1)
    touches = (qi == 0) | (qi == He - 2) | (qj == 0) | (qj == We - 2)
    flat = ext.reshape(-1)
    lip_faces = flat[fe[touches]]
    # The ring in cyclic order (top, right, bottom, left), as lip ids; far ids are n higher.
    top = [(0, j) for j in range(We)]
    right = [(i, We - 1) for i in range(1, He)]
    bottom = [(He - 1, j) for j in range(We - 2, -1, -1)]
    left = [(i, 0) for i in range(He - 2, 0, -1)]
    ij = torch.tensor(top + right + bottom + left)
    cyc = ext[ij[:, 0], ij[:, 1]]
    nxt = torch.roll(cyc, -1)
    curtain = torch.cat([torch.stack([cyc, nxt, cyc + n], 1), torch.stack([nxt, nxt + n, cyc + n], 1)], 0)
    c = [flat[0] + n, flat[We - 1] + n, flat[(He - 1) * We] + n, flat[He * We - 1] + n]
    back = torch.stack([torch.stack([c[0], c[2], c[1]]), torch.stack([c[1], c[2], c[3]])])
    out = (xs, ys, nearest, lip_faces, torch.cat([curtain, back], 0))
    return tuple(t.to(target) for t in out)


# Per-face tests take the three corners a, b, c (each (..., 3)) and return (...) bool = invalid.


def _thin(a, b, c, min_deg: float):
    """The release's test: smallest interior angle < min_deg (degenerate faces count as thin)."""
    cos_min = math.cos(math.radians(min_deg))
    out = None
    for p, q, r in ((a, b, c), (b, c, a), (c, a, b)):
        e1, e2 = q - p, r - p
        n = e1.norm(dim=-1) * e2.norm(dim=-1)
        thin = ((e1 * e2).sum(-1) > cos_min * n) | (n <= 0)
        out = thin if out is None else out | thin
    return out


def _stretched(a, b, c, ratio: float, zrange):
    """The release's stretch test: largest per-axis extent / the frame's z-range >= ratio."""
    p = torch.stack([a, b, c], 0)
    extent = (p.amax(0) - p.amin(0)).amax(-1)
    return extent / zrange >= ratio


def _steep(a, b, c, limit: float):
    """The release's alternative filter: max |dz| / max(|dx|, |dy|) over the edges > limit."""
    d = torch.stack([b - a, c - b, a - c], 0)
    dz = d[..., 2].abs().amax(0)
    dxy = torch.maximum(d[..., 0].abs(), d[..., 1].abs()).amax(0)
    return dz > limit * dxy.clamp_min(1e-12)


def _grazing(a, b, c, max_deg: float):
    """The source camera (at the origin) sees the face more than ``max_deg`` from its normal."""
    n = torch.cross(b - a, c - a, dim=-1)
    r = a + b + c
    return (n * r).sum(-1).abs() < math.cos(math.radians(max_deg)) * n.norm(dim=-1) * r.norm(dim=-1)


def _face_test(verts, faces, n_grid: int, H: int, W: int, fn) -> torch.Tensor:
    """Apply a corner test to every face, (T,F) bool. Grid faces use slices of the pixel grid (no gathers)."""
    T = verts.shape[0]
    P = verts[:, : H * W].reshape(T, H, W, 3)
    tl, tr, bl, br = P[:, :-1, :-1], P[:, :-1, 1:], P[:, 1:, :-1], P[:, 1:, 1:]
    grid = torch.stack([fn(tl, bl, tr), fn(tr, bl, br)], dim=-1).reshape(T, -1)[:, :n_grid]
    extra = faces[n_grid:]
    if extra.numel() == 0:
        return grid
    p = verts[:, extra]
    return torch.cat([grid, fn(p[:, :, 0], p[:, :, 1], p[:, :, 2])], dim=1)


def _jump_edges(q: torch.Tensor, di: int, dj: int, thresh: torch.Tensor, ratio: float = 0.0) -> torch.Tensor:
    """Discontinuity flags for the pixel edges p -> p + (di, dj) of inverse depth q (T,H,W).

    An edge is a discontinuity when its step differs by more than ``thresh`` (at p) from the steps
    just before and just after it along the same direction (where those exist): planes have constant
    steps in inverse depth, creases change step once, only true jumps stand out on both sides.
    Returns (T,H,W) bool, False where p + (di, dj) is outside the image.
    """
    T, H, W = q.shape
    pad = 2
    qp = torch.nn.functional.pad(q[:, None], (pad, pad, pad, pad), value=float("nan"))[:, 0]

    def shifted(k: int) -> torch.Tensor:
        return qp[:, pad + k * di : pad + k * di + H, pad + k * dj : pad + k * dj + W]

    q0, q1, qm, q2 = shifted(0), shifted(1), shifted(-1), shifted(2)
    step = q1 - q0
    before, after = q0 - qm, q2 - q1
    dev_b = (step - before).abs()
    dev_a = (step - after).abs()
    # At the image border one neighbour step is missing: judge against the other one, and call it a
    # jump only when this step is the larger of the two (else the neighbour is the jump).
    miss_b, miss_a = torch.isnan(before), torch.isnan(after)
    one_sided = miss_b ^ miss_a
    other = torch.where(miss_b, after, before)
    dev_one = (step - other).abs()
    big = step.abs()
    jump = torch.where(one_sided, (dev_one > thresh) & (big > max(ratio, 1.0) * other.abs()),
                       (dev_b > thresh) & (dev_a > thresh) & (big > ratio * before.abs()) & (big > ratio * after.abs()))
    # Neither neighbour (images 2-3 pixels wide): the relative step itself decides.
    jump = torch.where(miss_b & miss_a, step.abs() > thresh, jump)
    return jump & ~torch.isnan(step)


def _ours_invalid(depth: torch.Tensor, K: torch.Tensor, footprints: float, ratio: float) -> torch.Tensor:
    """Per grid face: any of its edges is an inverse-depth discontinuity larger than ``footprints`` pixel footprints.

    One pixel footprint at depth d is d/f of lateral extent; a step of k footprints in depth is a
    relative inverse-depth step of about k/f. The threshold therefore is q * footprints / f.
    """
    T, H, W = depth.shape
    q = 1.0 / depth
    f = torch.sqrt(K[:, 0, 0] * K[:, 1, 1]).view(T, 1, 1)
    thresh = q * footprints / f
    h = _jump_edges(q, 0, 1, thresh, ratio)  # (i,j)-(i,j+1)
    v = _jump_edges(q, 1, 0, thresh, ratio)  # (i,j)-(i+1,j)
    d = _jump_edges(q, 1, -1, thresh, ratio)  # (i,j)-(i+1,j-1): the quads' diagonals tr-bl
    # Faces per quad (i,j): A = (tl, bl, tr) has edges tl-bl (v at tl), tl-tr (h at tl), tr-bl (d at tr);
    # B = (tr, bl, br) has tr-br (v at tr), bl-br (h at bl), tr-bl (d at tr).
    vt, ht = v[:, :-1, :-1], h[:, :-1, :-1]
    dtr, vtr, hbl = d[:, :-1, 1:], v[:, :-1, 1:], h[:, 1:, :-1]
    A = vt | ht | dtr
    B = vtr | hbl | dtr
    return torch.stack([A, B], dim=-1).reshape(T, -1)


def _touches_valid_face(grid_valid: torch.Tensor, T: int, H: int, W: int) -> torch.Tensor:
    """(T,H,W) bool: the pixel is a corner of at least one valid grid face (slices, no scatter).

    Quad (i,j) has face A = (tl, bl, tr) and B = (tr, bl, br), see ``grid_faces``."""
    v = grid_valid.reshape(T, H - 1, W - 1, 2)
    A, B = v[..., 0], v[..., 1]
    out = torch.zeros(T, H, W, dtype=torch.bool, device=grid_valid.device)
    out[:, :-1, :-1] |= A
    out[:, 1:, :-1] |= A | B
    out[:, :-1, 1:] |= A | B
    out[:, 1:, 1:] |= B
    return out


def build_dwmesh(depth, K, config: DWMeshConfig | None = None, device=None) -> DWMesh:
    """Build the DW-mesh of every frame: depth (T,H,W) z-depth (torch or numpy), K (3,3) or (T,3,3)."""
    config = config or DWMeshConfig()
    depth = _as_depth(depth)
    if device is not None:
        depth = depth.to(device)
    device = depth.device
    T, H, W = depth.shape
    K_np = _as_K(K, T)
    Kt = torch.as_tensor(K_np, dtype=torch.float32, device=device)
    good = torch.isfinite(depth) & (depth > 0)
    if not bool(good.any()):
        raise DepthError("depth has no positive finite values")

    ys, xs = torch.meshgrid(torch.arange(H, device=device, dtype=torch.float32) + 0.5,
                            torch.arange(W, device=device, dtype=torch.float32) + 0.5, indexing="ij")
    faces = _cached(("grid", H, W, str(device)), lambda: grid_faces(H, W, device))
    bad_pixel = ~good
    scale = depth_scene_scale(depth)
    border = config.border_depth * scale
    # Farthest content per frame, the sky left out (camera.SKY_DEPTH): it sets the skirt and the far clip.
    content = good & (depth < sky_depth(scale))
    if not bool(content.any()):
        raise DepthError(f"the depth is sky everywhere (every value is {sky_depth(scale):g} units or more): "
                         "there is no surface to build a mesh from - is it the right file, or a background-only pass?")
    content_max = torch.where(content, depth, torch.zeros_like(depth)).reshape(T, -1).amax(dim=1)
    _, clip_far = clip_planes(scale, float(content_max.max()))
    d = torch.where(good, depth, torch.full_like(depth, border))

    if config.method in ("ex4d", "torn"):
        d = d.clone()
        d[:, 0, :] = d[:, -1, :] = border
        d[:, :, 0] = d[:, :, -1] = border
        verts = unproject(d, Kt, xs, ys).reshape(T, H * W, 3)
        corners = torch.tensor([0, W - 1, (H - 1) * W, H * W - 1], device=device)
        faces = torch.cat([faces, torch.stack([corners[[0, 2, 1]], corners[[1, 2, 3]]])], 0)
        uv_x, uv_y = xs.reshape(-1), ys.reshape(-1)
        vertex_pixel = torch.arange(H * W, device=device)
        n_grid_faces = faces.shape[0] - 2
        skirt_faces = torch.zeros(0, dtype=torch.long, device=device)
        lip_ids = skirt_faces
    else:
        sx, sy, nearest, lip_faces, closing = _cached(("skirt", H, W, str(device)), lambda: _skirt(H, W, device))
        grid = unproject(d, Kt, xs, ys).reshape(T, H * W, 3)
        lip = unproject(d.reshape(T, -1)[:, nearest], Kt, sx, sy)
        # Behind the scene's content, in front of the far clip plane (so the skirt is never clipped).
        far = (content_max * config.skirt_scale).clamp(min=border, max=0.9 * clip_far)
        skirt = unproject(far[:, None].expand(T, sx.numel()), Kt, sx, sy)
        verts = torch.cat([grid, lip, skirt], dim=1)
        n_grid_faces = faces.shape[0]
        faces = torch.cat([faces, lip_faces, closing], 0)
        uv_x, uv_y = torch.cat([xs.reshape(-1), sx, sx]), torch.cat([ys.reshape(-1), sy, sy])
        vertex_pixel = torch.cat([torch.arange(H * W, device=device), nearest, nearest])
        lip_ids = torch.arange(n_grid_faces, n_grid_faces + lip_faces.shape[0], device=device)
        skirt_faces = torch.arange(n_grid_faces + lip_faces.shape[0], faces.shape[0], device=device)

    test = config.test
    invalid = torch.empty(T, faces.shape[0], dtype=torch.bool, device=device)
    zrange = (verts[..., 2].amax(1) - verts[..., 2].amin(1)).clamp_min(1e-12)
    # Frames per chunk: bounded temporaries (a few hundred MB on a GPU, tens of MB on a CPU where
    # cache-sized chunks are faster anyway); on a GPU few chunks also mean few kernel launches.
    budget = 1 << (24 if device.type == "cuda" else 20)
    step = max(1, budget // max(faces.shape[0], 1))
    for t0 in range(0, T, step):
        zr = zrange[t0 : t0 + step].view(-1, 1)
        per_face = {
            "angle": lambda a, b, c: _thin(a, b, c, config.min_angle_deg),
            "stretch": lambda a, b, c: _stretched(a, b, c, config.stretch_ratio, zr if a.ndim == 3 else zr[..., None]),  # noqa: B023
            "dz_dxy": lambda a, b, c: _steep(a, b, c, config.dz_dxy_max),
            "ours": lambda a, b, c: _grazing(a, b, c, config.max_grazing_deg),
        }[test]
        invalid[t0 : t0 + step] = _face_test(verts[t0 : t0 + step], faces, n_grid_faces, H, W, per_face)
    if test == "ours":
        invalid[:, :n_grid_faces] |= _ours_invalid(d, Kt, config.jump_footprints, config.jump_ratio)
        if lip_ids.numel():
            # A lip face inherits the border surface's validity: each of its pixels must touch a valid face.
            has_valid = _touches_valid_face(~invalid[:, :n_grid_faces], T, H, W).reshape(T, -1)
            lf = faces[lip_ids]
            ok = (has_valid[:, lf.clamp(max=H * W - 1)] | (lf >= H * W)[None]).all(-1)
            invalid[:, lip_ids] |= ~ok
    # Faces touching pixels without depth are never valid; the skirt never is.
    if bool(bad_pixel.any()):
        bad_v = torch.cat([bad_pixel.reshape(T, -1), torch.zeros(T, verts.shape[1] - H * W, dtype=torch.bool, device=device)], 1)
        invalid |= bad_v[:, faces].any(dim=-1)
    if skirt_faces.numel():
        invalid[:, skirt_faces] = True

    alpha = torch.ones(T, verts.shape[1], device=device)
    if config.method in ("ex4d", "torn"):
        # The release zeroes the RGBA of every vertex of an invalid face.
        hits = torch.zeros(T, verts.shape[1], device=device)
        idx = faces.reshape(1, -1).expand(T, -1)
        hits.scatter_add_(1, idx, invalid.float().repeat_interleave(3, dim=1))
        zero = hits > 0
        alpha = (~zero).float()

    # Sky vertices (Blender's 1e10) come in to twice the far clip along their own pixel rays: still
    # clipped, hence masked, but in a range that float32 renderers (Blender's viewport and Workbench)
    # draw without losing the whole mesh; validity was decided on the true depth above.
    beyond = -verts[..., 2] > 2.0 * clip_far
    if bool(beyond.any()):
        verts = torch.where(beyond[..., None], verts * (2.0 * clip_far / -verts[..., 2:3]), verts)

    uv = torch.stack([uv_x / W, 1.0 - uv_y / H], dim=-1)
    return DWMesh(
        vertices=verts.float().contiguous(),
        faces=faces.to(torch.int32).contiguous(),
        uv=uv.float().contiguous(),
        face_valid=~invalid,
        vertex_alpha=alpha,
        vertex_pixel=vertex_pixel.long(),
        size=(H, W),
        K=K_np,
        config=config,
        scene_scale=scale,
        clip_far=clip_far,
    )


def depth_scene_scale(depth) -> float:
    """camera.scene_scale of a (T,H,W) depth clip (torch or numpy), read on a subsample: about 8
    frames, every 4th pixel of every 4th row."""
    sample = depth[:: max(1, depth.shape[0] // 8), ::4, ::4]
    if isinstance(sample, torch.Tensor):
        sample = sample.float().cpu().numpy()
    return scene_scale(sample)


# --------------------------------------------------------------------------------------------------
# Files (atomic: temp file in the same folder + os.replace)
# --------------------------------------------------------------------------------------------------


def _atomic_path(path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return path, Path(tmp)


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def save_npz(mesh: DWMesh, path) -> Path:
    """The whole shot: vertices (T,V,3) float32, faces (F,3) int32, uv (V,2), face_valid (T,F) + extras."""
    path, tmp = _atomic_path(path)
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                vertices=_np(mesh.vertices).astype(np.float32),
                faces=_np(mesh.faces).astype(np.int32),
                uv=_np(mesh.uv).astype(np.float32),
                face_valid=_np(mesh.face_valid).astype(bool),
                vertex_alpha=_np(mesh.vertex_alpha).astype(np.float32),
                vertex_pixel=_np(mesh.vertex_pixel).astype(np.int64),
                size=np.array(mesh.size, dtype=np.int64),
                K=mesh.K.astype(np.float64),
                method=np.array(mesh.config.method),
                scene_scale=np.array(float(mesh.scene_scale)),
                clip_far=np.array(float(mesh.clip_planes[1])),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_npz(path) -> DWMesh:
    """Read a DW-mesh npz (ours, or any file with the four DESIGN.md arrays)."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read DW-mesh file {path}: {e}") from None
    missing = [k for k in ("vertices", "faces", "uv", "face_valid") if k not in z.files]
    if missing:
        raise InputError(f"{path}: not a DW-mesh file (missing {', '.join(missing)})")
    verts = torch.from_numpy(z["vertices"].astype(np.float32))
    T, V = verts.shape[:2]
    faces = torch.from_numpy(z["faces"].astype(np.int32))
    face_valid = torch.from_numpy(z["face_valid"].astype(bool))
    if faces.ndim != 2 or faces.shape[1] != 3 or face_valid.shape != (T, faces.shape[0]):
        raise InputError(f"{path}: inconsistent DW-mesh arrays")
    uv = torch.from_numpy(z["uv"].astype(np.float32))
    alpha = torch.from_numpy(z["vertex_alpha"]) if "vertex_alpha" in z.files else torch.ones(T, V)
    if "size" in z.files:
        H, W = (int(v) for v in z["size"])
    else:  # derive from uv (pixel centres)
        H = W = 0
    vpix = torch.from_numpy(z["vertex_pixel"]) if "vertex_pixel" in z.files else torch.arange(V)
    K = z["K"] if "K" in z.files else np.broadcast_to(np.eye(3), (T, 3, 3)).copy()
    method = str(z["method"]) if "method" in z.files else "ours"
    if "scene_scale" in z.files:
        scale = float(z["scene_scale"])
        far = float(z["clip_far"]) if "clip_far" in z.files else None
    else:
        scale, far = vertex_clip(z["vertices"], (H, W))
    return DWMesh(verts, faces, uv, face_valid, alpha, vpix, (H, W), K, DWMeshConfig(method=method), scale, far)


def vertex_clip(vertices, size: tuple[int, int]) -> tuple[float, float]:
    """(scene scale, far clip) from a mesh's vertices (T,V,3) (our axes: depth = -z), for meshes that
    come without them (older files, a Blender-edited mesh): read off the grid vertices (the first H*W)
    as ``build_dwmesh`` reads the depth; off every vertex when the mesh has no such grid."""
    v = np.asarray(vertices)
    H, W = size
    if H * W and H * W <= v.shape[1]:
        depth = -v[:, : H * W, 2].reshape(-1, H, W)
        scale = depth_scene_scale(depth)
    else:
        depth = -v[..., 2]
        scale = scene_scale(depth[:: max(1, v.shape[0] // 8), ::16])
    content = content_depth(depth, scale)
    return scale, clip_planes(scale, float(content.max()) if content.size else 0.0)[1]


def save_ply(mesh: DWMesh, path, frame_rgb=None, t: int = 0) -> Path:
    """One frame as binary PLY: positions, vertex colours (from ``frame_rgb`` (H,W,3) uint8) and alpha,
    and a per-face ``ex4d_valid`` flag."""
    path, tmp = _atomic_path(path)
    v = _np(mesh.vertices[t]).astype("<f4")
    f = _np(mesh.faces).astype("<i4")
    valid = _np(mesh.face_valid[t]).astype(np.uint8)
    if frame_rgb is None:
        rgb = np.full((v.shape[0], 3), 200, np.uint8)
    else:
        rgb = np.asarray(frame_rgb, dtype=np.uint8).reshape(-1, 3)[_np(mesh.vertex_pixel)]
    alpha = (_np(mesh.vertex_alpha[t]) * 255).round().astype(np.uint8)
    vdt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")])
    vert = np.empty(v.shape[0], vdt)
    vert["x"], vert["y"], vert["z"] = v[:, 0], v[:, 1], v[:, 2]
    vert["red"], vert["green"], vert["blue"], vert["alpha"] = rgb[:, 0], rgb[:, 1], rgb[:, 2], alpha
    fdt = np.dtype([("n", "u1"), ("i", "<i4", (3,)), ("ex4d_valid", "u1")])
    face = np.empty(f.shape[0], fdt)
    face["n"], face["i"], face["ex4d_valid"] = 3, f, valid
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment EX-4D for Blender DW-mesh\n"
        f"element vertex {v.shape[0]}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n"
        f"element face {f.shape[0]}\nproperty list uchar int vertex_indices\nproperty uchar ex4d_valid\nend_header\n"
    )
    try:
        with open(tmp, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(vert.tobytes())
            fh.write(face.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_ply(path) -> dict:
    """Read a PLY written by :func:`save_ply`: positions (V,3), colors (V,4) uint8, faces (F,3), valid (F,)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    nv = int(next(line.split()[2] for line in header if line.startswith("element vertex")))
    nf = int(next(line.split()[2] for line in header if line.startswith("element face")))
    vdt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("c", "u1", (4,))])
    fdt = np.dtype([("n", "u1"), ("i", "<i4", (3,)), ("ex4d_valid", "u1")])
    vert = np.frombuffer(data, vdt, nv, end)
    face = np.frombuffer(data, fdt, nf, end + nv * vdt.itemsize)
    pos = np.stack([vert["x"], vert["y"], vert["z"]], 1)
    return {"positions": pos, "colors": vert["c"].copy(), "faces": face["i"].copy(), "valid": face["ex4d_valid"].astype(bool)}


def save_obj(mesh: DWMesh, path, t: int = 0, valid_only: bool = False) -> Path:
    """One frame as OBJ with UVs (``vt``) into the source frame; ``valid_only`` drops invalid faces."""
    path, tmp = _atomic_path(path)
    v = _np(mesh.vertices[t])
    uv = _np(mesh.uv)
    f = _np(mesh.faces).astype(np.int64) + 1
    if valid_only:
        f = f[_np(mesh.face_valid[t])]
    try:
        with open(tmp, "w") as fh:
            fh.write("# EX-4D for Blender DW-mesh (UVs index the source frame)\n")
            np.savetxt(fh, v, fmt="v %.7g %.7g %.7g")
            np.savetxt(fh, uv, fmt="vt %.7g %.7g")
            np.savetxt(fh, np.repeat(f, 2, axis=1), fmt="f %d/%d %d/%d %d/%d")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_obj(path) -> dict:
    """Positions (V,3), uv (V,2), faces (F,3) 0-based from an OBJ written by :func:`save_obj`."""
    pos, uv, faces = [], [], []
    with open(path) as fh:
        for line in fh:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "v":
                pos.append([float(x) for x in parts[1:4]])
            elif parts[0] == "vt":
                uv.append([float(x) for x in parts[1:3]])
            elif parts[0] == "f":
                faces.append([int(p.split("/")[0]) - 1 for p in parts[1:4]])
    return {"positions": np.array(pos), "uv": np.array(uv), "faces": np.array(faces, dtype=np.int64)}


def usd_available() -> bool:
    try:
        import pxr  # noqa: F401
    except ImportError:
        return False
    return True


def save_usd(mesh: DWMesh, path, fps: float = 24.0) -> Path:
    """The animated mesh as USD (needs the optional ``usd-core``): time-sampled points, UVs (``st``)
    and a per-face ``ex4d_valid`` primvar."""
    try:
        from pxr import Gf, Sdf, Usd, UsdGeom, Vt
    except ImportError:
        raise InputError("USD export needs the optional package usd-core: pip install 'ex4d[usd]'") from None
    path, tmp = _atomic_path(Path(path))
    tmp = tmp.with_suffix(path.suffix or ".usdc")
    try:
        stage = Usd.Stage.CreateNew(str(tmp))
        stage.SetStartTimeCode(0)
        stage.SetEndTimeCode(mesh.num_frames - 1)
        stage.SetTimeCodesPerSecond(fps)
        UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)
        m = UsdGeom.Mesh.Define(stage, "/DWMesh")
        f = _np(mesh.faces)
        m.CreateFaceVertexCountsAttr(Vt.IntArray([3] * f.shape[0]))
        m.CreateFaceVertexIndicesAttr(Vt.IntArray(f.reshape(-1).tolist()))
        st = UsdGeom.PrimvarsAPI(m).CreatePrimvar("st", Sdf.ValueTypeNames.TexCoord2fArray, UsdGeom.Tokens.vertex)
        st.Set(Vt.Vec2fArray.FromNumpy(_np(mesh.uv).astype(np.float32)))
        valid = UsdGeom.PrimvarsAPI(m).CreatePrimvar("ex4d_valid", Sdf.ValueTypeNames.BoolArray, UsdGeom.Tokens.uniform)
        pts = m.CreatePointsAttr()
        for t in range(mesh.num_frames):
            pts.Set(Vt.Vec3fArray.FromNumpy(_np(mesh.vertices[t]).astype(np.float32)), t)
            valid.Set(Vt.BoolArray(_np(mesh.face_valid[t]).tolist()), t)
        stage.GetRootLayer().Save()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
