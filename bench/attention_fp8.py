"""cuDNN FP8 attention vs cuDNN bf16 attention at the DiT's self-attention shape (GPU).

Shape: batch 2 (both CFG branches), 40 heads, 13,312 tokens (512x512x49), head dim 128, q/k/v as the
block makes them (a (b, s, n, d) buffer seen as (b, n, s, d)). Reports ms per call (CUDA events, median
of 20), TFLOP/s, and the error of each kernel against an fp32 attention of the same inputs at two
attention sharpnesses (logit standard deviation 1 and 4).

    python bench/attention_fp8.py --out $OUT/attention_fp8.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ex4d.generate import accel, fp8_attention  # noqa: E402


def time_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=13312)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "attention_fp8.json"))
    args = p.parse_args()
    dev = torch.device("cuda")
    ok, why = fp8_attention.fp8_attention_supported(dev)
    report = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "supported": ok, "why": why,
              "shape": [args.batch, args.heads, args.tokens, 128]}
    print(json.dumps(report), flush=True)
    flops = 4 * args.batch * args.heads * args.tokens**2 * 128
    g = torch.Generator(device=dev).manual_seed(0)
    for sharp in (1.0, 4.0):
        # unit-RMS q/k (as after RMSNorm) scaled so q.k / sqrt(d) has standard deviation `sharp`
        def r():
            return torch.randn(args.batch, args.tokens, args.heads, 128, device=dev, generator=g)
        q, k, v = r() * sharp**0.5, r() * sharp**0.5, r()
        qb, kb, vb = (t.bfloat16().transpose(1, 2) for t in (q, k, v))
        with torch.no_grad():
            ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
                q[i:i + 1].transpose(1, 2), k[i:i + 1].transpose(1, 2), v[i:i + 1].transpose(1, 2))
                for i in range(args.batch)])
            entry = {}
            for name, fn in (("cudnn_bf16", lambda: accel.sdpa_cudnn(qb, kb, vb)),
                             ("cudnn_fp8_with_quantisation", lambda: fp8_attention.sdpa_fp8(qb, kb, vb))):
                if name.startswith("cudnn_fp8") and not ok:
                    entry[name] = {"skipped": why}
                    continue
                try:
                    out = fn()
                    err = float((out.float() - ref).norm() / ref.norm())
                    cos = float(torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0))
                    ms = time_ms(fn)
                    entry[name] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "rel_err_vs_fp32": err,
                                   "cosine_vs_fp32": cos}
                except Exception as e:  # noqa: BLE001
                    entry[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            if ok:
                q8, sq = fp8_attention.quantize_tensor_fp8(qb)
                k8, sk = fp8_attention.quantize_tensor_fp8(kb)
                v8, sv = fp8_attention.quantize_tensor_fp8(vb)
                ms = time_ms(lambda: fp8_attention._cudnn_sdpa_fp8(q8, k8, v8, sq, sk, sv, 1.0 / sv))
                entry["cudnn_fp8_kernel_only"] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}
        report[f"logit_std_{sharp:g}"] = entry
        print(json.dumps({f"logit_std_{sharp:g}": entry}), flush=True)
        del q, k, v, qb, kb, vb, ref
        torch.cuda.empty_cache()
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
