"""One complete EX-4D generation (25 steps, CFG 5, 512x512x49) through ex4d.generate's pipeline, per memory mode.

Builds the FULL Wan2.1-I2V-14B-480P architecture (DiT 16.4 B, umT5-XXL, CLIP ViT-H/14, Wan VAE) plus the
EX-4D adapter (peft LoRA r16 + CamVidEncoder) with seeded random weights, initialised directly on the GPU
in bf16 (no downloads, no host copy), then runs Ex4dGenerator.generate on a synthetic guide clip (a
moving hole pattern, frame 0 fully valid) and prints one JSON object: seconds per denoising step, stage
times, total seconds and peak GPU memory.

    python bench/generate_gpu.py --mode resident          # H100 80 GB
    python bench/generate_gpu.py --mode fp8
    python bench/generate_gpu.py --mode offload --vram-limit 0    # stream every layer (memory floor)
    python bench/generate_gpu.py --tiny --device cpu --steps 2    # logic check on a CPU, seconds

Needs on the GPU machine: diffsynth 2.1.12 (+ its wheels, see DEVICE.md), peft, transformers (tokenizers).
The prompt goes through a tiny offline tokenizer (the real umT5 tokenizer is a weights file); token ids
are valid for the full vocabulary, sequence length 512 as in Wan.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GiB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="resident", choices=("resident", "offload", "fp8"), help="memory mode")
    p.add_argument("--tiny", action="store_true", help="tiny random model instead of the full I2V-14B (CPU check)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--size", default="512x512", help="WxH (multiples of 16)")
    p.add_argument("--vram-limit", type=float, default=0.0,
                   help="offload mode: GiB of layers kept on the GPU (0 = stream all; default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="also write the JSON here")
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    if w % 16 or h % 16 or args.frames < 1 or args.steps < 1:
        p.error("--size must be multiples of 16; --frames and --steps at least 1")
    args.width, args.height = w, h
    return args


def synthetic_guides(frames: int, height: int, width: int, seed: int = 0):
    """A smooth colour clip with a hole that sweeps in from the right (like an orbit's disocclusion)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    color = np.empty((frames, height, width, 3), np.uint8)
    mask = np.ones((frames, height, width), bool)
    for t in range(frames):
        phase = t / max(1, frames - 1)
        base = np.stack([128 + 100 * np.sin(xx / 37 + 3 * phase), 128 + 100 * np.cos(yy / 29), 128 + 60 * np.sin((xx + yy) / 50)], -1)
        color[t] = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
        if t:
            mask[t, :, int(width * (1 - 0.35 * phase)):] = False
            mask[t, int(height * 0.4):int(height * 0.55), int(width * 0.3):int(width * (0.3 + 0.2 * phase))] = False
    color[~mask] = 0
    return color, mask


def build(args):
    import torch

    from ex4d.generate.architectures import build_random_components, tiny_tokenizer
    from ex4d.generate.generator import Ex4dGenerator
    from ex4d.generate.pipeline import assemble_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    arch = "tiny" if args.tiny else "i2v-14b"
    text_len = 32 if args.tiny else 512
    components = build_random_components(arch, seed=args.seed, device=device, dtype=dtype,
                                         tokenizer=tiny_tokenizer(seq_len=text_len))
    pipe = assemble_pipeline(components, device=device, dtype=dtype, adapter_state="random", memory_mode=args.mode,
                             vram_limit_gb=args.vram_limit if args.mode == "offload" else None)
    return Ex4dGenerator(pipe, name=arch), device


def main(argv=None) -> int:
    args = parse_args(argv)
    report: dict = {"mode": args.mode, "arch": "tiny" if args.tiny else "i2v-14b", "steps": args.steps, "cfg": args.cfg,
                    "frames": args.frames, "size": f"{args.width}x{args.height}"}
    try:
        import torch

        t0 = time.perf_counter()
        generator, device = build(args)
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            report["device_name"] = torch.cuda.get_device_name(device)
            report["weights_gib_after_build"] = round(torch.cuda.memory_allocated(device) / GiB, 2)
            torch.cuda.reset_peak_memory_stats(device)
        report["device"] = str(device)
        report["build_seconds"] = round(time.perf_counter() - t0, 2)
        from ex4d.generate.memory import weight_bytes

        report["weights_gib"] = {k: round(v / GiB, 3) for k, v in weight_bytes(generator.pipe).items()}

        color, mask = synthetic_guides(args.frames, args.height, args.width, args.seed)
        marks: list[tuple[str, float]] = []

        def progress(stage, step, total, preview=None):
            if cuda:
                torch.cuda.synchronize()
            marks.append((stage, time.perf_counter()))

        t1 = time.perf_counter()
        out = generator.generate(color, mask, seed=args.seed, steps=args.steps, cfg=args.cfg, progress=progress)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        denoise = [t for s, t in marks if s == "denoise"]  # one mark before step 1, then one after each step
        encode_start = next(t for s, t in marks if s == "encode")
        decode_start = next(t for s, t in marks if s == "decode")
        steps = [b - a for a, b in zip(denoise, denoise[1:])]
        report.update({
            "encode_seconds": round(denoise[0] - encode_start, 2),
            "seconds_per_step": round(statistics.median(steps), 3),
            "seconds_per_step_mean": round(statistics.mean(steps), 3),
            "first_step_seconds": round(steps[0], 3),
            "denoise_seconds": round(denoise[-1] - denoise[0], 2),
            "decode_seconds": round(t2 - decode_start, 2),
            "total_seconds": round(t2 - t1, 2),
            "output_shape": list(out.shape),
            "output_mean": round(float(out.mean()), 2),
        })
        if cuda:
            report["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 2)
            report["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GiB, 2)
        report["ok"] = True
    except Exception as e:  # report, don't hide: the JSON says what failed
        report.update({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]})
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
