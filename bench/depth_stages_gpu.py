"""Where DepthCrafter's time goes at EX-4D's shape (49 frames of 512x512), and what cuDNN settings change (GPU).

Full-size random weights (the published configs, fp16, release settings: 5 steps, one 110-frame window).
Times each stage of one ``predict`` (CLIP embeddings, VAE encode, the denoising loop, VAE decode; CUDA
synchronised around each) for: the default settings; cuDNN's autotuner on; autotuner + channels-last
convolution weights (UNet and VAE); ``settings.compile`` (the UNet and the temporal decoder through
torch.compile). Reports seconds per stage (best of ``--repeat``) and the largest
disparity difference against the default run.

    python bench/depth_stages_gpu.py --out $OUT/depth_stages.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.depth_gpu import build, clip  # noqa: E402
from bench.vae_gpu import sync  # noqa: E402

STAGES = ("_encode_clip", "_encode_vae", "_denoise", "_decode")


def instrument(model, torch, times: dict):
    for name in STAGES:
        inner = getattr(type(model), name)

        def timed(*a, _inner=inner, _name=name, **k):
            sync()
            t = time.perf_counter()
            out = _inner(model, *a, **k)
            sync()
            times[_name] = times.get(_name, 0.0) + time.perf_counter() - t
            return out

        setattr(model, name, timed)


def main():
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU (logic check)")
    p.add_argument("--variants", default="default,cudnn_benchmark,cudnn_benchmark+channels_last,compiled")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "depth_stages.json"))
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    model = build("depthcrafter", args.tiny, device, torch.float32 if args.tiny else torch.float16)
    frames = clip(args.frames, args.size)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "shape": [args.frames, args.size, args.size], "variants": {}}
    reference = None

    def conv_weights(memory_format):
        for module in (model.unet, model.vae):
            for m in module.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.data = m.weight.data.contiguous(memory_format=memory_format)

    variants = (("default", False, False, False), ("cudnn_benchmark", True, False, False),
                ("cudnn_benchmark+channels_last", True, True, False), ("compiled", False, False, True))
    for name, benchmark, channels_last, compiled in variants:
        if name not in args.variants.split(","):
            continue
        torch.backends.cudnn.benchmark = benchmark
        conv_weights(torch.channels_last if channels_last else torch.contiguous_format)
        # settings.compile: the UNet and the decoder through torch.compile
        model.settings = dataclasses.replace(model.settings, compile=compiled)
        try:
            t = time.perf_counter()
            model.predict(frames)  # warm-up: kernels, autotuning, compilation
            warmup_s = time.perf_counter() - t
            best, best_stages, depth = None, None, None
            for _ in range(args.repeat):
                stages: dict = {}
                instrument(model, torch, stages)
                sync()
                t = time.perf_counter()
                depth = model.predict(frames).depth
                sync()
                total = time.perf_counter() - t
                for s in STAGES:
                    model.__dict__.pop(s, None)
                if best is None or total < best:
                    best, best_stages = total, stages
            row = {"seconds": round(best, 3), "stages": {k.strip("_"): round(v, 3) for k, v in best_stages.items()},
                   "warmup_s": round(warmup_s, 1)}
            if reference is None:
                reference = depth
            row["max_rel_diff_vs_default"] = float(np.abs(depth - reference).max() / max(np.abs(reference).max(), 1e-12))
        except Exception as e:  # noqa: BLE001
            row = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        report["variants"][name] = row
        print(name, json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    main()
