"""Complete EX-4D generations (25 steps, CFG 5, 512x512x49) through the product's load path, per configuration.

Builds the FULL Wan2.1-I2V-14B-480P architecture (DiT 16.4 B, umT5-XXL, CLIP ViT-H/14, Wan VAE) plus the
EX-4D adapter (peft LoRA r16 + CamVidEncoder) with seeded random weights, initialised directly on the GPU
in bf16 (no downloads), puts them through ``assemble_pipeline`` with a memory mode and a speed exactly as
``load_generator`` does, and runs ``Ex4dGenerator.generate`` on a synthetic guide clip (a moving hole
pattern, frame 0 fully valid). Several configurations run in ONE process, one after the other (the
weights are rebuilt for each: every memory mode changes them in place):

    python bench/generate_gpu.py --configs resident,resident/reference,fp8,stream@24,stream@16 --json-out $OUT/gen.json
    python bench/generate_gpu.py --configs resident,resident/preview=0.1,resident/preview=0.2,offload@0/steps=5
    python bench/generate_gpu.py --tiny --device cpu --configs resident,stream@0,resident/preview=5 --steps 3

A configuration is ``MODE[@GB][/reference|/fastest][/preview=THRESH][/metric=t|t_mod|x_mod][/steps=N]``: MODE one of resident, stream,
fp8, offload; ``@GB`` the --vram-limit (stream: the budget, also enforced here as a hard cap with
``torch.cuda.set_per_process_memory_fraction`` so that the peak proves it fits; offload: diffsynth's limit,
0 = stream every layer); ``/reference`` the release's speed, ``/fastest`` fast + FP8 attention (default: fast); ``/preview=T`` the preview step
cache with probe ``/metric=`` (default t; random time-embedding weights change ~80% per step, beyond the
published fit, so on random weights only ``x_mod`` skips anything); ``/steps=N`` fewer steps for one slow
configuration.

Per configuration: one untimed warm-up generation of 1 step (compilation, autotuning; its seconds are
reported), then the timed one: seconds per denoising step (median), encode / denoise / decode / total
seconds, peak GPU memory during the timed generation, the speed levers used, the stream plan, skipped
forwards of the preview cache, and the PSNR of the output against every earlier configuration with the
same step count (same seed, same random weights). The JSON file is rewritten atomically after each
configuration, so a timeout keeps the finished ones.

Needs on the GPU machine: diffsynth 2.1.12 (+ its wheels, see DEVICE.md), peft, transformers (tokenizers).
The prompt goes through a tiny offline tokenizer (the real umT5 tokenizer is a weights file); token ids
are valid for the full vocabulary, sequence length 512 as in Wan.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GiB = 1024**3
MODES = ("resident", "stream", "fp8", "offload")


def parse_config(text: str) -> dict:
    """'stream@24/reference/preview=0.1/steps=5' -> {name, mode, vram_limit, speed, preview, steps}."""
    parts = [p.strip() for p in text.strip().split("/") if p.strip()]
    if not parts:
        raise ValueError("empty configuration")
    mode, _, gb = parts[0].partition("@")
    if mode not in MODES:
        raise ValueError(f"configuration {text!r}: mode must be one of {', '.join(MODES)}")
    cfg = {"name": text.strip(), "mode": mode, "vram_limit": float(gb) if gb else None, "speed": "fast",
           "preview": 0.0, "steps": None, "metric": "t"}
    if cfg["vram_limit"] is not None and mode not in ("stream", "offload"):
        raise ValueError(f"configuration {text!r}: @GB applies to stream and offload")
    for part in parts[1:]:
        key, _, value = part.partition("=")
        if key in ("reference", "fast", "fastest") and not value:
            cfg["speed"] = key
        elif key == "preview" and value:
            cfg["preview"] = float(value)
        elif key == "steps" and value:
            cfg["steps"] = int(value)
        elif key == "metric" and value:
            cfg["metric"] = value
        else:
            raise ValueError(f"configuration {text!r}: unknown part {part!r}")
    return cfg


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="resident", help="comma list of configurations (see the module docstring)")
    p.add_argument("--mode", choices=MODES, help="single configuration (old form): this memory mode")
    p.add_argument("--vram-limit", type=float, help="with --mode: its @GB")
    p.add_argument("--tiny", action="store_true", help="tiny random model instead of the full I2V-14B (CPU check)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--size", default="512x512", help="WxH (multiples of 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 1-step warm-up")
    p.add_argument("--json-out", help="write the report here after every configuration (atomic)")
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    if w % 16 or h % 16 or args.frames < 1 or args.steps < 1:
        p.error("--size must be multiples of 16; --frames and --steps at least 1")
    args.width, args.height = w, h
    if args.mode:
        args.configs = args.mode + (f"@{args.vram_limit:g}" if args.vram_limit is not None else "")
    try:
        args.config_list = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    except ValueError as e:
        p.error(str(e))
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


def build(args, cfg: dict, notes: list):
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
    pipe = assemble_pipeline(components, device=device, dtype=dtype, adapter_state="random", memory_mode=cfg["mode"],
                             vram_limit_gb=cfg["vram_limit"], speed=cfg["speed"], notice=notes.append)
    del components
    return Ex4dGenerator(pipe, name=arch, preview_metric=cfg["metric"]), device


def psnr(a, b) -> float:
    import numpy as np

    mse = float(((a.astype(np.float32) - b.astype(np.float32)) ** 2).mean())
    return 100.0 if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)  # 100 = identical


def run_one(args, cfg: dict, outputs: dict) -> dict:
    import torch

    from ex4d.generate.memory import weight_bytes

    entry: dict = {"mode": cfg["mode"], "speed": cfg["speed"], "vram_limit_gib": cfg["vram_limit"],
                   "preview_cache": cfg["preview"], "preview_metric": cfg["metric"], "steps": cfg["steps"] or args.steps}
    notes: list = []
    generator = None
    cuda = False
    device = None
    try:
        if torch.cuda.is_available():
            entry["gpu_gib_before_build"] = round(torch.cuda.memory_allocated() / GiB, 2)  # leftovers of earlier configs
        t0 = time.perf_counter()
        generator, device = build(args, cfg, notes)
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            entry["gpu_gib_after_build"] = round(torch.cuda.memory_allocated(device) / GiB, 2)
        entry["build_seconds"] = round(time.perf_counter() - t0, 2)
        entry["weights_gib"] = {k: round(v / GiB, 3) for k, v in weight_bytes(generator.pipe).items()}
        entry["levers"] = generator.info()["levers"]
        entry["stream_plan"] = generator.info()["stream_plan"]
        cap = cfg["vram_limit"] if (cfg["mode"] == "stream" and cuda and cfg["vram_limit"]) else None
        if cap is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GiB / total), torch.device(device).index or 0)
            entry["hard_cap_gib"] = cap
        try:
            color, mask = synthetic_guides(args.frames, args.height, args.width, args.seed)
            steps = cfg["steps"] or args.steps
            if not args.no_warmup:
                t = time.perf_counter()
                generator.generate(color, mask, seed=args.seed, steps=1, cfg=args.cfg, preview_cache=0)
                if cuda:
                    torch.cuda.synchronize()
                entry["warmup_seconds"] = round(time.perf_counter() - t, 2)
            marks: list[tuple[str, float]] = []

            def progress(stage, step, total, preview=None):
                if cuda:
                    torch.cuda.synchronize()
                marks.append((stage, time.perf_counter()))

            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t1 = time.perf_counter()
            out = generator.generate(color, mask, seed=args.seed, steps=steps, cfg=args.cfg, progress=progress,
                                     preview_cache=cfg["preview"])
            if cuda:
                torch.cuda.synchronize()
            t2 = time.perf_counter()
        finally:
            if cap is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, torch.device(device).index or 0)
        denoise = [t for s, t in marks if s == "denoise"]  # one mark before step 1, then one after each step
        encode_start = next(t for s, t in marks if s == "encode")
        decode_start = next(t for s, t in marks if s == "decode")
        per_step = [b - a for a, b in zip(denoise, denoise[1:])]
        entry.update({
            "encode_seconds": round(denoise[0] - encode_start, 2),
            "seconds_per_step": round(statistics.median(per_step), 3),
            "seconds_per_step_mean": round(statistics.mean(per_step), 3),
            "first_step_seconds": round(per_step[0], 3),
            "denoise_seconds": round(denoise[-1] - denoise[0], 2),
            "decode_seconds": round(t2 - decode_start, 2),
            "total_seconds": round(t2 - t1, 2),
            "output_shape": list(out.shape),
            "output_mean": round(float(out.mean()), 2),
        })
        run = generator.last_run.get("preview_cache")
        if run:
            entry["preview"] = run
            entry["skipped_forwards"] = run["skipped_forwards"]
            entry["forwards"] = run["forwards"]
        if cuda:
            entry["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 2)
            entry["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GiB, 2)
        entry["psnr_db_vs"] = {name: psnr(out, prev) for name, (n, prev) in outputs.items() if n == steps}
        outputs[cfg["name"]] = (steps, out)
        entry["ok"] = True
    except Exception as e:  # report, don't hide: the JSON says what failed
        entry.update({"ok": False, "error": f"{type(e).__name__}: {e}"[:1500], "traceback": traceback.format_exc()[-2000:]})
    finally:
        entry["notices"] = notes
        if generator is not None:
            offloader = getattr(generator.pipe, "block_offloader", None)
            if offloader is not None:
                offloader.close()
        del generator
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return entry


def write_json(path: str, report: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    report: dict = {"arch": "tiny" if args.tiny else "i2v-14b", "steps": args.steps, "cfg": args.cfg,
                    "frames": args.frames, "size": f"{args.width}x{args.height}", "configs": {}}
    try:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        report["device"] = str(device)
        report["torch"] = torch.__version__
        if torch.device(device).type == "cuda":
            report["device_name"] = torch.cuda.get_device_name(device)
            report["gpu_total_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GiB, 2)
    except Exception as e:  # noqa: BLE001
        report["error"] = f"{type(e).__name__}: {e}"
    outputs: dict = {}
    for cfg in args.config_list:
        print(f"--- {cfg['name']}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        entry = run_one(args, cfg, outputs)
        entry["wall_seconds"] = round(time.perf_counter() - t, 1)
        report["configs"][cfg["name"]] = entry
        print(json.dumps({cfg["name"]: {k: v for k, v in entry.items() if k not in ("traceback", "weights_gib")}}),
              file=sys.stderr, flush=True)
        if args.json_out:
            write_json(args.json_out, report)
    print(json.dumps(report, indent=1))
    return 0 if all(e.get("ok") for e in report["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
