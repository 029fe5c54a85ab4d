"""Per-lever speed, drift and memory of the Wan2.1-I2V-14B DiT at EX-4D's shape (512x512x49, CFG 5).

Builds the full I2V-14B DiT with random bf16 weights directly on the GPU (no downloads) and measures one
classifier-free-guided denoising step (the noise prediction nega + 5 (posi - nega)) for a cumulative chain
of levers, each against the untouched diffsynth reference (two passes, default SDPA, float64 RoPE):

  ref -> +cudnn_attention -> +fused_rope -> +cfg_batch -> +compile -> +fp8 (= ours)

plus fp8 without compile, and memory modes: bf16 with block offload under a 24 GB cap, fp8 resident under
24 GB, fp8 + offload under 16 GB. Each phase is wrapped in try/except and the JSON report is rewritten after
every phase, so a failure or a time-out still leaves the earlier numbers.

    python bench/dit_levers.py --out $OUT/dit_levers.json            # H100, ~6 minutes
    python bench/dit_levers.py --tiny --device cpu --out /tmp/x.json   # logic check, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ex4d.generate import accel, offload  # noqa: E402

I2V_14B = dict(dim=5120, in_dim=36, ffn_dim=13824, out_dim=16, text_dim=4096, freq_dim=256, eps=1e-6,
               patch_size=(1, 2, 2), num_heads=40, num_layers=40, has_image_input=True)
TINY = dict(I2V_14B, dim=256, ffn_dim=512, num_heads=2, num_layers=3)
GiB = 1024**3


def build_dit(cfg, device, dtype, seed=0):
    from diffsynth.models.wan_video_dit import WanModel

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            dit = WanModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    return dit.eval().requires_grad_(False)


def make_inputs(cfg, device, dtype, frames, height, width, seed=1):
    g = torch.Generator().manual_seed(seed)
    t_lat, h_lat, w_lat = (frames - 1) // 4 + 1, height // 8, width // 8

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return dict(
        latents=r(1, 16, t_lat, h_lat, w_lat),
        y=r(1, cfg["in_dim"] - 16, t_lat, h_lat, w_lat),
        clip_feature=r(1, 257, 1280),
        context_posi=r(1, 512, cfg["text_dim"]),
        context_nega=r(1, 512, cfg["text_dim"]),
    )


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.report = {"config": {}, "phases": {}, "notes": []}
        self.t0 = time.time()

    def save(self):
        tmp = self.args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.report, f, indent=1)
        os.replace(tmp, self.args.out)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_fn(self, fn, reps):
        """Median seconds of ``fn`` over ``reps`` runs after one warm-up (CUDA events on GPU)."""
        t = time.perf_counter()
        out = fn()
        self.sync()
        first = time.perf_counter() - t
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1000)
            else:
                t = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated(self.device) / GiB if self.cuda else None
        reserved = torch.cuda.max_memory_reserved(self.device) / GiB if self.cuda else None
        return out, dict(step_s=statistics.median(times), step_all_s=times, first_call_s=first,
                         peak_alloc_gib=peak, peak_reserved_gib=reserved)


def cosine(a, b):
    a, b = a.float().flatten(), b.float().flatten()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-30))


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def pair_kernel_parity(device, tokens=13312, dim=5120, ffn=13824):
    """The Triton pair-quantisation kernels vs the torch expressions at the model's shapes: the share of
    e4m3 codes that agree exactly, the largest scale difference, the dequantised relative error."""
    from ex4d.generate import pair_kernels

    if not pair_kernels.available(torch.empty(0, device=device)):
        return {"skipped": "Triton cannot run here"}
    g = torch.Generator(device=device).manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    out = {}
    x0 = (r(tokens, dim) * 4 + 0.5).bfloat16()
    x1 = (x0.float() + 0.1 * r(tokens, dim)).bfloat16()
    w, b = 1 + 0.3 * r(2, dim), 0.2 * r(2, dim)
    ln = lambda x, i: torch.nn.functional.layer_norm(x.float(), (dim,), eps=1e-6) * w[i] + b[i]  # noqa: E731
    cases = {"layer_norm": (pair_kernels.ln_pair_quant(x0, x1, w, b, 1e-6), accel.quantize_pair(ln(x0, 0), ln(x1, 1))),
             "pair_as_is": (pair_kernels.pair_quant(x0, x1), accel.quantize_pair(x0, x1))}
    y = r(2 * tokens, ffn).bfloat16()
    y[:tokens] *= 0.05
    bias = (0.1 * r(ffn)).bfloat16()
    base = y[tokens:].float() + bias.float()
    gelu = lambda t: torch.nn.functional.gelu(t, approximate="tanh")  # noqa: E731
    cases["gelu"] = (pair_kernels.gelu_pair_quant(y, bias), accel.quantize_pair(gelu(base + y[:tokens].float()), gelu(base)))
    # RMSNorm + RoPE of q: bf16 output, and e4m3 on the static scale vs the per-tensor amax scale
    from ex4d.generate import fp8_attention

    hd = 128
    w = (1 + 0.2 * r(dim)).bfloat16()
    ang = torch.rand(tokens, hd // 2, generator=g, device=device) * 6
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()

    def rms_rope(x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
        return accel.rope_real(x[None], cos[:, None], sin[:, None], dim // hd)[0]

    ref = torch.stack((rms_rope(base[:, :dim] + y[:tokens, :dim].float()), rms_rope(base[:, :dim])))
    yq = y[:, :dim].contiguous()
    bq = bias[:dim].contiguous()
    rel = lambda a: float((a.float() - ref).norm() / ref.norm())  # noqa: E731
    scale = (dim ** 0.5 * w.float().abs().max() / 448).reshape(1)
    amax8, amax_s = fp8_attention.quantize_tensor_fp8(ref)
    out["rms_rope"] = dict(bf16_rel_err=rel(pair_kernels.rms_rope_pair(yq, bq, w, cos, sin, 1e-6, None)),
                           e4m3_static_scale_rel_err=rel(pair_kernels.rms_rope_pair(yq, bq, w, cos, sin, 1e-6, scale).float() * scale),
                           e4m3_amax_scale_rel_err=rel(amax8.float() * amax_s))
    for name, ((q, s), (qr, sr)) in cases.items():
        deq, deqr = q.float() * s, qr.float() * sr
        out[name] = dict(exact_codes=float((q.float() == qr.float()).float().mean()),
                         scale_rel_max=float(((s - sr).abs() / sr).max()),
                         dequant_rel_err=float((deq - deqr).norm() / deqr.norm()))
    return out


def attention_micro(cfg, tokens, B):
    """ms per self-attention call at the DiT's shape, per SDPA backend and q/k/v layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, hd = cfg["num_heads"], cfg["dim"] // cfg["num_heads"]
    out = {}
    base = torch.randn(3, 1, tokens, heads, hd, device=B.device, dtype=torch.bfloat16)
    layouts = {"bsnd_transposed": [t.transpose(1, 2) for t in base], "bnsd_contiguous": [t.transpose(1, 2).contiguous() for t in base]}
    backends = {"default": None, "flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
                "efficient": [SDPBackend.EFFICIENT_ATTENTION]}
    for lname, (q, k, v) in layouts.items():
        for bname, bk in backends.items():
            def call():
                if bk is None:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
                with sdpa_kernel(bk):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            try:
                _, t = B.time_fn(call, 10)
                out[f"{lname}/{bname}"] = t["step_s"] * 1000
            except Exception as e:  # noqa: BLE001
                out[f"{lname}/{bname}"] = f"{type(e).__name__}: {str(e)[:100]}"
        try:
            _, t = B.time_fn(lambda: accel.sdpa_cudnn(q, k, v), 10)
            out[f"{lname}/aten_cudnn_direct"] = t["step_s"] * 1000
        except Exception as e:  # noqa: BLE001
            out[f"{lname}/aten_cudnn_direct"] = f"{type(e).__name__}: {str(e)[:100]}"
    try:
        from torch.nn.attention import _cur_sdpa_kernel_backends  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    out["flags"] = dict(flash=torch.backends.cuda.flash_sdp_enabled(), cudnn=torch.backends.cuda.cudnn_sdp_enabled(),
                        mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled())
    print("attention micro (ms):", json.dumps(out), flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "dit_levers.json"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny DiT (CPU logic check)")
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cfg-scale", type=float, default=5.0)
    p.add_argument("--timesteps", default="950,500", help="timesteps at which drift is measured")
    p.add_argument("--phases", default="all")
    p.add_argument("--budget-s", type=float, default=540, help="skip remaining phases after this many seconds")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--profile", default="ref,cudnn+fused_rope+cfg_batch+compile,ours: cudnn+fused_rope+cfg_batch+compile+fp8",
                   help="phases to profile (one step, top GPU kernels)")
    p.add_argument("--attn-micro", action="store_true", help="time SDPA backends at the model's attention shape")
    p.add_argument("--fp8-subsets", default="",
                   help="cumulative FP8 linear sets to measure after the compiled bf16 phase, e.g. "
                        "'ffn.0,ffn.2;self_attn.v,self_attn.o' (each phase named compile+fp8[...])")
    p.add_argument("--truth", action="store_true", help="also compare every lever with an fp32 run of the same weights")
    args = p.parse_args()
    if args.tiny:
        args.frames, args.size = min(args.frames, 9), min(args.size, 64)
    B = Bench(args)
    cfg = TINY if args.tiny else I2V_14B
    dtype = torch.bfloat16
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    t = time.time()
    truth: list = []
    inputs = make_inputs(cfg, B.device, dtype, args.frames, args.size, args.size)
    if args.truth:
        # fp32 "truth" on the same weights: build in fp32, predict, then cast the model to bf16 in place.
        try:
            dit = build_dit(cfg, B.device, torch.float32)
            in32 = {k: v.float() for k, v in inputs.items()}
            outs, conds = [], []
            with torch.no_grad():
                for s_ in args.timesteps.split(","):
                    ts = torch.tensor([float(s_)], device=B.device)
                    o, c, _ = accel.cfg_noise_pred(model_fn_wan_video, dit, latents=in32["latents"], timestep=ts,
                                                   context_posi=in32["context_posi"], context_nega=in32["context_nega"],
                                                   cfg_scale=args.cfg_scale, batched=False, return_branches=True,
                                                   clip_feature=in32["clip_feature"], y=in32["y"])
                    outs.append(o.clone())
                    conds.append(c.clone())
            truth[:] = [outs, conds]
            dit = dit.to(dtype)
            B.report["notes"].append(f"fp32 truth computed in {time.time() - t:.1f} s; model cast to bf16 after")
        except Exception as e:  # noqa: BLE001
            B.report["notes"].append(f"fp32 truth failed: {type(e).__name__}: {str(e)[:300]}")
            truth.clear()
            dit = None
            if B.cuda:
                torch.cuda.empty_cache()
    else:
        dit = None
    if dit is None:
        dit = build_dit(cfg, B.device, dtype)
    B.sync()
    tokens = inputs["latents"].shape[2] * inputs["latents"].shape[3] * inputs["latents"].shape[4] // 4
    B.report["config"] = dict(
        model="Wan2.1-I2V-14B DiT" if not args.tiny else "tiny", params_b=sum(p.numel() for p in dit.parameters()) / 1e9,
        frames=args.frames, size=args.size, tokens=tokens, cfg_scale=args.cfg_scale, dtype="bf16",
        torch=torch.__version__, device=torch.cuda.get_device_name(B.device) if B.cuda else "cpu",
        build_s=time.time() - t, timesteps=args.timesteps,
    )
    print(json.dumps(B.report["config"]), flush=True)
    timesteps = [torch.tensor([float(s)], dtype=dtype, device=B.device) for s in args.timesteps.split(",")]
    shared = dict(clip_feature=inputs["clip_feature"], y=inputs["y"])

    def step_fn(batched, ts):
        def run():
            with torch.no_grad():
                return accel.cfg_noise_pred(model_fn_wan_video, dit, latents=inputs["latents"], timestep=ts,
                                            context_posi=inputs["context_posi"], context_nega=inputs["context_nega"],
                                            cfg_scale=args.cfg_scale, batched=batched, return_branches=True, **shared)
        return run

    reference: list[torch.Tensor] = []
    reference_cond: list[torch.Tensor] = []
    phases = args.phases.split(",") if args.phases != "all" else None

    def skipped(name):
        """True when ``name`` is not asked for, or the time budget is spent (recorded in the report)."""
        if phases and name not in phases:
            return True
        if time.time() - B.t0 > args.budget_s:
            B.report["phases"][name] = {"skipped": "time budget"}
            B.save()
            return True
        print(f"--- {name}", flush=True)
        return False

    def phase(name, batched, ctx=None):
        if skipped(name):
            return
        try:
            entry = {}
            outs, conds = [], []
            for i, ts in enumerate(timesteps):
                fn = step_fn(batched, ts)
                if ctx is not None:
                    fn0 = fn
                    fn = lambda fn0=fn0: _with(ctx, fn0)  # noqa: E731
                if i == 0:
                    (out, cond, _), timing = B.time_fn(fn, args.reps)
                    entry.update(timing)
                    if args.profile and name in args.profile.split(","):
                        entry["profile_top"] = profile(fn, name)
                else:
                    out, cond, _ = fn()
                outs.append(out.detach().clone())
                conds.append(cond.detach().clone())
            entry["finite"] = all(bool(torch.isfinite(o).all()) for o in outs)
            if truth:
                entry["cosine_vs_fp32"] = [cosine(o, r) for o, r in zip(outs, truth[0])]
                entry["cosine_cond_vs_fp32"] = [cosine(o, r) for o, r in zip(conds, truth[1])]
            if not reference:
                reference.extend(outs)
                reference_cond.extend(conds)
            else:
                entry["cosine_cond_vs_ref"] = [cosine(o, r) for o, r in zip(conds, reference_cond)]
                entry["cosine_vs_ref"] = [cosine(o, r) for o, r in zip(outs, reference)]
                entry["rel_err_vs_ref"] = [rel_err(o, r) for o, r in zip(outs, reference)]
                ref_s = B.report["phases"]["ref"]["step_s"]
                entry["speedup_vs_ref"] = ref_s / entry["step_s"]
            B.report["phases"][name] = entry
            print(json.dumps({name: {k: v for k, v in entry.items() if k != "step_all_s"}}), flush=True)
        except Exception as e:  # noqa: BLE001 - record and go on with the next lever
            B.report["phases"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            traceback.print_exc()
        B.save()

    def profile(fn, name):
        if not B.cuda:
            return None
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as pr:
            fn()
            B.sync()
        ka = pr.key_averages()
        key = "self_device_time_total" if hasattr(next(iter(ka)), "self_device_time_total") else "self_cuda_time_total"
        rows = sorted(ka, key=lambda e: getattr(e, key), reverse=True)[:30]
        total = sum(getattr(e, key) for e in ka)
        top = [dict(kernel=e.key[:110], ms=getattr(e, key) / 1000, calls=e.count) for e in rows]
        print(f"profile {name}: total GPU {total/1000:.1f} ms", flush=True)
        for r in top:
            print(f"  {r['ms']:9.2f} ms {r['calls']:5d}x  {r['kernel']}", flush=True)
        return dict(total_ms=total / 1000, top=top)

    def _with(ctx_factory, fn):
        with ctx_factory():
            return fn()

    def cudnn_ctx():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])

    if args.attn_micro and B.cuda:
        B.report["attention_micro"] = attention_micro(cfg, tokens, B)
        B.save()
    # 1. the reference: diffsynth untouched, two CFG passes, default SDPA.
    phase("ref", batched=False)
    if "ref" not in B.report["phases"] or "step_s" not in B.report["phases"]["ref"]:
        B.report["notes"].append("reference failed; stopping")
        B.save()
        return
    if B.cuda:
        phase("cudnn_attention", batched=False, ctx=cudnn_ctx)
    # 2. our block forward (real fp32 RoPE) with cuDNN attention, eager.
    attention = accel.sdpa_cudnn if (B.cuda and accel.cudnn_attention_supported(B.device)[0]) else accel.sdpa_default
    accel.patch_block_forwards(dit, attention=attention)
    phase("cudnn+fused_rope", batched=False)
    phase("cudnn+fused_rope+cfg_batch", batched=True)
    # 3. regional torch.compile of the block (bf16).
    compile_ok = B.cuda or args.compile_backend != "inductor"
    if compile_ok:
        accel.unpatch_block_forwards(dit)
        accel.patch_block_forwards(dit, attention=attention, compile_blocks=True, compile_backend=args.compile_backend)
        phase("cudnn+fused_rope+cfg_batch+compile", batched=True)

    # 3b. FP8 on growing sets of linears: which ones cost the drift.
    if args.fp8_subsets and accel.fp8_supported(B.device)[0]:
        done: list[str] = []
        for subset in args.fp8_subsets.split(";"):
            names = tuple(n.strip() for n in subset.split(",") if n.strip())
            done += names
            accel.unpatch_block_forwards(dit)
            accel.convert_blocks_to_fp8(dit, names=names)
            torch.cuda.empty_cache()
            accel.patch_block_forwards(dit, attention=attention, compile_blocks=True, compile_backend=args.compile_backend)
            label = f"compile+fp8[{'+'.join(done)}]"
            if phases is not None:
                phases.append(label)
            phase(label, batched=True)

    # 4. memory: bf16 weights streamed block-wise under a 24 GB cap.
    def capped(name, cap_gib, resident_fn):
        if not B.cuda and not (phases and name not in phases):
            B.report["phases"][name] = {"skipped": "memory caps need CUDA"}
            return
        if skipped(name):
            return
        off = None
        dev_index = B.device.index if B.device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(dev_index).total_memory
        try:
            torch.cuda.empty_cache()
            resident = resident_fn()
            t = time.time()
            off = offload.BlockOffloader(dit.blocks, B.device, resident=resident) if resident < len(dit.blocks) else None
            setup_s = time.time() - t
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(cap_gib * GiB / total, dev_index)
            (out, _, _), timing = B.time_fn(step_fn(True, timesteps[0]), args.reps)
            entry = dict(timing, cap_gib=cap_gib, resident_blocks=resident, streamed_blocks=len(dit.blocks) - resident,
                         offload_setup_s=setup_s, cosine_vs_ref=[cosine(out, reference[0])],
                         speedup_vs_ref=B.report["phases"]["ref"]["step_s"] / timing["step_s"])
            B.report["phases"][name] = entry
            print(json.dumps({name: {k: v for k, v in entry.items() if k != "step_all_s"}}), flush=True)
        except Exception as e:  # noqa: BLE001
            B.report["phases"][name] = {"error": f"{type(e).__name__}: {e}"[:2000], "cap_gib": cap_gib}
            traceback.print_exc()
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, dev_index)
            if off is not None:
                off.close(restore_to=B.device)
            torch.cuda.empty_cache()
        B.save()

    def resident_for(cap_gib, act_phase):
        def fn():
            block_bytes = sum(offload.module_bytes(b) for b in dit.blocks)
            weights = sum(p.numel() * p.element_size() for p in dit.parameters()) + sum(
                b.numel() * b.element_size() for b in dit.buffers())
            other = weights - block_bytes
            act = B.report["phases"].get(act_phase, {}).get("peak_alloc_gib")
            act_bytes = (act * GiB - weights) if act else 4 * GiB
            budget = cap_gib * GiB - other - act_bytes - 1.0 * GiB  # 1 GiB margin for workspaces/fragmentation
            return offload.blocks_that_fit(list(dit.blocks), int(budget))
        return fn

    compiled_bf16 = "cudnn+fused_rope+cfg_batch+compile"
    if B.cuda:
        capped("bf16_offload_24gb", 24 if not args.tiny else 1, resident_for(24 if not args.tiny else 1, compiled_bf16))

    # 5. FP8 linears: eager blocks with compiled quantisation, then everything compiled (= ours).
    ok, why = accel.fp8_supported(B.device)
    if ok:
        accel.unpatch_block_forwards(dit)
        n = accel.convert_blocks_to_fp8(dit, names=("ffn.0", "ffn.2"))
        torch.cuda.empty_cache()
        accel.patch_block_forwards(dit, attention=attention, compile_blocks=True, compile_backend=args.compile_backend)
        phase("cudnn+fused_rope+cfg_batch+compile+fp8(FFN only)", batched=True)
        accel.unpatch_block_forwards(dit)
        n += accel.convert_blocks_to_fp8(dit)
        torch.cuda.empty_cache()
        B.report["notes"].append(f"fp8: converted {n} linears")
        accel.patch_block_forwards(dit, attention=attention)
        phase("cudnn+fused_rope+cfg_batch+fp8(eager, compiled quant)", batched=True)
        accel.unpatch_block_forwards(dit)
        accel.patch_block_forwards(dit, attention=attention, compile_blocks=True, compile_backend=args.compile_backend,
                                   pair=False)
        phase("ours: cudnn+fused_rope+cfg_batch+compile+fp8", batched=True)
        ours = "ours: cudnn+fused_rope+cfg_batch+compile+fp8"
        # the per-branch CFG-pair block forward (ex4d/generate/pair_block.py): torch code, then its Triton kernels
        from ex4d.generate import pair_block

        B.report["pair_kernel_parity"] = pair_kernel_parity(B.device)
        print(json.dumps({"pair_kernel_parity": B.report["pair_kernel_parity"]}), flush=True)
        for name, fused in (("ours + pair_block", False), ("ours + pair_block + kernels", True)):
            pair_block.FUSED_KERNELS = fused
            accel.unpatch_block_forwards(dit)
            accel.patch_block_forwards(dit, attention=attention, compile_blocks=True,
                                       compile_backend=args.compile_backend)
            phase(name, batched=True)
        accel.set_fast_accum(dit)  # fast FP8 accumulation where the sums are short (accel.FAST_ACCUM_MAX_K)
        phase("ours + pair_block + kernels + fast_accum", batched=True)
        accel.set_fast_accum(dit, on=False)
        accel.unpatch_block_forwards(dit)
        accel.patch_block_forwards(dit, attention=attention, compile_blocks=True, compile_backend=args.compile_backend,
                                   pair=False)
        # A/B: the CFG pair quantised as two independent rows (before Fp8Linear._forward_pair).
        accel.set_cfg_pair_delta(dit, False)
        phase("ours fp8 without CFG-pair delta", batched=True)
        accel.set_cfg_pair_delta(dit, True)
        # + FP8 self-attention (cuDNN's fused FP8 kernel through nvidia-cudnn-frontend).
        from ex4d.generate import fp8_attention

        ok8, why8 = fp8_attention.fp8_attention_supported(B.device)
        if ok8:
            accel.unpatch_block_forwards(dit)
            accel.patch_block_forwards(dit, attention=attention, compile_blocks=True, compile_backend=args.compile_backend,
                                       self_attention=fp8_attention.sdpa_fp8, pair=False)
            phase("ours + fp8_attention", batched=True)
            for name, fused in (("ours + fp8_attention + pair_block", False),
                                ("ours + fp8_attention + pair_block + kernels", True)):
                pair_block.FUSED_KERNELS = fused
                accel.unpatch_block_forwards(dit)
                accel.patch_block_forwards(dit, attention=attention, compile_blocks=True,
                                           compile_backend=args.compile_backend, self_attention=fp8_attention.sdpa_fp8)
                phase(name, batched=True)
            accel.set_fast_accum(dit)
            phase("ours + fp8_attention + pair_block + kernels + fast_accum", batched=True)
            accel.set_fast_accum(dit, on=False)
            accel.unpatch_block_forwards(dit)
            accel.patch_block_forwards(dit, attention=attention, compile_blocks=True, compile_backend=args.compile_backend)
        else:
            B.report["phases"]["ours + fp8_attention"] = {"skipped": why8}
            print(f"notice: fp8_attention skipped: {why8}", flush=True)
        capped("fp8_resident_24gb", 24, lambda: len(dit.blocks))
        capped("fp8_offload_16gb", 16, resident_for(16, ours))
        capped("fp8_offload_12gb", 12, resident_for(12, ours))
    else:
        B.report["phases"]["fp8"] = {"skipped": why}
        print(f"notice: fp8 skipped: {why}", flush=True)
    if B.cuda:
        try:
            from torch._dynamo.utils import counters

            B.report["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break")}
        except Exception:  # noqa: BLE001
            pass
    B.report["total_s"] = time.time() - B.t0
    B.save()
    rows = [(k, v.get("step_s"), v.get("speedup_vs_ref"), min(v["cosine_vs_ref"]) if "cosine_vs_ref" in v else None,
             v.get("peak_alloc_gib"), v.get("error", v.get("skipped", ""))[:60] if ("error" in v or "skipped" in v) else "")
            for k, v in B.report["phases"].items()]
    print(f"{'phase':52s} {'s/step':>8s} {'x ref':>6s} {'cos':>8s} {'GiB':>6s}")
    for name, s, x, c, m, err in rows:
        f = lambda v, fmt: (fmt % v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else "-"  # noqa: E731
        print(f"{name:52s} {f(s, '%8.3f')} {f(x, '%6.2f')} {f(c, '%8.5f')} {f(m, '%6.1f')} {err}")


if __name__ == "__main__":
    main()
