"""Depth -> guides on the GPU for one shot (49 frames of 512x512), the depth model excluded.

Times, on CUDA, from depth + frames already on the GPU (what the depth model leaves there):

* ``depth_to_guides_gpu_ms``: ``build_dwmesh`` + ``render_guides(output="torch")`` along EX-4D's 90-degree
  arc - the guides stay on the GPU for the generator (the target: < 100 ms);
* ``depth_to_guides_numpy_ms``: the same with the guides copied to host numpy arrays (pinned memory);
* ``per_frame_loop_ms``: one build_dwmesh + one render_guides call per frame (numpy out), as the release
  renders (one nvdiffrast call per frame in a Python loop);

per rasterizer backend (nvdiffrast, torch). Medians over --repeats after a warm-up (nvdiffrast's JIT
build stays out). One JSON object on stdout.

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
    ap.add_argument("--device", default="cuda", help="cpu for a logic check of this script")
    ap.add_argument("--profile", action="store_true", help="host (cProfile) and GPU kernel breakdown of one render_guides")
    args = ap.parse_args()

    import torch

    from ex4d.camera import CameraPath, Intrinsics, preset_path
    from ex4d.dwmesh import DWMeshConfig, build_dwmesh
    from ex4d.render import get_rasterizer, render_guides
    from ex4d.synthetic import make_scene

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    scene = make_scene(7, args.size, args.size, args.frames)
    frames, depth = scene.source()
    depth_gpu = torch.from_numpy(depth).to(dev)
    frames_gpu = torch.from_numpy(frames).to(dev)
    path = preset_path("90", args.frames, Intrinsics.from_K(scene.K, args.size, args.size), depth0=depth[0])
    out: dict = {"frames": args.frames, "size": args.size, "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
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
            key = f"{method}/{backend}"
            try:
                rast = get_rasterizer(backend, dev)
                if rast.name != backend:
                    out[f"{key}/error"] = f"unavailable (got {rast.name})"
                    continue

                def whole(output):
                    m = build_dwmesh(depth_gpu, scene.K, cfg)  # noqa: B023
                    return render_guides(m, frames_gpu, path, rasterizer=rast, output=output)  # noqa: B023

                def loop():
                    for t in range(args.frames):
                        m = build_dwmesh(depth_gpu[t : t + 1], scene.K, cfg)  # noqa: B023
                        p1 = CameraPath(path.c2w[t : t + 1], path.K[t : t + 1], path.width, path.height)
                        render_guides(m, frames[t : t + 1], p1, rasterizer=rast)  # noqa: B023

                out[f"{key}/render_guides_ms"] = round(timed(lambda: render_guides(mesh, frames_gpu, path, rasterizer=rast, output="torch"), args.repeats, sync), 2)  # noqa: B023
                out[f"{key}/depth_to_guides_gpu_ms"] = round(timed(lambda: whole("torch"), args.repeats, sync), 2)
                out[f"{key}/depth_to_guides_numpy_ms"] = round(timed(lambda: whole("numpy"), args.repeats, sync), 2)
                if backend == "nvdiffrast" or args.frames <= 49:
                    out[f"{key}/per_frame_loop_ms"] = round(timed(loop, max(1, args.repeats // 2), sync), 2)
                if args.profile and backend == "nvdiffrast":
                    out[f"{key}/profile"] = profile(lambda: whole("torch"), sync)
            except Exception as e:  # noqa: BLE001
                out[f"{key}/error"] = f"{type(e).__name__}: {e}"[:300]
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
