"""Quality of the guides on synthetic scenes with exact ground truth.

For a scene and a camera path, each method renders guides (colour + mask) from the exact source
video and depth; the ground truth is the exact target view and the exact "visible from the source"
map (ex4d/synthetic.py). Measures, pooled over the frames of the path after frame 0 (frame 0 is the
source camera itself):

* precision - valid guide pixels whose true surface is visible from the source,
* recall - truly visible pixels the guide marks valid,
* PSNR (dB) of the guide's colour against the true target view on the valid pixels.

Methods: ``ours`` (DW-mesh, default method), ``ex4d`` (the release's recipe), ``torn`` (the
release's ablation: invalid faces deleted) and ``splat`` (point-cloud baseline: every source pixel
forward-splatted to its nearest target pixel with a z-buffer, mask = hit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METHODS = ("ours", "ex4d", "torn", "splat")
FAMILIES = ("orbit", "ex4d")


@dataclass
class Score:
    precision: float
    recall: float
    psnr: float
    valid: int  # valid guide pixels
    visible: int  # truly visible pixels
    true_pos: int
    sq_err: float  # summed squared colour error over valid pixels (for pooling PSNR)

    @staticmethod
    def pool(scores: list["Score"]) -> "Score":
        v = sum(s.valid for s in scores)
        g = sum(s.visible for s in scores)
        tp = sum(s.true_pos for s in scores)
        se = sum(s.sq_err for s in scores)
        return Score(tp / max(v, 1), tp / max(g, 1), _psnr(se, v), v, g, tp, se)


def _psnr(sq_err: float, n: int) -> float:
    if n == 0:
        return float("nan")
    mse = sq_err / (3 * n)
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def score(color: np.ndarray, mask: np.ndarray, gt_color: np.ndarray, gt_visible: np.ndarray) -> Score:
    mask, gt_visible = mask.astype(bool), gt_visible.astype(bool)
    tp = int((mask & gt_visible).sum())
    v, g = int(mask.sum()), int(gt_visible.sum())
    diff = color.astype(np.float64) - gt_color.astype(np.float64)
    se = float((diff[mask] ** 2).sum())
    return Score(tp / max(v, 1), tp / max(g, 1), _psnr(se, v), v, g, tp, se)


def splat_guides(frames: np.ndarray, depth: np.ndarray, K: np.ndarray, path):
    """Point-cloud baseline: forward-splat each source pixel to the nearest target pixel, z-buffered."""
    import torch

    from .dwmesh import unproject
    from .render.guides import Guides

    T, H, W = depth.shape
    Ht, Wt = int(path.height), int(path.width)
    d = torch.as_tensor(depth, dtype=torch.float64)
    Kt = torch.as_tensor(np.broadcast_to(K, (T, 3, 3)).copy())
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij")
    pts = unproject(d, Kt, xs, ys).reshape(T, -1, 3)
    color = np.zeros((T, Ht, Wt, 3), np.uint8)
    mask = np.zeros((T, Ht, Wt), bool)
    zmap = np.zeros((T, Ht, Wt), np.float32)
    w2c = torch.as_tensor(np.linalg.inv(path.c2w[:T]))
    for t in range(T):
        pc = pts[t] @ w2c[t, :3, :3].T + w2c[t, :3, 3]
        z = -pc[:, 2]
        Kc = path.K[t]
        x = Kc[0, 2] + Kc[0, 0] * pc[:, 0] / z
        y = Kc[1, 2] - Kc[1, 1] * pc[:, 1] / z
        col, row = torch.floor(x).long(), torch.floor(y).long()
        ok = (z > 1e-3) & (z < 1e3) & (col >= 0) & (col < Wt) & (row >= 0) & (row < Ht) & torch.isfinite(z)
        src = torch.nonzero(ok).squeeze(1)
        pix = row[src] * Wt + col[src]
        key = (z[src].float().view(torch.int32).long() << 32) | src
        zbuf = torch.full((Ht * Wt,), torch.iinfo(torch.int64).max, dtype=torch.int64)
        zbuf.scatter_reduce_(0, pix, key, reduce="amin")
        hit = zbuf != torch.iinfo(torch.int64).max
        win = (zbuf[hit] & 0xFFFFFFFF).numpy()
        flat_c = color[t].reshape(-1, 3)
        flat_c[hit.numpy()] = frames[t].reshape(-1, 3)[win]
        mask[t] = hit.numpy().reshape(Ht, Wt)
        zmap[t].reshape(-1)[hit.numpy()] = z[torch.as_tensor(win)].numpy()
    return Guides(color=color, mask=mask, depth=zmap)


def camera_path(family: str, angle: float, scene, depth0: np.ndarray, num_frames: int):
    """``orbit``: yaw around the median-depth pivot; ``ex4d``: the release's arc (pivot = min depth + 0.15)."""
    from .camera import Intrinsics, preset_path

    intr = Intrinsics.from_K(scene.K, scene.width, scene.height)
    if family == "orbit":
        return preset_path("orbit_right", num_frames, intr, depth0=depth0, angle_deg=angle, pivot_mode="median")
    if family == "ex4d":
        return preset_path(str(int(angle)), num_frames, intr, depth0=depth0)
    raise ValueError(family)


def render_method(method: str, frames, depth, K, path, rasterizer="torch", overrides: dict | None = None):
    if method == "splat":
        return splat_guides(frames, depth, K, path)
    import torch

    from .dwmesh import DWMeshConfig, build_dwmesh
    from .render import render_guides

    mesh = build_dwmesh(torch.from_numpy(depth), K, DWMeshConfig(method=method, **(overrides or {})))
    return render_guides(mesh, frames, path, rasterizer=rasterizer)


def evaluate(seeds=(0, 1, 2, 3), angles=(30, 60, 90), families=FAMILIES, methods=METHODS, width=128, height=96,
             num_frames=5, rasterizer="torch", progress=None, overrides: dict | None = None) -> list[dict]:
    """Score every (scene, family, angle, method); returns one row per combination (plus pooled rows)."""
    from .synthetic import make_scene

    rows = []
    total = len(seeds) * len(families) * len(angles)
    step = 0
    for seed in seeds:
        scene = make_scene(seed, width, height, num_frames)
        frames, depth = scene.source()
        for family in families:
            for angle in angles:
                path = camera_path(family, angle, scene, depth[0], num_frames)
                gt_color, gt_vis, _ = scene.target_views(path)
                for method in methods:
                    g = render_method(method, frames, depth, scene.K, path, rasterizer,
                                      overrides if method == "ours" else None)
                    s = score(g.color[1:], g.mask[1:], gt_color[1:], gt_vis[1:])
                    rows.append({"seed": seed, "family": family, "angle": angle, "method": method, "score": s})
                step += 1
                if progress is not None:
                    progress("eval", step, total)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Pool rows over scenes: one row per (family, angle, method), plus the worst per-scene precision."""
    out = []
    keys = sorted({(r["family"], r["angle"], r["method"]) for r in rows},
                  key=lambda k: (FAMILIES.index(k[0]) if k[0] in FAMILIES else 9, k[1], METHODS.index(k[2]) if k[2] in METHODS else 9))
    for fam, ang, meth in keys:
        sel = [r["score"] for r in rows if (r["family"], r["angle"], r["method"]) == (fam, ang, meth)]
        pooled = Score.pool(sel)
        out.append({"family": fam, "angle": ang, "method": meth, "score": pooled,
                    "min_precision": min(s.precision for s in sel), "scenes": len(sel)})
    return out


def format_table(summary: list[dict]) -> str:
    lines = ["| path | angle | method | PSNR valid (dB) | precision | min precision (scene) | recall |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in summary:
        s = r["score"]
        lines.append(f"| {r['family']} | {r['angle']} | {r['method']} | {s.psnr:.2f} | {s.precision:.4f} | "
                     f"{r['min_precision']:.4f} | {s.recall:.4f} |")
    return "\n".join(lines)
