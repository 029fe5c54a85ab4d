"""``ex4d recon`` (video + depth -> DW-mesh guides) and ``ex4d run`` (recon + generation).

Only parsers are built at import time; the work (and torch) is imported inside the command functions.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

PRESET_HELP = (
    "camera move: orbit_left/right/up/down, zoom_in/out, dolly_left/right, crane_up/down, "
    "or EX-4D's arcs 30 60 90 -30 -60 -90 180 (default orbit_right)"
)


def add_camera_arguments(c) -> None:
    """The camera move and the source lens (shared by ``recon``/``run`` and ``client run``)."""
    cam = c.add_mutually_exclusive_group()
    cam.add_argument("--cam", metavar="PRESET", help=PRESET_HELP)
    cam.add_argument("--trajectory", metavar="JSON", help="camera path as transforms.json, one camera per video frame")
    c.add_argument("--angle", type=float, metavar="DEG", help="orbit angle for orbit_* presets (default 30, at most 90)")
    c.add_argument("--distance", type=float, help="move length for zoom/dolly/crane presets (default: a share of the pivot depth)")
    c.add_argument("--pivot", choices=("median", "ex4d"), help="orbit pivot: median depth of frame 0 (default) or EX-4D's min depth + 0.15")
    f = c.add_mutually_exclusive_group()
    f.add_argument("--focal", type=float, metavar="PX", help="source focal length in pixels of the input video")
    f.add_argument("--fov", type=float, metavar="DEG", help="source horizontal field of view in degrees")


def register(sub) -> None:
    recon = sub.add_parser(
        "recon",
        help="video + depth -> DW-mesh guide renders along a camera move",
        description="Reconstruct a DW-mesh from a video and its depth, and render the colour guide and "
        "validity mask along a camera move (files: color_/mask_<name>.mp4, render_<name>.npz, cameras_<name>.json).",
    )
    add_recon_arguments(recon)
    recon.set_defaults(func=cmd_recon)

    run = sub.add_parser(
        "run",
        help="recon + generation: video + depth -> a new camera move (shot_<name>.mp4)",
        description="Reconstruct, render the guides and fill them with a generator, writing the guides and "
        "shot_<name>.mp4.",
    )
    add_recon_arguments(run)
    gen = run.add_argument_group("generation")
    from ..generate.settings import GENERATOR_NAMES

    gen.add_argument("--generator", default="draft", choices=GENERATOR_NAMES, help="draft (classical fill, CPU), ex4d (Wan2.1-I2V-14B + EX-4D adapter) or tiny (test model); default draft")
    gen.add_argument("--models", metavar="DIR", help="folder with the model weights (laid out as the public releases)")
    from .generate import add_generator_options

    add_generator_options(gen)
    gen.add_argument("--prompt", help="text prompt (default: EX-4D's)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the generator's)")
    run.set_defaults(func=cmd_run)


def add_recon_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="input video (mp4, mov, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--name", help="name used in the output files (default: the preset or the trajectory's name)")

    d = p.add_argument_group("depth")
    d.add_argument("--depth", metavar="FILE", help=".npz with 'depth' (T,H,W) z-depth [+ 'K'], a folder/glob of 16-bit PNGs, or OpenEXR Z passes")
    d.add_argument("--depth-scale", type=float, metavar="S", help="units per stored step (16-bit PNG default 0.001 = mm -> m; others 1)")
    d.add_argument("--depth-model", metavar="NAME", help="estimate depth with this model instead of --depth")
    d.add_argument("--depth-weights", metavar="DIR", help="folder with the depth model's weights")
    d.add_argument("--median-depth", type=float, metavar="UNITS", help="with --depth-model: scale the (relative) depth so its median is this many units (default: the model mapping's own units)")

    add_camera_arguments(p.add_argument_group("camera"))

    w = p.add_argument_group("working size")
    w.add_argument("--frames", type=int, metavar="N", help="use the first N frames (default: all)")
    w.add_argument("--size", metavar="WxH", help="working size, even numbers (default: the video's, rounded to even)")
    w.add_argument("--fit", choices=("resize", "crop"), default="resize", help="how to reach --size: stretch (EX-4D's way) or centre-crop then scale")

    g = p.add_argument_group("geometry")
    g.add_argument("--renderer", choices=("auto", "torch", "nvdiffrast"), default="auto", help="rasterizer (default auto: nvdiffrast on CUDA if installed, else torch)")
    g.add_argument("--mesh-method", choices=("ours", "ex4d", "torn"), default="ours", help="DW-mesh recipe: ours, the release's (ex4d), or its torn-mesh ablation")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--save-mesh", action="store_true", help="also write the DW-mesh (npz) and frame 0 as PLY")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class TqdmProgress:
    """``progress(stage, step, total, preview=None)`` shown as one tqdm bar per stage."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, step: int, total: int, preview=None) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage == self.stage and self.bar is None:
            return  # this stage already reached its total
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=max(int(total), 1), desc=f"{stage:>10}", unit="step", leave=True, file=sys.stderr, dynamic_ncols=True)
        if self.bar.total != total and total > 0:
            self.bar.total = total
        self.bar.n = int(step)
        self.bar.refresh()
        if step >= total:  # close now so the bar's time is the stage's own
            self.close()
            self.stage = stage

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


ORBIT_PRESETS = ("orbit_left", "orbit_right", "orbit_up", "orbit_down")


def check_camera_options(args) -> None:
    """Refuse contradictory camera options and say which given ones a move ignores (camera.py applies
    --angle only to orbit_* and --distance only to zoom/dolly/crane, and would ignore them silently)."""
    from ..camera import PRESETS, is_number
    from ..errors import InputError

    cam = args.cam
    if cam is not None and not cam.strip():
        raise InputError(f"--cam is empty (an unset shell variable?); choose one of: {', '.join(PRESETS)}")
    if args.trajectory is not None:
        for option, value in (("--angle", args.angle), ("--distance", args.distance), ("--pivot", args.pivot)):
            if value is not None:
                warnings.warn(f"{option} is ignored with --trajectory (the camera file is the whole move)")
        return
    cam = cam or "orbit_right"
    if is_number(cam):  # EX-4D's arcs: the angle is the preset itself
        if args.angle is not None and (cam == "180" or float(cam) != args.angle):
            raise InputError(
                f"--cam {cam} is EX-4D's fixed arc and takes no --angle (got --angle {args.angle:g}); "
                + _instead_of_arc_with_angle(cam, args.angle)
            )
        if args.distance is not None:
            warnings.warn(f"--distance is ignored by --cam {cam} (EX-4D's arcs orbit at min depth + 0.15)")
        if args.pivot == "median":  # --pivot ex4d is the arcs' own pivot: nothing is ignored
            warnings.warn(f"--pivot median is ignored by --cam {cam} (EX-4D's arcs orbit at min depth + 0.15, "
                          "--pivot ex4d)")
    elif cam in ORBIT_PRESETS:
        if args.distance is not None:
            warnings.warn(f"--distance is ignored by --cam {cam} (orbits keep their distance to the pivot; --angle sets the move)")
    elif cam in PRESETS:
        if args.angle is not None:
            warnings.warn(f"--angle is ignored by --cam {cam} (it moves by --distance; orbits use --angle)")


def _instead_of_arc_with_angle(cam: str, angle: float) -> str:
    """What to type instead of ``--cam ARC --angle A``: a move of A degrees in the arc's own direction
    (-60 moves left: never suggest 60), as one of EX-4D's released arcs where there is one, else as an
    orbit; nothing above 90 degrees, which neither allows."""
    from ..camera import PRESETS, is_number

    left = float(cam) < 0  # 180 is a sweep that starts to the right
    orbit = "orbit_left" if left else "orbit_right"
    size = min(abs(angle), 90.0)
    limit = "EX-4D's arcs and the orbits go up to 90 degrees; " if abs(angle) > 90.0 else ""
    arc = f"{-size if left else size:g}"
    if arc == cam:
        return f"{limit}use --cam {cam} alone, or --cam {orbit} --angle {size:g}"
    if arc in PRESETS:
        return f"{limit}use --cam {arc} for that arc, or --cam {orbit} --angle {size:g}"
    return f"{limit}use --cam {orbit} --angle {size:g} (EX-4D's arcs are {', '.join(p for p in PRESETS if is_number(p))})"


def _recon_or_run(args, generate: bool) -> int:
    from ..camera import read_transforms
    from ..pipeline import load_shot_inputs, make_camera_path, parse_size, run_shot, write_shot
    from ..recon import check_name
    from ._checks import check_device, check_numbers, check_output_folder, check_path_given

    # Everything cheap first: a typo must not cost a video decode and a mesh.
    check_path_given(args.out)
    check_numbers(args, angle="finite", distance="positive", focal="positive", fov="finite", depth_scale="positive",
                  median_depth="positive", frames="count", steps="count", vram_limit="non_negative",
                  preview_cache="non_negative")
    size = parse_size(args.size)
    if args.name is not None:
        check_name(args.name)
    check_camera_options(args)
    check_output_folder(args.out)
    trajectory = read_transforms(args.trajectory) if args.trajectory is not None else None
    name, earlier = plan_shot_output(args, trajectory)
    out = Path(args.out)
    device = check_device(args.device)

    progress = TqdmProgress(enabled=not args.quiet)
    try:
        inputs = load_shot_inputs(
            args.video, depth=args.depth, depth_scale=args.depth_scale, depth_model=args.depth_model,
            depth_weights=args.depth_weights, median_depth=args.median_depth, num_frames=args.frames, size=size, fit=args.fit,
            focal=args.focal, fov=args.fov, device=device, progress=progress,
        )
        path = make_camera_path(
            inputs.num_frames, inputs.intrinsics, inputs.depth[0], cam=args.cam, trajectory=trajectory,
            angle=args.angle, pivot=args.pivot or "median", distance=args.distance,
        )
        result = run_shot(
            inputs.frames, inputs.depth, inputs.intrinsics, path, mesh_method=args.mesh_method,
            renderer=args.renderer, device=device,
            generator=args.generator if generate else None,
            models_dir=getattr(args, "models", None), memory_mode=getattr(args, "memory_mode", None),
            prompt=getattr(args, "prompt", None), seed=getattr(args, "seed", 0), steps=getattr(args, "steps", None),
            progress=progress, generator_options=_generator_options(args) if generate else None,
        )
        files = write_shot(args.out, name, result, inputs.fps, frames=inputs.frames, save_mesh=args.save_mesh, progress=progress)
    finally:
        progress.close()
    W, H = inputs.size
    valid = float(result.guides.mask.mean())
    print(
        f"{inputs.num_frames} frames at {W}x{H}, {inputs.fps:g} fps; intrinsics: {inputs.intrinsics_source} "
        f"(fx {inputs.intrinsics.fx:.1f} px); camera '{path.name}'; {valid:.1%} of guide pixels valid"
    )
    if result.info.get("generation"):
        from .generate import print_generation_summary

        print_generation_summary(result.info["generation"])
    print_written(files, name, out, earlier)
    return 0


def plan_shot_output(args, trajectory) -> tuple[str, list[str]]:
    """The shot's name and the files of an earlier set of that name in ``--out``, checked before any
    work (shared by ``recon``/``run`` and ``client run``): refuses when a file of the set (written or
    removed) is one of the inputs."""
    from ..pipeline import DEFAULT_PRESET
    from ..recon import check_name, shot_file_names
    from ._checks import check_not_overwriting_inputs, input_files

    name = check_name(args.name or (trajectory.name if trajectory is not None else args.cam or DEFAULT_PRESET))
    shot_files = [Path(args.out) / n for n in shot_file_names(name)]
    check_not_overwriting_inputs(shot_files, input_files(args.video, args.depth, args.trajectory))
    return name, [p.name for p in shot_files if p.is_file()]


def print_written(files, name: str, out, earlier: list[str]) -> None:
    for f in files:
        print(f"wrote {f}")
    if earlier:
        print(replaced_line(name, out, earlier, [Path(f).name for f in files]))


def replaced_line(name: str, out, earlier: list[str], written: list[str]) -> str:
    """One line saying that an earlier shot of this name was replaced, and what of it is gone."""
    removed = [n for n in earlier if n not in written]
    gone = f"; removed {', '.join(removed)} (not made by this run)" if removed else ""
    return f"replaced the earlier '{name}' shot in {out}{gone}; pass --name to keep both"


def _generator_options(args) -> dict:
    from .generate import generator_kwargs

    kwargs = generator_kwargs(args)
    kwargs.pop("memory_mode", None)  # run_shot takes it by name
    return kwargs


def cmd_recon(args) -> int:
    return _recon_or_run(args, generate=False)


def cmd_run(args) -> int:
    return _recon_or_run(args, generate=True)
