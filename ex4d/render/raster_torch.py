"""A z-buffer triangle rasterizer in plain torch (CPU or CUDA), nvdiffrast's output format.

How it works (vectorised, no per-triangle Python loop):

1. Per triangle, homogeneous 2D edge functions (Olano & Greer 1997): with clip-space vertices
   v_i = (X_i, Y_i, W_i), the pixel ray p = (x, y, 1) in NDC hits the triangle's plane at
   perspective-correct barycentrics b = c / sum(c), c = M^-1 p, M = [v_0 v_1 v_2]. The pixel is
   covered when every c_i >= 0 and sum(c) > 0 (in front of the camera). This needs no clipping
   against w = 0; the near/far planes are applied per pixel (z/w outside [-1, 1] is dropped), which
   is exactly what clipping the triangle against those planes gives.
2. Each c_i is linear in the pixel coordinates, so for one row of pixels the covered columns are
   an interval: the intersection of four half-lines (three edges and sum(c) > 0). Triangles expand
   into (triangle, row) pairs, the pairs into candidate pixels of those exact spans - the work is
   proportional to the covered area plus one item per row, whatever the triangles' sizes.
3. The z-buffer is one ``scatter_reduce(amin)`` over int64 keys (float32 bits of the depth w, which
   order like the floats for w > 0, shifted up, then the triangle id): nearest wins, ties go to the
   lower triangle id, deterministically. Barycentrics of the winners are recomputed per pixel.

Memory is bounded by processing frames in groups and candidates in chunks (``max_candidates``).
"""

from __future__ import annotations

import torch

# Pixel-coverage tolerance relative to the barycentric scale: pixel centres exactly on a shared edge
# are covered by both triangles (the z-buffer picks one) instead of, through rounding, by neither.
_EDGE_TOL = 1e-5


def _edge_setup_vertices(v: torch.Tensor, height: int, width: int):
    """Per triangle (vertices v (N,3,4) in clip space): edge-function coefficients in pixel-index coordinates.

    Returns E (N,3,3) float64 with c_i = E[:, i] . (col, row, 1) (already divided by det(M)), Z (N,3)
    and W (N,3) float64 clip z and w of the vertices, ok (N,) bool (non-degenerate, not all behind).
    """
    v = v.double()
    X, Y, Z, W = v.unbind(-1)  # (N,3) each
    cols = torch.stack([X, Y, W], dim=-1)  # (N,3 vertices,3)
    e0 = torch.cross(cols[:, 1], cols[:, 2], dim=-1)
    e1 = torch.cross(cols[:, 2], cols[:, 0], dim=-1)
    e2 = torch.cross(cols[:, 0], cols[:, 1], dim=-1)
    E = torch.stack([e0, e1, e2], dim=1)  # rows of adj(M): c_i = e_i . p / det
    det = (cols[:, 0] * e0).sum(-1)
    scale = cols.abs().amax(dim=(1, 2)).clamp_min(1e-30)
    ok = (det.abs() > 1e-12 * scale**3) & (W > 0).any(dim=1)
    E = E / torch.where(ok, det, torch.ones_like(det))[:, None, None]
    # NDC -> pixel-index coordinates: x_ndc = (2 col + 1)/W - 1, y_ndc = (2 row + 1)/H - 1.
    S = torch.tensor(
        [[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0.0, 0.0, 1.0]],
        dtype=E.dtype,
        device=E.device,
    )
    E = E @ S
    return E, Z, W, ok


def _chunks(counts: torch.Tensor, limit: int):
    """Split consecutive items into ranges whose summed ``counts`` stay near ``limit`` (at least one item each)."""
    csum = torch.cumsum(counts, 0)
    n = counts.numel()
    i = 0
    while i < n:
        base = int(csum[i - 1]) if i > 0 else 0
        j = int(torch.searchsorted(csum, torch.tensor(base + limit, device=csum.device, dtype=csum.dtype), right=True))
        j = min(n, max(j, i + 1))
        yield i, j
        i = j


def _expand(counts: torch.Tensor):
    """For counts (n,), the owner index and the offset within the owner of every expanded item."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    offset = torch.arange(owner.numel(), device=counts.device) - first[owner]
    return owner, offset


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution, *, max_candidates: int = 1 << 21,
              max_triangles: int = 1 << 19) -> torch.Tensor:
    """Rasterize clip-space vertices ``pos`` (T,V,4) with shared triangles ``tri`` (F,3).

    Returns rast (T,H,W,4) float32: (b0, b1, z/w, triangle_id + 1), zeros where nothing is hit.
    b0, b1 are perspective-correct barycentrics of the triangle's first two vertices; the third is
    1 - b0 - b1. Row r of the raster samples NDC y = (2r + 1)/H - 1, column c NDC x = (2c + 1)/W - 1.
    """
    if pos.ndim == 2:
        pos = pos[None]
    height, width = int(resolution[0]), int(resolution[1])
    T, F = pos.shape[0], tri.shape[0]
    out = torch.zeros(T, height, width, 4, dtype=torch.float32, device=pos.device)
    if F == 0 or T == 0:
        return out
    frames_per_group = max(1, min(T, max_triangles // max(F, 1)))
    for t0 in range(0, T, frames_per_group):
        t1 = min(T, t0 + frames_per_group)
        out[t0:t1] = _rasterize_group(pos[t0:t1], tri, height, width, max_candidates)
    return out


# Triangles whose pixel bounding box holds at most this many pixel centres take the direct path.
_SMALL_BOX = 16
# Column-interval slack (pixels) of the span path; candidates are then tested exactly.
_SPAN_SLACK = 0.05


def _constraints(E: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """(N,5,3) linear constraints g . (col, row, 1) >= 0: three edges, z/w <= 1 (far), z/w >= -1 (near)."""
    zc = (E * Z[:, :, None]).sum(1)  # z/w = c . Z, linear in the pixel coordinates
    one = torch.zeros_like(zc)
    one[:, 2] = 1.0
    return torch.cat([E, (one - zc)[:, None], (zc + one)[:, None]], dim=1)


def _splat(zbuf, ga, gb, gk, frame, gid, owner, col0, row0, dc, dr, width, height):
    """Test candidate pixels (col0 + dc, row0 + dr) and z-buffer the hits.

    Per item (triangle or span): five linear functions v = ga dc + gb dr + gk of the offsets from the
    item's origin (float32 is enough so close to the origin): three perspective-correct barycentric
    numerators c_i (>= 0 inside; their sum is 1/w), far (1 - z/w >= 0) and near (z/w + 1 >= 0).
    """
    g = torch.index_select(torch.cat([ga, gb, gk], 1), 0, owner)  # (C,15)
    v = g[:, 0:5] * dc.float()[:, None] + g[:, 5:10] * dr.float()[:, None] + g[:, 10:15]  # (C,5)
    del g
    c = v[:, :3]
    s = c.sum(1)
    tol = _EDGE_TOL * c.abs().sum(1, keepdim=True)
    inside = (c >= -tol).all(1) & (v[:, 3] >= 0) & (v[:, 4] >= 0) & (s > 0)
    sel = torch.nonzero(inside).squeeze(1)
    o = torch.index_select(owner, 0, sel)
    w = 1.0 / torch.index_select(s, 0, sel)  # eye depth of the hit point (clip w): sum(c) = 1/w
    base = frame * (height * width) + row0 * width + col0  # per item: pixel index of its origin
    key = (w.view(torch.int32).long() << 32) | torch.index_select(gid, 0, o)
    pix = torch.index_select(base, 0, o) + torch.index_select(dr, 0, sel) * width + torch.index_select(dc, 0, sel)
    zbuf.scatter_reduce_(0, pix, key, reduce="amin")


def _span_functions(G: torch.Tensor, col0: torch.Tensor, row0: torch.Tensor):
    """float64 constraints (n,5,3) -> float32 (ga, gb, gk) (n,5) about each origin."""
    gk = G[:, :, 0] * col0.double()[:, None] + G[:, :, 1] * row0.double()[:, None] + G[:, :, 2]
    return G[:, :, 0].float(), G[:, :, 1].float(), gk.float()


def _rasterize_group(pos, tri, height, width, max_candidates):
    T, F = pos.shape[0], tri.shape[0]
    device = pos.device
    tri_l = tri.long()
    zbuf = torch.full((T * height * width,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)

    # Per vertex (once): pixel coordinates, 1/w and z/w for vertices in front of the camera.
    pos = pos.float()
    w = pos[..., 3]
    vfront = w > 1e-9
    iw = torch.where(vfront, 1.0 / w.clamp_min(1e-9), torch.zeros_like(w))
    vx = (pos[..., 0] * iw + 1.0) * (width / 2.0) - 0.5
    vy = (pos[..., 1] * iw + 1.0) * (height / 2.0) - 0.5
    vz = pos[..., 2] * iw
    # Per triangle (T*F): bounding boxes of pixel centres; classify.
    # One gather for the four per-vertex quantities (index_select is far cheaper than fancy indexing).
    per_vertex = torch.stack([vx, vy, vz, iw], dim=-1)  # (T,V,4)
    corner = torch.index_select(per_vertex, 1, tri_l.reshape(-1)).reshape(-1, 3, 4)  # (T*F,3,4)
    tx, ty, tz, t_iw_all = corner.unbind(-1)
    del per_vertex, corner
    vis_corner = t_iw_all > 0
    front = vis_corner.all(1)
    c0 = torch.ceil(tx.amin(1) - 1e-3).clamp(0, width).long()
    c1 = torch.floor(tx.amax(1) + 1e-3).clamp(-1, width - 1).long()
    r0 = torch.ceil(ty.amin(1) - 1e-3).clamp(0, height).long()
    r1 = torch.floor(ty.amax(1) + 1e-3).clamp(-1, height - 1).long()
    nc, nr = (c1 - c0 + 1).clamp(min=0), (r1 - r0 + 1).clamp(min=0)
    culled = front & ((nc == 0) | (nr == 0) | (tz > 1).all(1) | (tz < -1).all(1))
    culled |= ~vis_corner.any(1)
    small = front & ~culled & (nc * nr <= _SMALL_BOX)
    large = ~culled & ~small

    # Direct path (screen-space 2D edge functions about the box corner, perspective-correct via 1/w).
    idx = torch.nonzero(small).squeeze(1)
    if idx.numel():
        sub = torch.index_select(torch.cat([tx, ty, tz, t_iw_all], 1), 0, idx)  # (n,12)
        c0s, r0s = torch.index_select(c0, 0, idx), torch.index_select(r0, 0, idx)
        x = sub[:, 0:3] - c0s[:, None].float()
        y = sub[:, 3:6] - r0s[:, None].float()
        z = sub[:, 6:9]
        t_iw = sub[:, 9:12]
        del sub
        # Edge function of vertex i: lambda_i(P) = cross(p_j - P, p_k - P) / area, linear in P.
        j, k = [1, 2, 0], [2, 0, 1]
        xj, yj, xk, yk = x[:, j], y[:, j], x[:, k], y[:, k]
        la = yj - yk  # coefficient of P.x
        lb = xk - xj  # coefficient of P.y
        lc = xj * yk - xk * yj
        area = lc.sum(1)
        good = area.abs() > 1e-12
        sgn = torch.where(area < 0, -1.0, 1.0)
        inv = sgn / torch.where(good, area.abs(), torch.ones_like(area))
        la, lb, lc = la * inv[:, None], lb * inv[:, None], lc * inv[:, None]
        # c_i = lambda_i / w_i (numerators of perspective-correct barycentrics), sum = 1/w at P.
        ca, cb, cc = la * t_iw, lb * t_iw, lc * t_iw
        # z/w is affine in screen space: zn = sum lambda_i z_i; far: 1 - zn >= 0, near: zn + 1 >= 0.
        za, zb, zc = (la * z).sum(1), (lb * z).sum(1), (lc * z).sum(1)
        ones = torch.ones_like(za)
        ga = torch.stack([ca[:, 0], ca[:, 1], ca[:, 2], -za, za], 1)
        gb = torch.stack([cb[:, 0], cb[:, 1], cb[:, 2], -zb, zb], 1)
        gk = torch.stack([cc[:, 0], cc[:, 1], cc[:, 2], ones - zc, zc + ones], 1)
        keep = torch.nonzero(good).squeeze(1)
        idx, ga, gb, gk, c0s, r0s = idx[keep], ga[keep], gb[keep], gk[keep], c0s[keep], r0s[keep]
        ncs_all = torch.index_select(nc, 0, idx)
        area_px = ncs_all * torch.index_select(nr, 0, idx)
        frames_s = torch.div(idx, F, rounding_mode="floor")
        for i0, i1 in _chunks(area_px, max_candidates):
            owner, off = _expand(area_px[i0:i1])
            ncs = torch.index_select(ncs_all[i0:i1], 0, owner)
            _splat(zbuf, ga[i0:i1], gb[i0:i1], gk[i0:i1], frames_s[i0:i1], idx[i0:i1], owner, c0s[i0:i1], r0s[i0:i1],
                   off % ncs, torch.div(off, ncs, rounding_mode="floor"), width, height)
        del x, y, t_iw, z, la, lb, lc, ca, cb, cc, ga, gb, gk
    del tx, ty, tz, vx, vy, vz, iw, t_iw_all

    # Span path: exact row range from the feasible polygon, then one column interval per row.
    idx = torch.nonzero(large).squeeze(1)
    if idx.numel():
        E, Z, _, _ = _edge_setup_ids(pos, tri_l, idx, F, height, width)
        G = _constraints(E, Z)
        lo_row, hi_row = _feasible_rows(G, width, height)
        nrows = (hi_row - lo_row + 1).clamp(min=0)
        for i0, i1 in _chunks(nrows, max_candidates):
            pt, poff = _expand(nrows[i0:i1])
            prow = lo_row[i0:i1][pt] + poff
            Gp = G[i0:i1][pt]  # (P,5,3)
            a = Gp[:, :, 0]
            k = Gp[:, :, 1] * prow.double()[:, None] + Gp[:, :, 2]
            norm = torch.sqrt(Gp[:, :, 0] ** 2 + Gp[:, :, 1] ** 2).clamp_min(1e-300)
            k = k + _SPAN_SLACK * norm
            bound = -k / torch.where(a == 0, torch.ones_like(a), a)
            lo = torch.where(a > 0, bound, torch.full_like(bound, -1e30)).amax(1)
            hi = torch.where(a < 0, bound, torch.full_like(bound, 1e30)).amin(1)
            never = ((a == 0) & (k < 0)).any(1)
            clo = torch.ceil(lo.clamp(-1.0, width + 1.0)).clamp(0, width).long()
            chi = torch.floor(hi.clamp(-2.0, width + 1.0)).clamp(-1, width - 1).long()
            ncols = (chi - clo + 1).clamp(min=0)
            ncols[never] = 0
            del Gp, a, k, norm, bound, lo, hi
            live = torch.nonzero(ncols).squeeze(1)
            if live.numel() == 0:
                continue
            tsel = idx[i0:i1][pt[live]]
            clo, prow, ncols = clo[live], prow[live], ncols[live]
            ga, gb, gk = _span_functions(G[i0:i1][pt[live]], clo, prow)
            for p0, p1 in _chunks(ncols, max_candidates):
                owner, off = _expand(ncols[p0:p1])
                sl = slice(p0, p1)
                _splat(zbuf, ga[sl], gb[sl], gk[sl], torch.div(tsel[sl], F, rounding_mode="floor"), tsel[sl], owner, clo[sl], prow[sl],
                       off, torch.zeros_like(off), width, height)

    out = torch.zeros(T * height * width, 4, dtype=torch.float32, device=device)
    pix = torch.nonzero(zbuf != torch.iinfo(torch.int64).max).squeeze(1)
    if pix.numel():
        gid = torch.index_select(zbuf, 0, pix) & 0xFFFFFFFF
        # Barycentrics of the winners, in float64 from the homogeneous setup.
        E, Z, _, _ = _edge_setup_ids(pos, tri_l, gid, F, height, width)
        row = ((pix % (height * width)) // width).double()
        col = (pix % width).double()
        c = E[:, :, 0] * col[:, None] + E[:, :, 1] * row[:, None] + E[:, :, 2]
        s = c.sum(1)
        out[pix, 0] = (c[:, 0] / s).float()
        out[pix, 1] = (c[:, 1] / s).float()
        out[pix, 2] = (c * Z).sum(1).float()
        out[pix, 3] = (gid % F + 1).float()
    return out.reshape(T, height, width, 4)


def _edge_setup_ids(pos, tri_l, gid, F, height, width):
    """:func:`_edge_setup_vertices` for the (frame * F + triangle) ids ``gid``."""
    frame, t = gid // F, gid % F
    V = pos.shape[1]
    flat = pos.reshape(-1, 4)
    ids = frame[:, None] * V + torch.index_select(tri_l, 0, t)
    v = torch.index_select(flat, 0, ids.reshape(-1)).reshape(-1, 3, 4)
    return _edge_setup_vertices(v, height, width)


def _feasible_rows(G: torch.Tensor, width: int, height: int):
    """Row range of the convex region {g . (col, row, 1) >= 0} within the image, per triangle.

    The region's vertices are pairwise intersections of its lines (the five constraints and the four
    image borders); its row extent is that of the feasible ones. Empty regions give lo > hi.
    """
    n = G.shape[0]
    box = torch.tensor([[1.0, 0.0, 0.5], [-1.0, 0.0, width - 0.5], [0.0, 1.0, 0.5], [0.0, -1.0, height - 0.5]],
                       dtype=G.dtype, device=G.device)
    L = torch.cat([G, box.expand(n, -1, -1)], dim=1)  # (n,9,3)
    L = L / torch.sqrt(L[:, :, 0] ** 2 + L[:, :, 1] ** 2).clamp_min(1e-300)[:, :, None]
    i, j = torch.triu_indices(L.shape[1], L.shape[1], 1, device=G.device)
    A, B = L[:, i], L[:, j]  # (n,P,3)
    det = A[..., 0] * B[..., 1] - A[..., 1] * B[..., 0]
    safe = det.abs() > 1e-12
    d = torch.where(safe, det, torch.ones_like(det))
    x = (A[..., 1] * B[..., 2] - A[..., 2] * B[..., 1]) / d
    y = (A[..., 2] * B[..., 0] - A[..., 0] * B[..., 2]) / d
    val = L[:, None, :, 0] * x[..., None] + L[:, None, :, 1] * y[..., None] + L[:, None, :, 2]
    feasible = safe & (val >= -0.1).all(-1)
    ymin = torch.where(feasible, y, torch.full_like(y, float("inf"))).amin(1)
    ymax = torch.where(feasible, y, torch.full_like(y, -float("inf"))).amax(1)
    lo = torch.ceil(ymin - 0.1).clamp(0, height).nan_to_num(height, height, height).long()
    hi = torch.floor(ymax + 0.1).clamp(-1, height - 1).nan_to_num(-1, -1, -1).long()
    return lo, hi


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Perspective-correct attribute interpolation: attr (T,V,C) or (V,C) -> (T,H,W,C); 0 on background."""
    T, H, W, _ = rast.shape
    tid = rast[..., 3].reshape(-1).long() - 1
    hit = tid >= 0
    corners = torch.index_select(tri.long(), 0, tid.clamp_min(0)).reshape(T, H * W * 3)  # (T, HW*3)
    C = attr.shape[-1]
    if attr.ndim == 2:
        vals = torch.index_select(attr, 0, corners.reshape(-1))
    else:
        Vn = attr.shape[1]
        flat = corners + (torch.arange(T, device=rast.device) * Vn)[:, None]
        vals = torch.index_select(attr.reshape(-1, C), 0, flat.reshape(-1))
    vals = vals.reshape(T * H * W, 3, C)
    b0 = rast[..., 0].reshape(-1, 1)
    b1 = rast[..., 1].reshape(-1, 1)
    out = vals[:, 0] * b0 + vals[:, 1] * b1 + vals[:, 2] * (1.0 - b0 - b1)
    out = out * hit[:, None].to(out.dtype)
    return out.reshape(T, H, W, C)
