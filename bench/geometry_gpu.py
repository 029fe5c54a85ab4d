"""Depth -> guides on the GPU for one shot (49 frames of 512x512), the depth model excluded.

Times, on CUDA: ``build_dwmesh`` from a depth tensor already on the GPU, then ``render_guides`` along
EX-4D's 90-degree arc with each rasterizer backend (nvdiffrast, torch), and the sum (target < 100 ms).
Medians over --repeats after a warm-up (nvdiffrast's JIT build stays out). One JSON object on stdout.

    python bench/geometry_gpu.py --out $OUT/geometry_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def timed(fn, repeats, sync):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def profile(fn, sync) -> dict:
    """Top host functions (cumulative) and GPU kernels of one call."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    pr = cProfile.Profile()
    pr.enable()
    fn()
    sync()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(25)
    host = [line for line in buf.getvalue().splitlines() if "/ex4d/" in line or "{" in line][:25]
    with tprof(activities=[ProfilerActivity.CUDA]) as tp:
        fn()
        sync()
    ka = tp.key_averages()
    key = "self_device_time_total" if hasattr(next(iter(ka)), "self_device_time_total") else "self_cuda_time_total"
    rows = sorted(ka, key=lambda e: getattr(e, key), reverse=True)[:12]
    gpu = [f"{getattr(e, key) / 1000:8.2f} ms {e.count:4d}x {e.key[:90]}" for e in rows]
    return {"host_cumulative": host, "gpu_total_ms": round(sum(getattr(e, key) for e in ka) / 1000, 2), "gpu_top": gpu}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    ap.add_argument("--profile", action="store_true", help="host (cProfile) and GPU kernel breakdown of one render_guides")
    args = ap.parse_args()

    import torch

    from ex4d.camera import Intrinsics, preset_path
    from ex4d.dwmesh import DWMeshConfig, build_dwmesh
    from ex4d.render import get_rasterizer, render_guides
    from ex4d.synthetic import make_scene

    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    scene = make_scene(7, args.size, args.size, args.frames)
    frames, depth = scene.source()
    depth_gpu = torch.from_numpy(depth).to(dev)
    path = preset_path("90", args.frames, Intrinsics.from_K(scene.K, args.size, args.size), depth0=depth[0])
    out: dict = {"frames": args.frames, "size": args.size, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for method in ("ours", "ex4d"):
        cfg = DWMeshConfig(method=method)
        try:
            mesh = build_dwmesh(depth_gpu, scene.K, cfg)
            out[f"{method}/faces"] = int(mesh.faces.shape[0])
            out[f"{method}/build_dwmesh_ms"] = round(timed(lambda: build_dwmesh(depth_gpu, scene.K, cfg), args.repeats, sync), 2)
        except Exception as e:  # noqa: BLE001
            out[f"{method}/error"] = f"{type(e).__name__}: {e}"[:300]
            continue
        for backend in ("nvdiffrast", "torch"):
            try:
                rast = get_rasterizer(backend, dev)
                if rast.name != backend:
                    out[f"{method}/{backend}/error"] = f"unavailable (got {rast.name})"
                    continue
                ms = timed(lambda: render_guides(mesh, frames, path, rasterizer=rast), args.repeats, sync)
                out[f"{method}/{backend}/render_guides_ms"] = round(ms, 2)
                out[f"{method}/{backend}/depth_to_guides_ms"] = round(ms + out[f"{method}/build_dwmesh_ms"], 2)
                if args.profile and backend == "nvdiffrast":
                    out[f"{method}/{backend}/profile"] = profile(lambda: render_guides(mesh, frames, path, rasterizer=rast), sync)
            except Exception as e:  # noqa: BLE001
                out[f"{method}/{backend}/error"] = f"{type(e).__name__}: {e}"[:300]
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
