"""``ex4d bench``: one whole EX-4D shot, reference vs ours, on full-size random weights (no downloads).

Builds the full Wan2.1-I2V-14B parts (DiT, umT5-XXL, CLIP ViT-H/14, VAE) and the EX-4D adapter with seeded
random weights directly on the GPU, then runs the same shot (512x512x49, 25 steps, CFG 5) three times:

* ``reference``: the release's configuration - bf16, LoRA as separate fp32 layers, two CFG passes, no
  caching, no compile, every weight resident, VAE not tiled.
* ``ours``: the speed levers of :mod:`ex4d.generate.accel` (FP8 linears with compiled quantisation,
  real RoPE, cuDNN attention, regional torch.compile, both CFG branches in one batch).
* ``ours_fastest``: ours plus FP8 self-attention through cuDNN (``--speed fastest``); run it after ours.
* ``ours_<N>gb`` (``--vram-gb N``): ours under an N GiB cap - DiT blocks streamed with prefetch
  (:class:`~ex4d.generate.offload.BlockOffloader`), text encoder on the GPU only while it encodes.

Depth (a full-size random-init depth model, DepthCrafter by default) and DW-mesh + guides run once
before them (shared by every run: the levers are the DiT's).

Prints ONE JSON report: per stage (depth, DW-mesh + guides, text/image encoding, video condition, each denoising step, decode,
whole shot) seconds and peak GPU memory, per run, and the ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

GiB = 1024**3


def _psnr_db(frames, ref_frames) -> float:
    import numpy as np

    diff = (frames.astype(np.float32) - ref_frames.astype(np.float32)) / 255.0
    return round(10 * float(np.log10(1.0 / max(float((diff**2).mean()), 1e-12))), 2)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time one whole shot, reference vs ours (full-size random weights, GPU)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--size", type=int, default=512, help="square size (multiple of 16)")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--runs", default="reference,ours", help="comma list of reference, ours, ours_fastest, ours_<N>gb")
    p.add_argument("--levers", default="cudnn_attention,fused_rope,fp8,fast_accum,compile,cfg_batch,vae_channels_last,context_kv_cache",
                   help="levers of 'ours' (fp8_ffn instead of fp8: FP8 in the FFN only, the earlier default; run ours_fastest adds FP8 self-attention after ours)")
    p.add_argument("--tiny", action="store_true", help="tiny random model (CPU logic check)")
    p.add_argument("--device", default=None)
    p.add_argument("--include", action="append", default=[], metavar="NAME=FILE.json",
                   help="embed another bench's JSON (depth, geometry) in the report")
    p.add_argument("--depth-model", default="depthcrafter",
                   help="depth stage: depthcrafter (the release's), video-depth-anything-small, or none")
    p.add_argument("--no-geometry", action="store_true", help="skip the DW-mesh + guides stage")
    p.add_argument("--json-out", help="also write the report here (atomic)")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------- timing


class StageTimer:
    """Wraps pipeline methods: every call is synchronised and timed, with its peak GPU memory."""

    def __init__(self, torch, device):
        self.torch = torch
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.calls: list[tuple[str, float, float | None]] = []

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def wrap(self, obj, method: str, stage: str):
        inner = getattr(obj, method)

        def timed(*a, **k):
            self.sync()
            if self.cuda:
                self.torch.cuda.reset_peak_memory_stats(self.device)
            t = time.perf_counter()
            out = inner(*a, **k)
            self.sync()
            peak = self.torch.cuda.max_memory_allocated(self.device) / GiB if self.cuda else None
            self.calls.append((stage, time.perf_counter() - t, peak))
            return out

        setattr(obj, method, timed)
        return inner

    def summary(self) -> dict:
        out: dict = {}
        for stage in dict.fromkeys(s for s, _, _ in self.calls):
            secs = [t for s, t, _ in self.calls if s == stage]
            peaks = [m for s, _, m in self.calls if s == stage and m is not None]
            entry = {"seconds": round(sum(secs), 4), "calls": len(secs), "peak_gib": round(max(peaks), 2) if peaks else None}
            if stage == "denoise_step":
                entry.update(median_s=round(statistics.median(secs), 4), first_s=round(secs[0], 4),
                             per_step_s=[round(s, 4) for s in secs])
            out[stage] = entry
        return out


def _instrument(pipe, timer: StageTimer) -> None:
    timer.wrap(pipe, "encode_prompt", "text_encoding")
    timer.wrap(pipe, "encode_image_condition", "image_encoding")  # CLIP + VAE encode of frame 0
    timer.wrap(pipe, "encode_video_condition", "video_condition")  # 2 VAE encodes + condition encoder
    timer.wrap(pipe, "predict_noise", "denoise_step")
    timer.wrap(pipe, "decode", "vae_decode")


def _front_stages(torch, np, args, device, cuda) -> dict:
    """Depth (full-size random-init model, the release's settings) and DW-mesh + guides for one clip.

    These stages are the same in the reference and in ours (the speed levers are the DiT's), so they
    run once; each is timed after a warm-up. The depth model is freed before the Wan parts are built."""
    out: dict = {}
    from ..synthetic import make_scene

    scene = make_scene(7, args.size, args.size, args.frames)
    frames, depth = scene.source()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    if args.depth_model != "none":
        try:
            from ..depth.models import depthcrafter, video_depth_anything as vda

            dtype = torch.float16 if cuda else torch.float32
            if args.depth_model == "depthcrafter":
                cfgs = depthcrafter.tiny_configs() if args.tiny else depthcrafter.published_configs()
                model = depthcrafter.DepthCrafter.build_random(cfgs, device=device, dtype=dtype)
            elif args.depth_model == "video-depth-anything-small":
                model = vda.VideoDepthAnything.build_random(vda.TINY if args.tiny else vda.SMALL, device=device, dtype=dtype,
                                                            settings=vda.VideoDepthAnythingSettings(input_size=56 if args.tiny else 518))
            else:
                raise ValueError(f"unknown depth model {args.depth_model!r}")
            model.predict(frames[: min(8, len(frames))])  # warm-up
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            model.predict(frames)
            sync()
            out["depth"] = {"model": args.depth_model, "seconds": round(time.perf_counter() - t, 3),
                            "peak_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 2) if cuda else None,
                            "weights": "random (tiny)" if args.tiny else "random (full size)"}
            del model
        except Exception as e:  # noqa: BLE001 - keep the rest of the report
            out["depth"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if cuda:
            torch.cuda.empty_cache()
    if not args.no_geometry:
        try:
            from ..camera import Intrinsics, preset_path
            from ..dwmesh import build_dwmesh
            from ..render import get_rasterizer, render_guides

            path = preset_path("90", args.frames, Intrinsics.from_K(scene.K, args.size, args.size), depth0=depth[0])
            rast = get_rasterizer("auto", device)

            def geometry():
                mesh = build_dwmesh(torch.from_numpy(depth).to(device), scene.K)
                return render_guides(mesh, frames, path, rasterizer=rast)

            geometry()
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            geometry()
            sync()
            out["dwmesh_guides"] = {"rasterizer": rast.name, "seconds": round(time.perf_counter() - t, 4),
                                    "peak_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 2) if cuda else None,
                                    "includes": "depth upload, build_dwmesh, render_guides with numpy outputs"}
        except Exception as e:  # noqa: BLE001
            out["dwmesh_guides"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


def synthetic_guides(np, frames, size, seed=0):
    """A smooth colour clip whose right side and a moving box are holes (frame 0 fully valid), in [-1,1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    color = np.empty((3, frames, size, size), np.float32)
    mask = np.ones((3, frames, size, size), np.float32)
    for t in range(frames):
        ph = t / max(1, frames - 1)
        color[:, t] = np.stack([np.sin(xx / 37 + 3 * ph), np.cos(yy / 29), np.sin((xx + yy) / 50)]) * 0.8
        if t:
            mask[:, t, :, int(size * (1 - 0.35 * ph)):] = -1
    color += rng.normal(0, 0.02, color.shape).astype(np.float32)
    return color * (mask > 0), mask


# ---------------------------------------------------------------------------------------------- run


def run(args) -> int:
    import numpy as np
    import torch

    from ..camera import atomic_write_text
    from ..errors import InputError

    if args.size % 16 or (args.frames - 1) % 4 or args.steps < 1:
        raise InputError("--size must be a multiple of 16, --frames 4k+1, --steps >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    levers = tuple(lv.strip() for lv in args.levers.split(",") if lv.strip())
    report: dict = {"shot": dict(frames=args.frames, size=args.size, steps=args.steps, cfg=args.cfg),
                    "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                    "runs": {}, "notes": []}
    for item in args.include:
        name, _, path = item.partition("=")
        try:
            with open(path) as f:
                report.setdefault("included", {})[name] = json.load(f)
        except (OSError, ValueError) as e:
            report.setdefault("included", {})[name] = {"error": str(e)}

    report["shared_stages"] = _front_stages(torch, np, args, device, cuda)
    print(json.dumps({"shared_stages": report["shared_stages"]}), file=sys.stderr, flush=True)

    from ..generate import accel
    from ..generate.architectures import build_random_components, tiny_tokenizer
    from ..generate.pipeline import assemble_pipeline

    t = time.perf_counter()
    arch = "tiny" if args.tiny else "i2v-14b"
    components = build_random_components(arch, seed=0, device=device, dtype=dtype,
                                         tokenizer=tiny_tokenizer(seq_len=32 if args.tiny else 512))
    try:
        pipe = assemble_pipeline(components, device=device, dtype=dtype, adapter_state="random", memory_mode="resident")
    except Exception:  # noqa: BLE001 - older pipeline without random adapters: zero-initialised LoRA, same cost
        pipe = assemble_pipeline(components, device=device, dtype=dtype, adapter_state=None, memory_mode="resident")
        report["notes"].append("adapter: peft default init (LoRA B = 0), same compute as a loaded adapter")
    report["build_s"] = round(time.perf_counter() - t, 2)
    color, mask = synthetic_guides(np, args.frames, args.size)
    prompt, negative = "4K ultra HD, surround motion, cinematic quality", "blurred details, worst quality, static"

    ref_preds: list = []

    def one_shot(name: str, record_preds: list | None, compare: list | None):
        timer = StageTimer(torch, device)
        originals = {m: getattr(pipe, m) for m in ("encode_prompt", "encode_image_condition", "encode_video_condition",
                                                   "predict_noise", "decode")}
        had_instance_attr = {m: m in pipe.__dict__ for m in originals}
        _instrument(pipe, timer)
        preds: list = []
        if record_preds is not None or compare is not None:
            inner = pipe.predict_noise

            def capture(latents, timestep, cond):
                out = inner(latents, timestep, cond)
                preds.append(out.detach().float().clone())
                return out

            pipe.predict_noise = capture
        timer.sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        frames = pipe.generate_clip(color, mask, prompt=prompt, negative_prompt=negative, steps=args.steps,
                                    cfg=args.cfg, seed=0)
        timer.sync()
        total = time.perf_counter() - t0
        for m, fn in originals.items():  # restore (instance overrides such as batched CFG stay)
            if had_instance_attr[m]:
                setattr(pipe, m, fn)
            else:
                pipe.__dict__.pop(m, None)
        stages = timer.summary()
        peaks = [v["peak_gib"] for v in stages.values() if v.get("peak_gib") is not None]
        entry = {"stages": stages, "whole_shot_s": round(total, 3), "peak_gib": max(peaks) if peaks else None,
                 "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GiB, 2) if cuda else None}
        if record_preds is not None:
            record_preds.extend(preds)
        if compare:
            cos = [float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) for a, b in zip(preds, compare)]
            entry["noise_pred_cosine_vs_reference"] = {"step1": round(cos[0], 5), "min": round(min(cos), 5),
                                                       "per_step": [round(c, 5) for c in cos]}
        return entry, frames

    def warm_up():
        """One untimed prepare + denoising step on the real shapes: compilation, cuDNN/cuBLAS autotuning and
        allocator growth stay out of every timed shot (reference included)."""
        t = time.perf_counter()
        warm = pipe.prepare(color, mask, prompt=prompt, negative_prompt=negative, cfg=args.cfg)
        noise = pipe.initial_noise(args.frames, args.size, args.size, 0)
        pipe.scheduler.set_timesteps(args.steps, denoising_strength=1.0, shift=5.0)
        with torch.no_grad():
            pipe.predict_noise(noise, pipe.scheduler.timesteps[:1], warm)
            pipe.decode(noise[:, :, :2])
        del warm
        if cuda:
            torch.cuda.synchronize(device)
        return round(time.perf_counter() - t, 2)

    ref_frames = None
    applied = None
    for name in runs:
        print(f"--- {name}", file=sys.stderr, flush=True)
        try:
            if name == "reference":
                report["reference_warmup_s"] = warm_up()
                entry, ref_frames = one_shot(name, ref_preds, None)
            elif name == "ours_fastest":  # ours + FP8 self-attention (--speed fastest); run it after ours
                t = time.perf_counter()
                more = accel.accelerate_pipeline(pipe, levers + ("fp8_attention",),
                                                 notice=lambda m: report["notes"].append(m))
                report["fastest_levers"] = more.as_dict()
                report["fastest_warmup_s"] = warm_up() + round(time.perf_counter() - t, 2)
                entry, frames = one_shot(name, None, ref_preds or None)
                if ref_frames is not None:
                    entry["video_psnr_vs_reference_db"] = _psnr_db(frames, ref_frames)
            elif name.startswith("ours"):
                if applied is None:
                    t = time.perf_counter()
                    applied = accel.accelerate_pipeline(pipe, levers, notice=lambda m: report["notes"].append(m))
                    report["levers"] = applied.as_dict()
                    report["levers_apply_s"] = round(time.perf_counter() - t, 2)
                    report["compile_warmup_s"] = warm_up()  # one-time compilation on the real shapes
                cap = None
                swap = off = None
                kept_kv = pipe.context_kv_cache
                if name != "ours":
                    cap = float(name[len("ours_"):].rstrip("gb"))
                    pipe.context_kv_cache = False  # as the product's stream mode: the memory goes to the blocks
                    swap, off, plan = _fit_under_cap(torch, pipe, device, cap)
                    torch.cuda.set_per_process_memory_fraction(cap * GiB / torch.cuda.get_device_properties(device).total_memory,
                                                               torch.device(device).index or 0)
                try:
                    entry, frames = one_shot(name, None, ref_preds or None)
                finally:
                    pipe.context_kv_cache = kept_kv
                    if cap is not None:
                        torch.cuda.set_per_process_memory_fraction(1.0, torch.device(device).index or 0)
                        if off is not None:
                            off.close(restore_to=device)
                        if swap is not None:
                            swap.onload()
                            pipe.__dict__.pop("encode_prompt", None)
                if cap is not None:
                    entry["cap_gib"] = cap
                    entry["plan"] = plan
                if ref_frames is not None:
                    entry["video_psnr_vs_reference_db"] = _psnr_db(frames, ref_frames)
            else:
                raise InputError(f"unknown run {name!r}")
            report["runs"][name] = entry
        except Exception as e:  # noqa: BLE001 - keep the other runs' numbers
            import traceback

            report["runs"][name] = {"error": f"{type(e).__name__}: {e}"[:1500], "traceback": traceback.format_exc()[-1500:]}
        print(json.dumps({name: {k: v for k, v in report["runs"][name].items() if k != "stages"}}), file=sys.stderr, flush=True)

    front = sum(v.get("seconds", 0.0) for v in report["shared_stages"].values() if isinstance(v, dict))
    for entry in report["runs"].values():
        if "whole_shot_s" in entry:
            entry["with_depth_and_guides_s"] = round(entry["whole_shot_s"] + front, 3)
    ref = report["runs"].get("reference", {})
    for name, entry in report["runs"].items():
        if name != "reference" and "whole_shot_s" in entry and "whole_shot_s" in ref:
            entry["speedup_whole_shot"] = round(ref["whole_shot_s"] / entry["whole_shot_s"], 3)
            entry["speedup_with_depth_and_guides"] = round(ref["with_depth_and_guides_s"] / entry["with_depth_and_guides_s"], 3)
            rs, os_ = ref["stages"].get("denoise_step", {}), entry["stages"].get("denoise_step", {})
            if rs.get("median_s") and os_.get("median_s"):
                entry["speedup_denoise_step"] = round(rs["median_s"] / os_["median_s"], 3)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        atomic_write_text(args.json_out, text)
    return 0 if all("error" not in r for r in report["runs"].values()) else 1


def _fit_under_cap(torch, pipe, device, cap_gib: float):
    """Plan for a memory cap: the text encoder lives in pinned host memory and visits the GPU only to
    encode; as many DiT blocks stay resident as fit beside it; the rest stream with prefetch."""
    from ..generate.offload import BlockOffloader, ModuleSwapper, blocks_that_fit, module_bytes

    swap = ModuleSwapper(pipe.text_encoder, device)
    inner = type(pipe).encode_prompt

    def encode_prompt(text):
        with swap.on_device():
            return inner(pipe, text)

    pipe.encode_prompt = encode_prompt
    text_bytes = sum(h.numel() * h.element_size() for h in swap._host)
    resident_other = sum(p.numel() * p.element_size() for n in ("image_encoder", "vae", "condition_encoder")
                         for p in getattr(pipe, n).parameters())
    dit_other = sum(p.numel() * p.element_size() for n, p in pipe.dit.named_parameters() if not n.startswith("blocks."))
    margin = 2.5 * GiB  # activations of the largest stage beside the weights (text encoding / VAE)
    budget = cap_gib * GiB - text_bytes - resident_other - dit_other - margin
    blocks = list(pipe.dit.blocks)
    resident = blocks_that_fit(blocks, int(max(budget, 0)))
    off = BlockOffloader(blocks, device, resident=resident) if resident < len(blocks) else None
    plan = dict(resident_blocks=resident, streamed_blocks=len(blocks) - resident,
                block_gib=round(module_bytes(blocks[0]) / GiB, 3), text_encoder_gib=round(text_bytes / GiB, 2),
                text_encoder="pinned host, on GPU only while encoding")
    return swap, off, plan
