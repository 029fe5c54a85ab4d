"""Row-wise-scaled FP8 GEMMs at the DiT's shapes: precise vs fast accumulation (GPU).

The three GEMM shapes of a Wan2.1-14B block with both CFG branches batched at 512x512x49 (M = 2 x 13,312
tokens): q/k/v/o and cross-attention q/o (5120 -> 5120), FFN up (5120 -> 13824), FFN down (13824 -> 5120).
For each, ``torch._scaled_mm`` with per-row activation and per-column weight scales, with and without
``use_fast_accum`` (Hopper's FP8 tensor cores accumulate in reduced precision unless partial sums are
promoted to fp32 every few k-steps; fast accumulation skips that promotion). Reports ms (CUDA events,
median of 20), TFLOP/s and the relative error of each against an fp32 GEMM of the same e4m3 operands,
so the error shown is the accumulation's own.

    python bench/fp8_gemm_gpu.py --out $OUT/fp8_gemm.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.attention_fp8 import time_ms  # noqa: E402
from ex4d.generate.accel import FP8_MAX, quantize_rows_fp8  # noqa: E402

SHAPES = {"dim_to_dim": (5120, 5120), "ffn_up": (5120, 13824), "ffn_down": (13824, 5120)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2 * 13312)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "fp8_gemm.json"))
    args = p.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    report = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "tokens": args.tokens, "shapes": {}}
    for name, (k, n) in SHAPES.items():
        x = torch.randn(args.tokens, k, device=dev, generator=g, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) * k**-0.5
        xq, xs = quantize_rows_fp8(x)
        ws = w.abs().amax(dim=1, keepdim=True).float() / FP8_MAX
        wq = (w.float() / ws).to(torch.float8_e4m3fn)
        exact = (xq.float() * xs) @ (wq.float() * ws).t()
        entry = {}
        for fast in (False, True):
            def gemm(fast=fast):
                return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)
            err = float((gemm().float() - exact).norm() / exact.norm())
            ms = time_ms(gemm)
            entry["fast_accum" if fast else "precise_accum"] = {
                "ms": round(ms, 3), "tflops": round(2 * args.tokens * k * n / ms / 1e9, 1), "rel_err_vs_fp32": err}
        entry["speedup"] = round(entry["precise_accum"]["ms"] / entry["fast_accum"]["ms"], 3)
        report["shapes"][name] = entry
        print(name, json.dumps(entry), flush=True)
        del x, w, xq, wq, exact
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
