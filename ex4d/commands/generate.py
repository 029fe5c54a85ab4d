"""``ex4d generate``: fill a guide video (colour + validity mask) into a finished shot.

Only the parser is built at import time; numpy/torch/diffsynth are imported inside :func:`cmd_generate`.
"""

from __future__ import annotations

import argparse
import sys

from ..generate.settings import SPEEDS


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="colour guide + mask video -> generated shot (draft | ex4d | tiny)",
        description="Fill the holes of a guide render (color_<name>.mp4 + mask_<name>.mp4, or a render_<name>.npz) "
        "with a generator: 'ex4d' (Wan2.1-I2V-14B-480P + the EX-4D adapter, local weights), 'draft' (classical "
        "fill on the CPU) or 'tiny' (random test model). Defaults follow the EX-4D release (25 steps, CFG 5, "
        "seed 0, its fixed prompt).",
    )
    src = p.add_argument_group("input (either both videos or one guides .npz)")
    src.add_argument("--color-video", metavar="MP4", help="colour guide video (holes may be any colour)")
    src.add_argument("--mask-video", metavar="MP4", help="mask video, white = valid guide pixel, black = to generate")
    src.add_argument("--guides", metavar="NPZ", help="render_<name>.npz with 'color' (T,H,W,3) uint8 and 'mask' (T,H,W) bool (lossless)")
    p.add_argument("--out", required=True, metavar="MP4", help="output video (written atomically)")
    p.add_argument("--generator", default="ex4d", choices=("ex4d", "draft", "tiny"), help="default ex4d")
    p.add_argument("--models", metavar="DIR", help="weights folder laid out as the releases (default $EX4D_MODELS or ./models)")
    add_generator_options(p, memory_default="resident")
    p.add_argument("--device", help="torch device (default cuda when available, else cpu)")
    p.add_argument("--prompt", help="text prompt (default: the release's fixed prompt)")
    p.add_argument("--steps", type=int, help="denoising steps (default 25)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed: noise and mask erosion (default 0)")
    p.add_argument("--frames", type=int, metavar="N", help="use only the first N frames")
    p.add_argument("--size", metavar="WxH", help="resize the guides to this size first, even numbers (the release uses 512x512)")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="mask pixels brighter than this share of white count as valid, 0 <= T < 1 (default 0.5, the release's)")
    p.add_argument("--strict-mask", action="store_true", help="refuse a mask video that is not strictly black/white")
    p.add_argument("--fps", type=float, help="output frame rate (default: the colour video's, or the one the .npz stores; 15 for an .npz without one)")
    p.set_defaults(func=cmd_generate)


MEMORY_MODE_HELP = ("how the ex4d generator uses GPU memory: resident (everything on the GPU, ~40-48 GB), "
                    "stream (DiT blocks that do not fit --vram-limit stream from pinned CPU memory: 24 GB and 16 GB "
                    "cards at about resident speed), fp8 (DiT weights stored in FP8, ~35 GB), offload (diffsynth "
                    "moves every layer from CPU memory; slowest)")


def add_generator_options(p, memory_default=None) -> None:
    """--memory-mode, --vram-limit, --speed, --preview-cache: shared by generate, run and serve."""
    p.add_argument("--memory-mode", default=memory_default, choices=("resident", "stream", "fp8", "offload"),
                   help=MEMORY_MODE_HELP + (f" (default {memory_default})" if memory_default else " (default resident)"))
    p.add_argument("--vram-limit", type=float, metavar="GB",
                   help="GPU memory budget in GiB for --memory-mode stream (default: the card less 1 GiB) or "
                   "offload; e.g. 22 on a 24 GB card that also drives a display")
    p.add_argument("--speed", default="fast", choices=SPEEDS,
                   help="fast (default): cuDNN attention, FP8 matmuls, torch.compile and batched CFG where the GPU "
                   "allows (about 2x the release per shot; the first shot of a process compiles for ~20 s); "
                   "fastest: fast + FP8 self-attention (cuDNN; needs nvidia-cudnn-frontend; about 10%% faster, "
                   "try it on a shot before a final); reference: the release's configuration")
    p.add_argument("--preview-cache", type=float, default=0.0, metavar="THRESH",
                   help="fast preview: skip DiT forwards while the timestep embedding barely changes (TeaCache-style; "
                   "0 = off, the default; 0.1-0.3 for previews). Lower quality: not for finals")


def generator_kwargs(args) -> dict:
    """load_generator keyword arguments from add_generator_options' flags (only those given)."""
    kwargs = {"speed": getattr(args, "speed", "fast"), "preview_cache": getattr(args, "preview_cache", 0.0) or 0.0}
    if getattr(args, "memory_mode", None):
        kwargs["memory_mode"] = args.memory_mode
    if getattr(args, "vram_limit", None) is not None:
        kwargs["vram_limit_gb"] = args.vram_limit
    return kwargs


def print_generation_summary(meta: dict | None) -> None:
    """One line on stderr from ``Ex4dGenerator.metadata()``: memory mode, speed levers, preview-cache skips."""
    if not meta:
        return
    run = meta.get("last_run") or {}
    levers = (meta.get("levers") or {}).get("levers") or []
    parts = [f"memory mode {meta['memory_mode']}", f"speed {meta['speed']}" + (f" ({', '.join(levers)})" if levers else "")]
    plan = meta.get("stream_plan")
    if plan and plan.get("streamed_blocks"):
        parts.append(f"{plan['streamed_blocks']} of {plan['resident_blocks'] + plan['streamed_blocks']} DiT blocks streamed")
    cache = run.get("preview_cache")
    if cache:
        parts.append(f"preview cache {cache['threshold']:g}: skipped {cache['skipped_forwards']} of {cache['forwards']} "
                     f"DiT forwards ({len(cache['skipped_steps'])} of {cache['steps']} steps)")
    print("generation: " + "; ".join(parts), file=sys.stderr)


def parse_size(text: str) -> tuple[int, int]:
    from ..errors import InputError

    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--size must look like 512x512, got {text!r}") from None
    if w < 16 or h < 16:
        raise InputError(f"--size must be at least 16x16, got {text}")
    if w % 2 or h % 2:  # H.264 yuv420p: the encoder would pad to the next even size
        raise InputError(f"--size {w}x{h}: width and height must be even numbers (H.264 yuv420p), e.g. {w - w % 2}x{h - h % 2}")
    return w, h


NPZ_DEFAULT_FPS = 15.0  # the release's rate; only for guides files written before they stored theirs


def read_guides_npz(path: str, mask_threshold: float, strict_mask: bool) -> tuple:
    """-> (colour, mask, fps or None) from a render_<name>.npz; any unreadable file is one InputError."""
    import zipfile
    import zlib

    import numpy as np

    from ..errors import InputError
    from ..generate.conditioning import mask_from_gray

    try:
        with np.load(path) as data:
            missing = [k for k in ("color", "mask") if k not in data.files]
            if missing:  # e.g. a depth.npz given by mistake
                raise InputError(f"--guides {path}: not a guides file (no {' or '.join(repr(k) for k in missing)} "
                                 "array; render_<name>.npz from ex4d recon has 'color' and 'mask')")
            color, mask = np.asarray(data["color"]), np.asarray(data["mask"])
            fps = float(data["fps"]) if "fps" in data.files else None
    except FileNotFoundError:
        raise InputError(f"--guides {path}: file not found") from None
    except (zipfile.BadZipFile, zlib.error, EOFError):
        raise InputError(f"--guides {path}: not a complete .npz file (truncated or corrupt)") from None
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"--guides {path}: cannot read it ({e})") from None
    if fps is not None and not (np.isfinite(fps) and fps > 0):
        fps = None
    if mask.dtype != np.bool_:
        mask = mask_from_gray(mask, mask_threshold, strict_mask)
    return color, mask, fps


def load_guides(args) -> tuple:
    """-> (colour (T,H,W,3) uint8, mask (T,H,W) bool, fps) from the arguments, checked."""
    import warnings

    import numpy as np

    from ..errors import InputError
    from ..generate.conditioning import mask_from_gray
    from ..video import read_video

    if args.guides:
        if args.color_video or args.mask_video:
            raise InputError("give either --guides or --color-video with --mask-video, not both")
        color, mask, fps = read_guides_npz(args.guides, args.mask_threshold, args.strict_mask)
        if fps is None:
            fps = NPZ_DEFAULT_FPS
            if getattr(args, "fps", None) is None:
                warnings.warn(f"{args.guides} stores no frame rate (written by an older ex4d); writing "
                              f"{NPZ_DEFAULT_FPS:g} fps: pass --fps to match the source")
    else:
        if not (args.color_video and args.mask_video):
            raise InputError("give --color-video and --mask-video (or --guides NPZ)")
        colour_video = read_video(args.color_video)
        mask_video = read_video(args.mask_video)
        color, fps = colour_video.frames, colour_video.fps
        if mask_video.frames.shape[0] != color.shape[0]:
            raise InputError(f"the colour video has {color.shape[0]} frames but the mask video has {mask_video.frames.shape[0]}")
        if mask_video.frames.shape[1:3] != color.shape[1:3]:
            (h, w), (mh, mw) = color.shape[1:3], mask_video.frames.shape[1:3]
            raise InputError(f"the colour video is {w}x{h} but the mask video is {mw}x{mh}")
        mask = mask_from_gray(mask_video.frames, args.mask_threshold, args.strict_mask)
    if args.frames is not None:
        if args.frames < 1:
            raise InputError(f"--frames must be at least 1, got {args.frames}")
        if args.frames > color.shape[0]:
            raise InputError(f"--frames {args.frames} asks for more frames than the guides have ({color.shape[0]})")
        color, mask = color[: args.frames], mask[: args.frames]
    if color.dtype != np.uint8 or color.ndim != 4 or color.shape[-1] != 3:
        raise InputError(f"colour guides must be uint8 (T,H,W,3), got {color.dtype} {color.shape}")
    if mask.shape != color.shape[:3]:
        raise InputError(f"mask {mask.shape} does not match the colour guides {color.shape[:3]}")
    if args.size:
        import cv2

        w, h = parse_size(args.size)
        color = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in color])
        mask = np.stack([cv2.resize(f.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) for f in mask]) > 0
    check_mask_coverage(mask, args.guides or args.mask_video, args.mask_threshold)
    return np.ascontiguousarray(color), np.ascontiguousarray(mask), fps


MOSTLY_EMPTY_MASK = 0.01  # below this share of valid guide pixels the shot is nearly all invented: say so


def check_mask_coverage(mask, source: str, threshold: float) -> None:
    """A mask with no valid pixel makes an all-generated (with draft: black) shot from nothing: that is a
    wrong threshold or the wrong file, not a shot anyone wants. A nearly empty one gets a warning."""
    import warnings

    from ..errors import InputError

    valid = float(mask.mean()) if mask.size else 0.0
    if valid == 0.0:
        raise InputError(
            f"{source}: no valid guide pixel in any frame (the mask is all black); check --mask-threshold "
            f"({threshold:g}: pixels must be brighter than {threshold * 255:.0f} of 255) / the mask video"
        )
    if valid < MOSTLY_EMPTY_MASK:
        warnings.warn(f"{source}: only {valid:.2%} of guide pixels are valid; nearly all of the shot will be "
                      "generated (check --mask-threshold / the mask video)")


def check_generate_arguments(args) -> str | None:
    """Everything about the options that needs no guides and no model, before either is loaded.
    Returns the torch device to use."""
    from ._checks import (
        check_device, check_not_overwriting_inputs, check_numbers, check_output_file, check_path_given,
        check_video_file_name, input_files,
    )

    from ..errors import InputError

    check_path_given(args.out)
    for option in ("guides", "color_video", "mask_video"):
        check_path_given(getattr(args, option), "--" + option.replace("_", "-"))
    check_numbers(args, steps="count", frames="count", cfg="finite", fps="positive", mask_threshold="finite",
                  vram_limit="non_negative", preview_cache="non_negative")
    if args.mask_threshold is not None and not 0.0 <= args.mask_threshold < 1.0:
        # valid = brighter than threshold x 255: at 1 no pixel can be, every frame would be generated
        raise InputError(f"--mask-threshold must be between 0 and 1, 1 excluded (a valid pixel is brighter than "
                         f"threshold x 255), got {args.mask_threshold:g}")
    if args.size:
        parse_size(args.size)
    check_output_file(args.out)
    check_video_file_name(args.out)
    check_not_overwriting_inputs([args.out], input_files(args.guides, args.color_video, args.mask_video),
                                 fix="choose another --out file")
    if args.device is None and args.generator == "draft":
        return None  # the draft fill runs on the CPU: no torch needed to pick a device
    return check_device(args.device)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generate import load_generator

    device = check_generate_arguments(args)
    color, mask, fps = load_guides(args)
    generator = load_generator(args.generator, models_dir=args.models, device=device, **generator_kwargs(args))

    from tqdm import tqdm

    bars: dict = {}

    def progress(stage: str, step: int, total: int, preview=None) -> None:
        if stage not in ("denoise", "fill"):
            return
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, leave=False)
        bar.n = step
        bar.refresh()

    try:
        out = generator.generate(color, mask, prompt=args.prompt, seed=args.seed, steps=args.steps, cfg=args.cfg,
                                 progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    from ..video import even_size, write_video

    if hasattr(generator, "metadata"):
        print_generation_summary(generator.metadata())
    fps = args.fps if args.fps is not None else fps
    path = write_video(args.out, out, fps=fps)
    W, H = even_size(out.shape[2], out.shape[1])  # what the encoder wrote (guides of an odd size are padded)
    print(f"wrote {path} ({out.shape[0]} frames, {W}x{H}, {fps:g} fps, generator {args.generator})")
    return 0
