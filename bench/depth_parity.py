"""Numerical parity of our depth models with the public releases' own code (a developer check).

The releases' code is NOT part of this project: point this script at local checkouts of
github.com/DepthAnything/Video-Depth-Anything and github.com/Tencent/DepthCrafter; it imports them from
there (Video-Depth-Anything needs ``easydict``; a two-line stand-in is created in a temp folder if it
is missing). Both sides get the same random weights (tiny DepthCrafter components; the full-size
Video Depth Anything Small network), and the outputs are compared:

* Video Depth Anything: the release's ``VideoDepthAnything(vits)`` state dict is saved as
  ``video_depth_anything_vits.pth`` and loaded through OUR loader (key conversion), then one forward
  pass and the full windowed recipe (``infer_video_depth``) are compared;
* DepthCrafter: the release's ``DepthCrafterPipeline`` + UNet subclass vs ours, with window
  stitching (window 4 / overlap 2), a single window, and guidance > 1.

    python bench/depth_parity.py --vda-repo ~/src/Video-Depth-Anything --depthcrafter-repo ~/src/DepthCrafter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def vda_parity(repo: str) -> dict:
    import torch

    from ex4d.depth.models import load_depth_model

    shim = tempfile.mkdtemp()
    try:
        import easydict  # noqa: F401
    except ImportError:
        with open(os.path.join(shim, "easydict.py"), "w") as f:
            f.write("class EasyDict(dict):\n    def __getattr__(self, k):\n        return self[k]\n")
    sys.path[:0] = [repo, shim]
    from video_depth_anything.video_depth import VideoDepthAnything as Release

    torch.manual_seed(0)
    release = Release(encoder="vits", features=64, out_channels=[48, 96, 192, 384]).eval()
    with torch.no_grad():  # the motion modules' output layers are zero-initialised; make them count
        for name, p in release.named_parameters():
            if "proj_out" in name:
                p.normal_(0, 0.02)
    folder = tempfile.mkdtemp()
    torch.save(release.state_dict(), os.path.join(folder, "video_depth_anything_vits.pth"))
    ours = load_depth_model("video-depth-anything-small", folder, device="cpu", dtype="fp32", input_size=84)
    x = torch.randn(1, 32, 3, 84, 112)
    with torch.no_grad():
        forward_diff = float((release(x) - ours.network(x)).abs().max())
    frames = np.random.RandomState(0).randint(0, 255, (40, 60, 80, 3), np.uint8)
    expected, _ = release.infer_video_depth(frames, 30, input_size=84, device="cpu", fp32=True)
    got, info = ours._predict_disparity(frames)
    return {"forward_max_abs_diff": forward_diff, "recipe_max_abs_diff": float(np.abs(expected - got).max()),
            "recipe_value_range": [float(expected.min()), float(expected.max())], "frames": 40, "windows": info["windows"]}


def depthcrafter_parity(repo: str) -> list:
    import torch
    from transformers import CLIPImageProcessor

    from ex4d.depth.models.depthcrafter import DepthCrafter, DepthCrafterSettings, tiny_configs

    sys.path.insert(0, repo)
    from depthcrafter.depth_crafter_ppl import DepthCrafterPipeline
    from depthcrafter.unet import DiffusersUNetSpatioTemporalConditionModelDepthCrafter as ReleaseUNet

    cfg = tiny_configs()
    results = []
    for window, overlap, count, guidance in [(4, 2, 7, 1.0), (110, 25, 5, 1.0), (4, 2, 6, 1.5)]:
        settings = DepthCrafterSettings(window_size=window, overlap=overlap, guidance_scale=guidance)
        ours = DepthCrafter.build_random(cfg, device="cpu", dtype="fp32", settings=settings)
        unet = ReleaseUNet(**cfg["unet"])
        unet.load_state_dict(ours.unet.state_dict())
        fe = cfg["feature_extractor"]
        pipe = DepthCrafterPipeline(vae=ours.vae, image_encoder=ours.image_encoder, unet=unet, scheduler=ours.scheduler,
                                    feature_extractor=CLIPImageProcessor(image_mean=fe["image_mean"], image_std=fe["image_std"]))
        pipe.set_progress_bar_config(disable=True)
        frames = np.random.RandomState(0).randint(0, 255, (count, 48, 64, 3), np.uint8)
        torch.manual_seed(42)  # the release seeds the global generator (set_seed(42))
        with torch.inference_mode():
            out = pipe(frames.astype(np.float32) / 255.0, height=48, width=64, output_type="np", guidance_scale=guidance,
                       num_inference_steps=5, window_size=window, overlap=overlap).frames[0]
        expected = out.sum(-1) / out.shape[-1]
        got, _ = ours._predict_disparity(frames)
        results.append({"window": window, "overlap": overlap, "frames": count, "guidance": guidance,
                        "max_abs_diff": float(np.abs(expected - got).max()),
                        "value_range": [float(expected.min()), float(expected.max())]})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vda-repo", help="checkout of DepthAnything/Video-Depth-Anything")
    parser.add_argument("--depthcrafter-repo", help="checkout of Tencent/DepthCrafter")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    report = {}
    if args.vda_repo:
        report["video-depth-anything-small"] = vda_parity(os.path.expanduser(args.vda_repo))
    if args.depthcrafter_repo:
        report["depthcrafter"] = depthcrafter_parity(os.path.expanduser(args.depthcrafter_repo))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
