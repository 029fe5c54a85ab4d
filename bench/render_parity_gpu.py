"""GPU check of the nvdiffrast backend against the torch rasterizer (run on a CUDA machine).

    python bench/render_parity_gpu.py [--frames 49] [--size 512] [--repeats 5]

Needs torch with CUDA and ``diffrp-nvdiffrast`` (nvcc + ninja for its first JIT build). Builds the
DW-mesh of a 49-frame 512x512 synthetic clip (522k triangles), renders guides along EX-4D's 90
degree arc with both backends on the GPU and prints one JSON object:

* mask agreement (% of pixels where the two masks agree) and colour PSNR where both are valid,
* nvdiffrast timings: ONE instanced rasterize+interpolate call over all frames vs a per-frame loop
  (what the release does), and the torch backend on CUDA for the same frames,
* full ``render_guides`` time per backend.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn, repeats):
    import torch

    fn()  # warm-up (and JIT build for nvdiffrast)
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--method", default="ours", choices=("ours", "ex4d"))
    args = ap.parse_args()

    import numpy as np
    import torch

    from ex4d.camera import Intrinsics, preset_path
    from ex4d.dwmesh import DWMeshConfig, build_dwmesh
    from ex4d.render import get_rasterizer, mvp_matrices, render_guides
    from ex4d.synthetic import make_scene

    out: dict = {"frames": args.frames, "size": args.size, "method": args.method}
    if not torch.cuda.is_available():
        print(json.dumps({**out, "error": "no CUDA device"}))
        return 1
    dev = torch.device("cuda")
    out["gpu"] = torch.cuda.get_device_name(0)
    out["torch"] = torch.__version__
    scene = make_scene(7, args.size, args.size, args.frames)
    frames, depth = scene.source()
    path = preset_path("90", args.frames, Intrinsics.from_K(scene.K, args.size, args.size), depth0=depth[0])
    mesh = build_dwmesh(torch.from_numpy(depth).to(dev), scene.K, DWMeshConfig(method=args.method))
    out["faces"] = int(mesh.faces.shape[0])

    nv = get_rasterizer("nvdiffrast", dev)
    out["nvdiffrast_backend"] = nv.name
    if nv.name != "nvdiffrast":
        print(json.dumps({**out, "error": "nvdiffrast unavailable (see the warning above)"}))
        return 1
    tr = get_rasterizer("torch", dev)

    # Guides from both backends.
    t = time.perf_counter()
    g_nv = render_guides(mesh, frames, path, rasterizer=nv)
    torch.cuda.synchronize()
    out["render_guides_nvdiffrast_s_first"] = round(time.perf_counter() - t, 3)
    out["render_guides_nvdiffrast_s"] = round(_timed(lambda: render_guides(mesh, frames, path, rasterizer=nv), args.repeats), 4)
    out["render_guides_torch_cuda_s"] = round(_timed(lambda: render_guides(mesh, frames, path, rasterizer=tr), 1), 4)
    g_tr = render_guides(mesh, frames, path, rasterizer=tr)
    agree = (g_nv.mask == g_tr.mask).mean()
    both = g_nv.mask & g_tr.mask
    diff = g_nv.color.astype(np.float64) - g_tr.color.astype(np.float64)
    mse = (diff[both] ** 2).mean() if both.any() else float("nan")
    out["mask_agreement_pct"] = round(100.0 * float(agree), 4)
    out["mask_valid_pct"] = {"nvdiffrast": round(100.0 * float(g_nv.mask.mean()), 3), "torch": round(100.0 * float(g_tr.mask.mean()), 3)}
    out["color_psnr_both_valid_db"] = round(10 * math.log10(255.0**2 / mse), 2) if mse > 0 else float("inf")

    # Raw rasterize + interpolate: one instanced call vs a per-frame loop, and the torch backend.
    mvp = torch.as_tensor(mvp_matrices(path), dtype=torch.float32, device=dev)
    v = mesh.vertices.to(dev)
    pos = (torch.cat([v, torch.ones_like(v[..., :1])], -1) @ mvp.transpose(1, 2)).contiguous()
    tri = mesh.faces.to(dev)
    uv = mesh.uv.to(dev)
    res = (args.size, args.size)

    def instanced():
        r = nv.rasterize(pos, tri, res)
        return nv.interpolate(uv, r, tri)

    def loop():
        for i in range(pos.shape[0]):
            r = nv.rasterize(pos[i : i + 1], tri, res)
            nv.interpolate(uv, r, tri)

    def torch_cuda():
        r = tr.rasterize(pos, tri, res)
        return tr.interpolate(uv, r, tri)

    out["nvdiffrast_instanced_ms"] = round(1000 * _timed(instanced, args.repeats), 2)
    out["nvdiffrast_per_frame_loop_ms"] = round(1000 * _timed(loop, args.repeats), 2)
    out["torch_cuda_rasterize_interpolate_ms"] = round(1000 * _timed(torch_cuda, 1), 2)
    r_nv, r_tr = nv.rasterize(pos, tri, res), tr.rasterize(pos, tri, res)
    out["triangle_id_agreement_pct"] = round(100.0 * float((r_nv[..., 3] == r_tr[..., 3]).float().mean()), 4)
    out["coverage_agreement_pct"] = round(100.0 * float(((r_nv[..., 3] > 0) == (r_tr[..., 3] > 0)).float().mean()), 4)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
