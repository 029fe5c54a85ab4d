"""The Wan VAE's encode and decode at EX-4D's shape (49 frames of 512x512) under each speed lever (GPU).

Full-size random weights (WanVideoVAE, dim 96), bf16, not tiled. Variants, measured in this order (each
lever stays on for the next): the release's call (``WanVideoVAE.encode``/``decode``: one video at a time,
staged through host memory); the network called directly on the GPU tensor; cuDNN autotuning
(``torch.backends.cudnn.benchmark``); channels-last-3d weights and activations; the three encodes of a
shot (frame 0 + zeros, masked colour, mask) as one batch of 3; ``torch.compile`` of the encoder and
decoder. Each row: seconds per video (median of 3), peak GPU memory, and the output's relative error
against the release's call.

    python bench/vae_gpu.py --out $OUT/vae.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.geometry_gpu import timed  # noqa: E402
from ex4d.generate.architectures import ARCHITECTURES  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn, reps=3):
    """Median wall seconds of ``fn`` (after one warm-up call), the GPU synchronised around each."""
    return timed(fn, reps, sync) / 1000


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--tiny", action="store_true", help="tiny VAE on CPU (smoke test)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "vae.json"))
    args = p.parse_args()
    dev = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    arch = ARCHITECTURES["tiny" if args.tiny else "i2v-14b"]
    # Only the VAE is needed: build it alone (the DiT would take minutes and 33 GB).
    from ex4d.generate.architectures import make_vae

    torch.manual_seed(0)
    with torch.device(dev), torch.no_grad():
        vae = make_vae(arch).to(device=dev, dtype=dtype).eval().requires_grad_(False)
    g = torch.Generator(device=dev).manual_seed(0)
    videos = torch.rand(3, 3, args.frames, args.size, args.size, device=dev, generator=g, dtype=dtype) * 2 - 1
    videos[0, :, 1:] = 0  # the image condition: frame 0, then zeros
    latent = torch.randn(1, 16, (args.frames - 1) // 4 + 1, args.size // 8, args.size // 8, device=dev, generator=g,
                         dtype=dtype)
    scale = vae.scale
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "shape": [args.frames, args.size, args.size], "dtype": str(dtype), "variants": {}}

    def write():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    with torch.no_grad():
        ref_enc = vae.encode([videos[1]], device=dev)[0]
        ref_dec = vae.decode([latent[0]], device=dev)[0]

        def rel(a, b):
            return float((a.float() - b.float()).norm() / b.float().norm())

        def record(name, enc_fn, dec_fn, batch=1):
            try:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                e = enc_fn()
                d = dec_fn()
                enc_video = e[1] if batch == 3 else e[0]
                row = {"encode_s_per_video": round(seconds(enc_fn) / batch, 4), "decode_s": round(seconds(dec_fn), 4),
                       "encode_rel_err": rel(enc_video, ref_enc), "decode_rel_err": rel(d[0], ref_dec)}
                if dev.type == "cuda":
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            except Exception as e:  # noqa: BLE001
                row = {"error": f"{type(e).__name__}: {str(e)[:600]}", "trace": traceback.format_exc()[-1500:]}
            report["variants"][name] = row
            print(name, json.dumps(row), flush=True)
            write()

        one = videos[1:2]
        record("release_call", lambda: vae.encode([videos[1]], device=dev), lambda: vae.decode([latent[0]], device=dev))
        model = vae.model
        record("direct", lambda: model.encode(one, scale), lambda: model.decode(latent, scale).clamp_(-1, 1))
        torch.backends.cudnn.benchmark = True
        record("direct+cudnn_benchmark", lambda: model.encode(one, scale),
               lambda: model.decode(latent, scale).clamp_(-1, 1))
        record("batch3+cudnn_benchmark", lambda: model.encode(videos, scale),
               lambda: model.decode(latent, scale).clamp_(-1, 1), batch=3)
        conv3d = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]

        def conv_format(fmt):
            for m in conv3d:
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)

        conv_format(torch.channels_last_3d)
        one_cl = one.contiguous(memory_format=torch.channels_last_3d)
        lat_cl = latent.contiguous(memory_format=torch.channels_last_3d)
        record("channels_last+cudnn_benchmark", lambda: model.encode(one_cl, scale),
               lambda: model.decode(lat_cl, scale).clamp_(-1, 1))
        conv_format(torch.contiguous_format)
        model.encoder = torch.compile(model.encoder)
        model.decoder = torch.compile(model.decoder)
        record("compiled+cudnn_benchmark", lambda: model.encode(one, scale),
               lambda: model.decode(latent, scale).clamp_(-1, 1))
        record("compiled+batch3+cudnn_benchmark", lambda: model.encode(videos, scale),
               lambda: model.decode(latent, scale).clamp_(-1, 1), batch=3)
    write()


if __name__ == "__main__":
    main()
