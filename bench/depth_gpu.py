"""Speed and peak memory of each learned depth model at EX-4D's shape (49 frames of 512x512).

Builds every model with FULL-SIZE random weights from the published configs written in code (no
downloads, no weight files) directly on the device, runs one short warm-up clip, then times
``predict`` on the clip and reports ms/frame and peak GPU memory as JSON (stdout and --out). Each model
runs in its own try/except and the report is rewritten after each, so a failure or time-out keeps the
earlier numbers.

    python bench/depth_gpu.py --out $OUT/depth_gpu.json              # GPU, fp16, all three models
    python bench/depth_gpu.py --tiny --device cpu                    # smoke test: tiny configs, seconds

Models: depth-anything-v2-small (per frame, batch 8, 518 input), depthcrafter (release settings:
5 steps, window 110, overlap 25, guidance 1.0; 512x512 is already a multiple of 64),
video-depth-anything-small (518 input, 32-frame windows: 49 frames -> 3 windows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODELS = ("depth-anything-v2-small", "depthcrafter", "video-depth-anything-small")


def build(name: str, tiny: bool, device, dtype):
    if name == "depth-anything-v2-small":
        from ex4d.depth.models.depth_anything_v2 import DepthAnythingV2

        return DepthAnythingV2.build_random("tiny" if tiny else "small", device=device, dtype=dtype)
    if name == "depthcrafter":
        from ex4d.depth.models.depthcrafter import DepthCrafter, published_configs, tiny_configs

        return DepthCrafter.build_random(tiny_configs() if tiny else published_configs(), device=device, dtype=dtype)
    from ex4d.depth.models import video_depth_anything as vda

    settings = vda.VideoDepthAnythingSettings(input_size=56 if tiny else 518)
    return vda.VideoDepthAnything.build_random(vda.TINY if tiny else vda.SMALL, device=device, dtype=dtype,
                                               settings=settings)


def count_parameters(model) -> int:
    modules = [getattr(model, a) for a in ("model", "unet", "vae", "image_encoder", "network") if hasattr(model, a)]
    return int(sum(p.numel() for m in modules for p in m.parameters()))


def clip(frames: int, size: int, seed: int = 0) -> np.ndarray:
    """A deterministic textured clip (content does not change the cost of these models)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = ((xx + yy) % 256).astype(np.int32)
    return np.stack([np.clip(np.stack([base, (base + 7 * t) % 256, 255 - base], -1) + rng.randint(0, 16, (size, size, 3)),
                             0, 255) for t in range(frames)]).astype(np.uint8)


def run_one(name, args, device, dtype, report):
    import torch

    cuda = device.type == "cuda"
    entry = {"model": name}
    report["models"].append(entry)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build(name, args.tiny, device, dtype)
    if cuda:
        torch.cuda.synchronize()
    entry["build_s"] = round(time.perf_counter() - t0, 2)
    entry["parameters"] = count_parameters(model)
    entry["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3) if cuda else None

    model.predict(clip(args.warmup_frames, args.size))  # kernels, autotuning, allocator
    frames = clip(args.frames, args.size)
    times = []
    for _ in range(args.repeat):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        pred = model.predict(frames)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    entry.update({
        "frames": args.frames, "size": [args.size, args.size], "repeat": args.repeat,
        "seconds": round(best, 3), "ms_per_frame": round(1000 * best / args.frames, 2),
        "all_seconds": [round(t, 3) for t in times],
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "working_size": pred.info.get("working_size"),
        "depth_finite_positive": bool(np.isfinite(pred.depth).all() and (pred.depth > 0).all()),
        "settings": {k: v for k, v in vars(getattr(model, "settings", object())).items()
                     if isinstance(v, (int, float, bool, str, type(None)))},
    })
    del model
    if cuda:
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs (smoke test, CPU friendly)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="fp16 / bf16 / fp32 (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--frames", type=int, default=None, help="clip length (default 49; --tiny: 5)")
    parser.add_argument("--size", type=int, default=None, help="square frame size (default 512; --tiny: 64)")
    parser.add_argument("--warmup-frames", type=int, default=None, help="warm-up clip length (default 8; --tiny: 3)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    args.frames = args.frames or (5 if args.tiny else 49)
    args.size = args.size or (64 if args.tiny else 512)
    args.warmup_frames = args.warmup_frames or (3 if args.tiny else 8)

    import torch

    from ex4d.depth.models.base import resolve_device, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    report = {
        "bench": "depth_gpu", "tiny": args.tiny, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "models": [],
    }
    failed = False
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            parser.error(f"unknown model {name}")
        try:
            run_one(name, args, device, dtype, report)
        except Exception as e:  # keep the other models' numbers
            failed = True
            report["models"][-1]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            report["models"][-1]["traceback"] = traceback.format_exc(limit=4)
        text = json.dumps(report, indent=2)
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, args.out)
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
