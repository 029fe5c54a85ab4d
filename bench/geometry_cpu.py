"""CPU benchmark: depth -> DW-mesh -> guides for a 49-frame 512x512 clip with the torch rasterizer.

    .venv/bin/python bench/geometry_cpu.py [--frames 49] [--size 512] [--threads 2] [--path 90] [--method ours]

The clip is a synthetic scene (ex4d/synthetic.py, seed 7) rendered once by ray casting (not timed);
timed: ``build_dwmesh`` and ``render_guides`` along the path (EX-4D's 90 degree arc by default).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--path", default="90", help="camera preset (default: EX-4D's 90 degree arc)")
    ap.add_argument("--method", default="ours", choices=("ours", "ex4d", "torn"))
    args = ap.parse_args()

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ex4d.camera import Intrinsics, preset_path
    from ex4d.dwmesh import DWMeshConfig, build_dwmesh
    from ex4d.render import render_guides
    from ex4d.synthetic import make_scene

    t = time.perf_counter()
    scene = make_scene(7, args.size, args.size, args.frames)
    frames, depth = scene.source()
    t_scene = time.perf_counter() - t
    path = preset_path(args.path, args.frames, Intrinsics.from_K(scene.K, args.size, args.size), depth0=depth[0])

    c0 = time.process_time()
    t0 = time.perf_counter()
    mesh = build_dwmesh(torch.from_numpy(depth), scene.K, DWMeshConfig(method=args.method))
    t1 = time.perf_counter()
    c1 = time.process_time()
    guides = render_guides(mesh, frames, path, rasterizer="torch")
    t2 = time.perf_counter()
    c2 = time.process_time()
    print(json.dumps({
        "frames": args.frames, "size": args.size, "faces": int(mesh.faces.shape[0]), "method": args.method,
        "path": args.path, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "build_s": round(t1 - t0, 2), "render_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
        "cpu_s": {"build": round(c1 - c0, 2), "render": round(c2 - c1, 2), "total": round(c2 - c0, 2)},
        "per_frame_ms": round(1000 * (t2 - t0) / args.frames, 1), "mask_mean": round(float(guides.mask.mean()), 4),
        "scene_raycast_s_untimed": round(t_scene, 1), "torch": torch.__version__, "python": platform.python_version(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
