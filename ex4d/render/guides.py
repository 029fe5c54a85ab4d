"""Guide rendering: the DW-mesh of frame i seen by camera i of a CameraPath -> colour + validity mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import Cancelled, InputError
from .projection import FAR, NEAR, mvp_matrices


@dataclass
class Guides:
    """color uint8 (T,H,W,3) (already multiplied by the mask), mask bool (T,H,W), depth float32 (T,H,W)
    = z-depth of the rendered surface in the target camera (0 where nothing is rendered).

    numpy arrays by default; torch tensors on the render device with ``render_guides(..., output="torch")``
    (what a generator on the same GPU consumes without a host round trip)."""

    color: np.ndarray
    mask: np.ndarray
    depth: np.ndarray

    def numpy(self) -> "Guides":
        """The same guides as numpy arrays (a no-op when they already are)."""
        return Guides(*(_to_numpy(x) for x in (self.color, self.mask, self.depth)))


def _to_numpy(x) -> np.ndarray:
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    if x.device.type != "cuda":
        return x.numpy()
    # Device -> pinned host memory is several times faster than -> pageable (the old path's 177 ms
    # for one shot's guides); the pinned block returns to torch's host cache when the array dies.
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return host.numpy()


def _is_source_camera(c2w: np.ndarray, K: np.ndarray, K_src: np.ndarray, size, src_size) -> bool:
    return tuple(size) == tuple(src_size) and np.allclose(c2w, np.eye(4), atol=1e-9) and np.allclose(K, K_src, atol=1e-9)


def _sample_uv(frames: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of frames (t,H,W,3) float at uv (t,h,w,2) (u = x/W, v = 1 - y/H) -> (t,h,w,3)."""
    grid = torch.stack([uv[..., 0] * 2.0 - 1.0, (1.0 - uv[..., 1]) * 2.0 - 1.0], dim=-1)
    out = torch.nn.functional.grid_sample(frames.permute(0, 3, 1, 2), grid, mode="bilinear",
                                          padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)


def render_guides(mesh, frames, path, rasterizer="auto", device=None, progress=None, cancel=None,
                  chunk_frames: int | None = None, output: str = "numpy") -> Guides:
    """Render frame i of ``mesh`` with camera i of ``path`` (an ``ex4d.camera.CameraPath``).

    Colours come from source frame i (bilinear through the UVs, or the vertex colours for the
    release's recipe), the mask follows the mesh's method (see ex4d/dwmesh.py). A camera equal to the
    source camera returns the source frame with a full mask, as the release does for frame 0.
    ``frames``: (T,H,W,3) uint8, numpy or a torch tensor (already on the device saves an upload).
    ``output``: "numpy" (default) or "torch" (tensors left on the render device).
    """
    from . import get_rasterizer

    if output not in ("numpy", "torch"):
        raise InputError(f"output must be 'numpy' or 'torch', got {output!r}")
    if not isinstance(frames, torch.Tensor):
        frames = np.asarray(frames)
    T = mesh.num_frames
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != T:
        raise InputError(f"frames must be (T={T},H,W,3) uint8, got shape {frames.shape}")
    if tuple(frames.shape[1:3]) != tuple(mesh.size):
        raise InputError(f"frames are {frames.shape[2]}x{frames.shape[1]} but the mesh was built at {mesh.size[1]}x{mesh.size[0]}")
    path = path.take(T)
    H, W = int(path.height), int(path.width)
    rz = rasterizer if not isinstance(rasterizer, str) else get_rasterizer(rasterizer, device)
    dev = getattr(rz, "device", torch.device("cpu"))
    if chunk_frames is None:
        chunk_frames = T if rz.name == "nvdiffrast" else 4
    near, far = mesh.clip_planes if hasattr(mesh, "clip_planes") else (NEAR, FAR)
    mvp = torch.as_tensor(mvp_matrices(path, near, far), dtype=torch.float64, device=dev)
    faces = mesh.faces.to(dev)
    cfg = mesh.config
    # Everything stays on the render device until the end: one copy per output, no per-chunk syncs.
    frames_dev = torch.as_tensor(frames, device=dev)
    color = torch.empty((T, H, W, 3), dtype=torch.uint8, device=dev)
    mask = torch.empty((T, H, W), dtype=torch.bool, device=dev)
    depth = torch.empty((T, H, W), dtype=torch.float32, device=dev)
    for t0 in range(0, T, chunk_frames):
        if cancel is not None and cancel.is_set():
            raise Cancelled("guide rendering cancelled")
        t1 = min(T, t0 + chunk_frames)
        verts = mesh.vertices[t0:t1].to(dev).double()
        pos = (torch.cat([verts, torch.ones_like(verts[..., :1])], -1) @ mvp[t0:t1].transpose(1, 2)).float()
        if cfg.method == "torn":
            rast = _rasterize_subsets(rz, pos, faces, mesh.face_valid[t0:t1].to(dev), (H, W))
        else:
            rast = rz.rasterize(pos, faces, (H, W))
        tid = rast[..., 3].long() - 1
        hit = tid >= 0
        src = frames_dev[t0:t1].float()
        n = t1 - t0
        # One interpolation for everything per-vertex: eye depth, alpha, then uv or vertex colours.
        parts = [pos[..., 3:4], mesh.vertex_alpha[t0:t1].to(dev)[..., None]]
        if cfg.sampling == "vertex":
            parts.append(mesh.vertex_colors(src))
        else:
            parts.append(mesh.uv.to(dev)[None].expand(n, -1, -1))
        vals = rz.interpolate(torch.cat(parts, -1).contiguous(), rast, faces)
        z, alpha = vals[..., 0], vals[..., 1]
        col = vals[..., 2:] if cfg.sampling == "vertex" else _sample_uv(src, vals[..., 2:4])
        if cfg.method in ("ex4d", "torn"):
            m = hit & (alpha > cfg.alpha_threshold)
        else:
            fv = mesh.face_valid[t0:t1].to(dev)
            m = hit & torch.gather(fv, 1, tid.clamp_min(0).reshape(n, -1)).reshape(tid.shape)
        col = (col * m[..., None]).round().clamp(0, 255).to(torch.uint8)
        color[t0:t1], mask[t0:t1], depth[t0:t1] = col, m, z * hit
        if progress is not None:
            progress("render", t1, T)
    # The source camera itself sees everything the source frame shows.
    for t in range(T):
        if _is_source_camera(path.c2w[t], path.K[t], mesh.K[t], (H, W), mesh.size):
            color[t] = frames_dev[t]
            mask[t] = True
            depth[t] = -mesh.vertices[t, : mesh.num_grid_vertices, 2].reshape(mesh.size).to(dev)
    guides = Guides(color=color, mask=mask, depth=depth)
    return guides if output == "torch" else guides.numpy()


def _rasterize_subsets(rz, pos, faces, face_valid, resolution):
    """Per frame, rasterize only the valid faces (the torn-mesh ablation) and map ids back."""
    out = []
    for i in range(pos.shape[0]):
        keep = torch.nonzero(face_valid[i]).squeeze(1)
        r = rz.rasterize(pos[i : i + 1], faces[keep].contiguous(), resolution)
        tid = r[..., 3].long() - 1
        orig = torch.where(tid >= 0, keep[tid.clamp_min(0)] + 1, torch.zeros_like(tid))
        r = r.clone()
        r[..., 3] = orig.float()
        out.append(r)
    return torch.cat(out, 0)
