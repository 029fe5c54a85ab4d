"""Launch configurations of the CFG-pair Triton kernels (ex4d/generate/pair_kernels.py) at the model's shapes (GPU).

Each kernel at 512x512x49 (13,312 tokens per branch; D = 5120, FFN width 13,824) for every combination of
walk chunk, warps per program and programs per SM (None: one program per token; a number: a grid-stride
grid). Reports microseconds per call (CUDA events, median of 20), the effective bandwidth of the bytes the
kernel must move (inputs read once, outputs written once), the best configuration per kernel, and whether
its output equals the default configuration's (e4m3 codes and scales).

    python bench/pair_kernels_gpu.py --out $OUT/pair_kernels.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.attention_fp8 import time_ms  # noqa: E402
from ex4d.generate import pair_kernels as pk  # noqa: E402


def cases(s, d, f, dev):
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).bfloat16()

    x0 = r(s, d, scale=3.0)
    x1 = (x0.float() + 0.05 * torch.randn(s, d, device=dev, generator=g)).bfloat16()
    w = (1 + 0.3 * torch.randn(2, d, device=dev, generator=g)).contiguous()
    b = (0.1 * torch.randn(2, d, device=dev, generator=g)).contiguous()
    y_ffn, bias_ffn = r(2 * s, f), r(f, scale=0.1)
    y_qk, bias_qk, w_qk = r(2 * s, d), r(d, scale=0.1), (1 + 0.2 * torch.randn(d, device=dev, generator=g)).bfloat16()
    ang = torch.rand(s, 64, device=dev, generator=g) * 6
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    scale = torch.tensor([d**0.5 * float(w_qk.float().abs().max()) / 448], device=dev)
    io_ln = 2 * s * d * 2 + 2 * s * d
    return {
        "ln": ("ln", lambda: pk.launch_ln_pair_quant(x0, x1, w, b, 1e-6), io_ln),
        "pair": ("ln", lambda: pk.launch_ln_pair_quant(x0, x1, w, b, 0.0, norm=False), io_ln),
        "gelu": ("gelu", lambda: pk.launch_gelu_pair_quant(y_ffn, bias_ffn), 2 * s * f * 2 + 2 * s * f),
        "rms_rope_fp8": ("rms_rope", lambda: pk.launch_rms_rope_pair(y_qk, bias_qk, w_qk, cos, sin, 1e-6, scale),
                         2 * s * d * 2 + 2 * s * d),
        "rms_rope_bf16": ("rms_rope", lambda: pk.launch_rms_rope_pair(y_qk, bias_qk, w_qk, cos, sin, 1e-6, None),
                          2 * s * d * 2 + 2 * s * d * 2),
    }


def same(a, b) -> float:
    """Share of equal output values (tuples compared element by element)."""
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return min(float((x.float() == y.float()).float().mean()) for x, y in zip(a, b))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=13312)
    p.add_argument("--chunks", default="1024,2048,4096")
    p.add_argument("--warps", default="4,8,16")
    p.add_argument("--programs-per-sm", default="none,2,4,8,16")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "pair_kernels.json"))
    args = p.parse_args()
    dev = torch.device("cuda")
    default = dict(pk.LAUNCH)
    grid = [pk.Launch(c, w, None if n == "none" else int(n))
            for c, w, n in itertools.product([int(c) for c in args.chunks.split(",")],
                                             [int(w) for w in args.warps.split(",")], args.programs_per_sm.split(","))]
    report = {"device": torch.cuda.get_device_name(dev), "sms": torch.cuda.get_device_properties(dev).multi_processor_count,
              "default": {k: vars(v) for k, v in default.items()}, "kernels": {}}
    for name, (slot, fn, nbytes) in cases(args.tokens, 5120, 13824, dev).items():
        pk.LAUNCH = dict(default)
        ref = fn()
        rows = []
        for cfg in grid:
            pk.LAUNCH = dict(default, **{slot: cfg})
            try:
                out = fn()
                us = time_ms(fn) * 1000
                rows.append({**vars(cfg), "us": round(us, 1), "tb_per_s": round(nbytes / us / 1e6, 2),
                             "equal_to_default": round(same(out, ref), 6)})
            except Exception as e:  # noqa: BLE001
                rows.append({**vars(cfg), "error": f"{type(e).__name__}: {str(e)[:200]}"})
        timed = [r for r in rows if "us" in r]
        best = min(timed, key=lambda r: r["us"])
        base = next(r for r in timed if (r["chunk"], r["warps"], r["programs_per_sm"]) ==
                    (default[slot].chunk, default[slot].warps, default[slot].programs_per_sm))
        report["kernels"][name] = {"bytes": nbytes, "default": base, "best": best, "all": rows}
        print(name, "default", json.dumps(base), "best", json.dumps(best), flush=True)
    pk.LAUNCH = default
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
