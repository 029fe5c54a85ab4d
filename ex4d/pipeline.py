"""One shot end to end: inputs -> DW-mesh -> guides -> (generated video) -> files.

Three layers, so the CLI and the backend run the same code:

* :func:`load_shot_inputs` - files to arrays (CLI only; the backend receives arrays from the add-on):
  reads the video and the depth, validates them against each other, fits both to the working size and
  resolves the intrinsics. Everything a user can get wrong fails here, before any output is written.
* :func:`make_camera_path` - a preset or a transforms.json path, one camera per video frame.
* :func:`run_shot` - arrays in, arrays out: mesh, guides and (with a generator) the new video.
* :func:`write_shot` - all files of a shot, all or nothing (see :func:`ex4d.recon.staged_output`).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .camera import CameraPath, Intrinsics, check_units, preset_path, read_transforms, resolve_intrinsics
from .errors import DepthError, InputError, VideoError
from .recon import Progress, _check_cancel, check_name, check_path_for_video, reconstruct, render_path

DEFAULT_PRESET = "orbit_right"
LARGE_WORKING_PIXELS = 1280 * 720  # above this, say that the shot will be slow and larger than the model's


@dataclass
class ShotInputs:
    frames: np.ndarray  # (T,H,W,3) uint8 at the working size
    depth: np.ndarray  # (T,H,W) float32 z-depth at the working size
    intrinsics: Intrinsics  # at the working size
    fps: float
    intrinsics_source: str = ""
    depth_source: str = ""
    source_size: tuple[int, int] = (0, 0)  # (width, height) of the video file

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[1])


@dataclass
class ShotResult:
    mesh: object
    guides: object  # render.Guides: color uint8 (T,H,W,3), mask bool (T,H,W), depth
    path: CameraPath
    video: np.ndarray | None = None  # (T,H,W,3) uint8 from the generator, if one ran
    info: dict = field(default_factory=dict)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'WxH' -> (W, H); both even (H.264 yuv420p) and positive."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m:
        raise InputError(f"--size must look like 512x512 (width x height), got '{text}'")
    w, h = int(m.group(1)), int(m.group(2))
    if w < 2 or h < 2 or w % 2 or h % 2:
        raise InputError(f"--size {w}x{h}: width and height must be even numbers >= 2 (H.264 yuv420p)")
    return w, h


def default_working_size(width: int, height: int) -> tuple[int, int]:
    """The source size rounded down to even numbers."""
    return max(2, width - width % 2), max(2, height - height % 2)


def preview_size(width: int, height: int, long_side: int = 512) -> tuple[int, int]:
    """A quick working size with the clip's own aspect ratio (so ``--fit resize`` does not stretch a
    portrait clip): the longer side ``long_side``, both sides even."""
    scale = long_side / max(width, height)
    return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def load_shot_inputs(
    video: str | os.PathLike,
    *,
    depth: str | os.PathLike | None = None,
    depth_scale: float | None = None,
    depth_model: str | None = None,
    depth_weights: str | os.PathLike | None = None,
    median_depth: float | None = None,
    num_frames: int | None = None,
    size: tuple[int, int] | None = None,
    fit: str = "resize",
    focal: float | None = None,
    fov: float | None = None,
    device=None,
    progress: Progress | None = None,
    cancel=None,
) -> ShotInputs:
    """Read and validate a shot's inputs; fit frames, depth and intrinsics to the working size.

    ``num_frames`` None = every frame of the clip. ``size`` None = the source size rounded to even.
    ``focal`` is in pixels of the source video. Depth comes from ``depth`` (a file) or, without one,
    from ``depth_model`` with weights in ``depth_weights`` (relative depth; ``median_depth`` rescales the
    clip so its median z-depth is that many units).
    """
    from .depth.files import check_depth, depth_K_at_video_size, fit_depth, load_depth
    from .video import fit_intrinsics, fit_box, probe_video, read_video

    if depth is not None and depth_model is not None:
        raise InputError("give either --depth or --depth-model, not both")
    if depth is None and depth_model is None:
        raise DepthError(
            "no depth given: pass --depth FILE (.npz with 'depth' (T,H,W), a 16-bit PNG folder or OpenEXR Z pass) "
            "or estimate it with --depth-model NAME --depth-weights DIR"
        )
    if median_depth is not None and (depth_model is None or not (np.isfinite(median_depth) and median_depth > 0)):
        raise InputError("--median-depth needs --depth-model and a positive number of units")
    if depth_model is not None and depth_weights is None:
        raise InputError(f"--depth-model {depth_model} needs --depth-weights DIR (the folder with its checkpoint)")
    if num_frames is not None and num_frames < 1:
        raise InputError(f"--frames must be >= 1, got {num_frames}")
    if focal is not None and not (np.isfinite(focal) and focal > 0):
        raise InputError(f"--focal must be a positive number of pixels, got {focal}")

    info = probe_video(video)
    if num_frames is not None and num_frames > info.num_frames:
        raise InputError(f"--frames {num_frames}: the video has only {info.num_frames} frames")
    W, H = size if size is not None else default_working_size(info.width, info.height)
    fit_box(info.width, info.height, W, H, fit)  # validates the mode and size before any decoding
    if W * H > LARGE_WORKING_PIXELS:
        warnings.warn(
            f"working size {W}x{H} makes a {W * H / 1e6:.1f} M-vertex mesh per frame: slow on a CPU and far above "
            f"the ex4d generator's 512x512; pass e.g. --size {'x'.join(map(str, preview_size(info.width, info.height)))} "
            "for a quicker preview"
        )

    data = None
    if depth is not None:  # load before decoding the video: a bad depth file fails fast
        data = load_depth(depth, scale=depth_scale)

    if progress:
        progress("read video", 0, 1)
    clip = read_video(video, max_frames=num_frames, size=(W, H), fit=fit)  # fitted as decoded: bounded memory
    _check_cancel(cancel)
    frames = clip.frames
    T = clip.num_frames
    w, h = clip.source_size
    if num_frames is not None and T < num_frames:
        raise VideoError(f"{video}: --frames {num_frames}, but only {T} frames could be decoded (is the file cut short?)")
    if progress:
        progress("read video", 1, 1)

    if data is not None:
        stored_w, stored_h = info.stored_upright_size  # anamorphic clips: depth may come at the stored size
        # A clip that decodes short of the frames its file lists (read_video allows one, an edit list can
        # hide it) with depth for every listed frame: the video is short, not the depth. Use the decoded
        # frames and the first depth maps rather than blame the depth.
        video_short = num_frames is None and np.ndim(data.depth) == 3 and T < len(data.depth) == info.num_frames
        if video_short:
            warnings.warn(
                f"{video}: the file lists {info.num_frames} frames but {T} decode (the video is short, not the "
                f"depth); using the first {T} of the {info.num_frames} depth maps"
            )
        depth_arr = check_depth(
            data.depth, T, (h, w), source=data.source, allow_longer=num_frames is not None or video_short,
            stored_size=(stored_h, stored_w), rotation=info.rotation,
        )
        depth_arr = fit_depth(depth_arr, (w, h), W, H, fit)
        intr, intr_source = resolve_intrinsics(
            w, h, focal_px=focal, fov_deg=fov, file_K=depth_K_at_video_size(data, (w, h)), file_size=(w, h)
        )
        intr = fit_intrinsics(intr, W, H, fit)
        depth_source = data.source
    else:
        # the model sees the working-size frames; a K it predicts is already at the working size
        depth_arr, model_K = _predict_depth(frames, depth_model, depth_weights, device, median_depth, progress, cancel)
        if focal is not None or fov is not None or model_K is None:
            intr, intr_source = resolve_intrinsics(w, h, focal_px=focal, fov_deg=fov)
            intr = fit_intrinsics(intr, W, H, fit)
        else:
            intr, intr_source = Intrinsics.from_K(model_K, W, H), f"depth model {depth_model}"
        depth_source = f"depth model {depth_model}"
    return ShotInputs(frames, depth_arr, intr, clip.fps, intr_source, depth_source, (info.width, info.height))


def _predict_depth(frames, name, weights_dir, device, median_depth, progress, cancel) -> tuple[np.ndarray, np.ndarray | None]:
    """Depth (and K, if the model predicts one) from a depth model, at the frames' size."""
    from .depth.files import check_depth, fit_depth
    from .depth.models import load_depth_model  # torch: imported only when a model is asked for

    T, H, W = frames.shape[:3]
    model = load_depth_model(name, weights_dir, device, median_depth=median_depth)
    pred = model.predict(frames, progress=progress, cancel=cancel)
    depth = np.asarray(getattr(pred, "depth", pred), dtype=np.float32)
    K = getattr(pred, "K", None)
    if depth.ndim == 3 and depth.shape[1:] != (H, W):
        depth = fit_depth(depth, (depth.shape[2], depth.shape[1]), W, H, "resize")
    return check_depth(depth, T, (H, W), source=f"depth model {name}"), (None if K is None else np.asarray(K, np.float64))


# --------------------------------------------------------------------------------------------------
# Camera path
# --------------------------------------------------------------------------------------------------


def make_camera_path(
    num_frames: int,
    intrinsics: Intrinsics,
    depth0: np.ndarray | None,
    *,
    cam: str | None = None,
    trajectory: str | os.PathLike | CameraPath | None = None,
    angle: float | None = None,
    pivot: str = "median",
    distance: float | None = None,
    easing: str = "linear",
) -> CameraPath:
    """A preset (``cam``) or a transforms.json ``trajectory``, with one camera per video frame at the
    intrinsics' size. The trajectory's frame i is seen from the source camera of video frame i."""
    if cam is not None and trajectory is not None:
        raise InputError("give either --cam or --trajectory, not both")
    W, H = intrinsics.width, intrinsics.height
    if trajectory is None:
        return preset_path(
            cam or DEFAULT_PRESET, num_frames, intrinsics, depth0=depth0, pivot_mode=pivot,
            angle_deg=angle, distance=distance, easing=easing,
        )
    path = trajectory if isinstance(trajectory, CameraPath) else read_transforms(trajectory)
    check_units(path, depth0, source=str(trajectory) if not isinstance(trajectory, CameraPath) else path.name)
    if len(path) > num_frames:
        warnings.warn(f"camera path '{path.name}' has {len(path)} frames; using the first {num_frames} (one per video frame)")
    return check_path_for_video(path, num_frames, W, H)


# --------------------------------------------------------------------------------------------------
# Compute
# --------------------------------------------------------------------------------------------------


def run_shot(
    frames: np.ndarray,
    depth: np.ndarray,
    intrinsics: Intrinsics,
    path: CameraPath,
    *,
    mesh_method: str = "ours",
    mesh_config=None,
    renderer: str = "auto",
    device=None,
    generator=None,
    models_dir: str | os.PathLike | None = None,
    memory_mode: str | None = None,
    prompt: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    progress: Progress | None = None,
    cancel=None,
    generator_options: dict | None = None,
    preview_cache: float | None = None,
) -> ShotResult:
    """Mesh, guides and - when ``generator`` is given (a name for ``load_generator`` or a loaded
    generator, as the backend keeps warm) - the generated video, all as arrays.

    ``generator_options`` go to ``load_generator`` with a generator name (``speed``, ``vram_limit_gb``,
    ``preview_cache``); ``preview_cache`` overrides a loaded generator's threshold for this shot.
    What the generator used and skipped is in ``result.info["generation"]``."""
    T, H, W = np.asarray(frames).shape[:3]
    path = check_path_for_video(path, T, W, H)  # a short path fails before any compute
    if isinstance(generator, str):
        from .generate import load_generator

        kwargs = {"models_dir": models_dir, "device": device, **(generator_options or {})}
        if memory_mode is not None:
            kwargs["memory_mode"] = memory_mode
        generator = load_generator(generator, **kwargs)
    mesh = reconstruct(frames, depth, intrinsics, mesh_config, method=mesh_method, device=device, progress=progress, cancel=cancel)
    guides = render_path(mesh, frames, path, rasterizer=renderer, device=device, progress=progress, cancel=cancel)
    result = ShotResult(mesh, guides, path)
    if generator is not None:
        _check_cancel(cancel)
        extra = {} if preview_cache is None else {"preview_cache": preview_cache}
        out = generator.generate(
            np.asarray(guides.color), np.asarray(guides.mask), prompt=prompt, seed=seed, steps=steps,
            progress=progress, cancel=cancel, **extra,
        )
        if hasattr(generator, "metadata"):
            result.info["generation"] = generator.metadata()
        out = np.asarray(out)
        if out.dtype != np.uint8 or out.ndim != 4 or out.shape[-1] != 3:
            raise InputError(f"generator returned {out.dtype} {out.shape}, expected uint8 (T,H,W,3)")
        result.video = out
    return result


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def write_shot(
    out_dir: str | os.PathLike,
    name: str,
    result: ShotResult,
    fps: float,
    *,
    frames: np.ndarray | None = None,
    save_mesh: bool = False,
    progress: Progress | None = None,
) -> list[Path]:
    """Guides (+ ``shot_<name>.mp4`` when generated, + the DW-mesh with ``save_mesh``), all or nothing.

    The files of one shot name are a set: files of an earlier set of ``name`` that this call does not
    write (e.g. its shot, when only guides are written now) are removed in the same all-or-nothing move,
    so nothing from other settings stays beside the new files."""
    from .recon import _write_guide_files, check_guides, guide_file_names, shot_file_names, staged_output, write_mesh_files
    from .video import write_video

    name = check_name(name)
    T, H, W = np.asarray(result.guides.mask).shape
    check_guides(result.guides, T, H, W)
    if len(result.path) != T:
        raise InputError(f"camera path has {len(result.path)} frames but the guides have {T}")
    if save_mesh and frames is None:
        raise InputError("saving the mesh needs the source frames (for the PLY's vertex colours)")
    names = list(guide_file_names(name).values())
    total = 1 + (result.video is not None) + bool(save_mesh)
    step = 0

    def advance() -> None:
        nonlocal step
        step += 1
        if progress:
            progress("write", step, total)

    with staged_output(out_dir, replaces=shot_file_names(name)) as stage:
        if progress:
            progress("write", 0, total)
        _write_guide_files(stage, name, result.guides, result.path, fps)
        advance()
        if result.video is not None:
            write_video(stage / f"shot_{name}.mp4", result.video, fps)
            names.append(f"shot_{name}.mp4")
            advance()
        if save_mesh:
            names += [p.name for p in write_mesh_files(stage, name, result.mesh, frames).values()]
            advance()
    return [Path(out_dir) / n for n in names]
