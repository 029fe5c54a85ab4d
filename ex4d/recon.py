"""The geometry half of a shot: depth -> DW-mesh -> guides along a camera path -> files.

Used by the ``ex4d recon``/``ex4d run`` commands (through :mod:`ex4d.pipeline`) and by the backend.
Inputs are arrays (frames, depth, intrinsics, a CameraPath); nothing here reads user files.

Output files for a path called ``<name>`` (docs/architecture.md):

* ``color_<name>.mp4`` - the colour guide, ``mask_<name>.mp4`` - 255 where source content is valid,
* ``render_<name>.npz`` - ``color`` uint8 (T,H,W,3) and ``mask`` bool (T,H,W), lossless,
* ``cameras_<name>.json`` - the path as transforms.json (one camera per video frame).

Writes go through :func:`staged_output`: files are written into a hidden folder inside the output
folder and moved into place only when all of them are complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .camera import CameraPath, Intrinsics, write_transforms
from .errors import CameraFileError, Cancelled, Ex4dError, InputError

MESH_METHODS = ("ours", "ex4d", "torn")
RENDERERS = ("auto", "torch", "nvdiffrast")

Progress = Callable[..., None]


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")


# --------------------------------------------------------------------------------------------------
# Compute
# --------------------------------------------------------------------------------------------------


def mesh_config(method: str = "ours", **overrides):
    """The DW-mesh settings for ``--mesh-method``: ``ours`` (the project's default), ``ex4d`` (the
    release's recipe) or ``torn`` (the release's ablation: invalid faces deleted)."""
    from . import dwmesh

    if method not in MESH_METHODS:
        raise InputError(f"unknown mesh method '{method}' (choose {', '.join(MESH_METHODS)})")
    return dwmesh.DWMeshConfig(method=method, **overrides)


def reconstruct(
    frames: np.ndarray,
    depth: np.ndarray,
    intrinsics: Intrinsics,
    config=None,
    *,
    method: str = "ours",
    device=None,
    progress: Progress | None = None,
    cancel=None,
):
    """Build the shot's DW-mesh from z-depth (T,H,W) seen through ``intrinsics`` (working size).

    ``frames`` (T,H,W,3) uint8 are only checked here (the mesh's UVs point into them; the renderer
    colours from them). ``config`` defaults to :func:`mesh_config` of ``method``.
    """
    import torch

    from .dwmesh import build_dwmesh

    frames, depth = np.asarray(frames), np.asarray(depth)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"frames must be uint8 (T,H,W,3), got {frames.dtype} {frames.shape}")
    if depth.shape != frames.shape[:3]:
        raise InputError(f"depth {depth.shape} does not match the frames {frames.shape[:3]}")
    if (intrinsics.width, intrinsics.height) != (frames.shape[2], frames.shape[1]):
        raise InputError(
            f"intrinsics are for {intrinsics.width}x{intrinsics.height} but the frames are {frames.shape[2]}x{frames.shape[1]}"
        )
    _check_cancel(cancel)
    if config is None:
        config = mesh_config(method)
    if progress:
        progress("mesh", 0, 1)
    depth_t = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))
    mesh = build_dwmesh(depth_t, intrinsics.K, config, device=device)
    if progress:
        progress("mesh", 1, 1)
    _check_cancel(cancel)
    return mesh


def render_path(
    mesh,
    frames: np.ndarray,
    path: CameraPath,
    *,
    rasterizer: str = "auto",
    device=None,
    progress: Progress | None = None,
    cancel=None,
):
    """Render the colour guide and validity mask along ``path`` (one camera per video frame)."""
    from .render import render_guides

    if rasterizer not in RENDERERS:
        raise InputError(f"unknown renderer '{rasterizer}' (choose {', '.join(RENDERERS)})")
    T, H, W = np.asarray(frames).shape[:3]
    path = check_path_for_video(path, T, W, H)
    _check_cancel(cancel)

    def forward(stage, step, total, preview=None):
        _check_cancel(cancel)
        if progress:
            progress(stage, step, total, preview)

    guides = render_guides(mesh, frames, path, rasterizer=rasterizer, device=device, progress=forward, cancel=cancel)
    check_guides(guides, T, H, W)
    return guides


def check_path_for_video(path: CameraPath, num_frames: int, width: int, height: int) -> CameraPath:
    """One camera per video frame, at the working size. Longer paths are cut; shorter ones refused.

    A path made for another resolution is scaled to the working size when its aspect ratio is the
    same; another aspect ratio would distort its intrinsics and is refused.
    """
    path = path.take(num_frames)  # raises CameraFileError when the path is too short
    if (path.width, path.height) != (width, height):
        if abs((path.width / path.height) / (width / height) - 1.0) > 0.01:
            raise CameraFileError(
                f"camera path '{path.name}' is for {path.width}x{path.height} images but the working size is "
                f"{width}x{height} (another aspect ratio); export the cameras at the video's aspect ratio or "
                "pass a matching --size"
            )
        path = path.resized(width, height)
    return path


def check_guides(guides, num_frames: int, height: int, width: int) -> None:
    color, mask = np.asarray(guides.color), np.asarray(guides.mask)
    if color.shape != (num_frames, height, width, 3) or color.dtype != np.uint8:
        raise InputError(f"guide colour must be uint8 {(num_frames, height, width, 3)}, got {color.dtype} {color.shape}")
    if mask.shape != (num_frames, height, width) or mask.dtype != np.bool_:
        raise InputError(f"guide mask must be bool {(num_frames, height, width)}, got {mask.dtype} {mask.shape}")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

NAME_MAX = 64
_NAME_PUNCTUATION = "_-+."


def check_name(name: str) -> str:
    """Shot names become parts of file names: keep them plain. Letters and digits of any script
    (``str.isalnum``: '左から', 'café'), '_', '-', '+', '.' (not first); no separators or control
    characters. The same rule as ``camera.plain_name``, which makes names from file names. Returns
    the name in NFC, as ``plain_name`` does, so both spell it alike."""
    import unicodedata

    name = unicodedata.normalize("NFC", name or "")
    if not (0 < len(name) <= NAME_MAX and not name.startswith(".")
            and all(c.isalnum() or c in _NAME_PUNCTUATION for c in name)):
        raise InputError(f"shot name '{name}' must be 1-{NAME_MAX} letters, digits, '_', '-', '+' or '.' (not first); "
                         "no folders")
    return name


@contextmanager
def staged_output(out_dir: str | os.PathLike, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """A hidden folder inside ``out_dir`` to write into; its files move into ``out_dir`` when the block
    ends without error, and it is removed either way. A newly made ``out_dir`` that stays empty after a
    failure is removed too.

    ``replaces``: file names in ``out_dir`` that belong to the set being written (a shot's files, see
    :func:`shot_file_names`); those the block did not write are removed once the new files are in
    place, as part of the same all-or-nothing move, so no stale member of an earlier set stays behind."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a folder")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {out_dir} ({e.strerror})") from None
    stage = out_dir / f".ex4d-partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir()
        yield stage
        _move_all(stage, out_dir, replaces)
    except OSError as e:  # disk full, permissions, a vanished folder: one line, nothing left behind
        raise Ex4dError(f"cannot write the results to {out_dir} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()


def _move_all(stage: Path, out_dir: Path, replaces: Iterable[str] = ()) -> None:
    """Move every file of ``stage`` into ``out_dir``, then move the files named in ``replaces`` that
    were not written aside; if one move fails, undo the others (older files of the same names come
    back), so ``out_dir`` ends with the whole new set or the whole old one. What was moved aside is
    deleted with the stage."""
    backup = stage / ".replaced"
    backup.mkdir()
    new = sorted(p for p in stage.iterdir() if p != backup)
    written = {p.name for p in new}
    stale = [out_dir / n for n in dict.fromkeys(replaces) if n not in written]
    moved: list[tuple[Path | None, Path, Path | None]] = []  # (new file placed, its target, the old file's backup)
    try:
        for item in new:
            target = out_dir / item.name
            old = None
            if target.is_file() or target.is_symlink():
                old = backup / item.name
                os.replace(target, old)
            os.replace(item, target)
            moved.append((item, target, old))
        for target in stale:  # only after every new file is in place
            if target.is_file() or target.is_symlink():
                old = backup / target.name
                os.replace(target, old)
                moved.append((None, target, old))
    except OSError:
        for item, target, old in reversed(moved):
            try:
                if item is not None:
                    target.unlink()
                if old is not None:
                    os.replace(old, target)
            except OSError:
                pass
        raise


def guide_file_names(name: str) -> dict[str, str]:
    return {
        "color": f"color_{name}.mp4",
        "mask": f"mask_{name}.mp4",
        "render": f"render_{name}.npz",
        "cameras": f"cameras_{name}.json",
    }


def mesh_file_names(name: str) -> dict[str, str]:
    return {"mesh": f"dwmesh_{name}.npz", "ply": f"dwmesh_{name}_frame0.ply"}


def shot_file_names(name: str) -> list[str]:
    """Every file a shot called ``name`` can have in its folder. They form one set: writing a shot of
    that name replaces the whole set, so guides, cameras, mesh and shot always belong together."""
    return [*guide_file_names(name).values(), f"shot_{name}.mp4", *mesh_file_names(name).values()]


def _write_guide_files(folder: Path, name: str, guides, path: CameraPath, fps: float) -> dict[str, Path]:
    from .video import write_npz_atomic, write_video

    names = guide_file_names(name)
    color, mask = np.asarray(guides.color), np.asarray(guides.mask)
    files = {k: folder / v for k, v in names.items()}
    write_video(files["color"], color, fps)
    write_video(files["mask"], mask.astype(np.uint8) * 255, fps)
    # fps: so `ex4d generate --guides` writes the shot at the source's rate, not a guessed one
    write_npz_atomic(files["render"], color=color, mask=mask, fps=np.float64(fps))
    # the file carries the shot's name (--name), not the preset's: read back with --trajectory, it must
    # name the same set of files it came from
    named = CameraPath(path.c2w, path.K, path.width, path.height, name=name, meta=dict(path.meta))
    write_transforms(named, files["cameras"])
    return files


def write_guides(out_dir: str | os.PathLike, name: str, guides, path: CameraPath, fps: float) -> dict[str, Path]:
    """Write the four guide files for ``name`` into ``out_dir`` (all or nothing) and remove the rest of
    an earlier set of that name (its shot and mesh, made from other guides). Returns their paths."""
    name = check_name(name)
    T, H, W = np.asarray(guides.mask).shape
    check_guides(guides, T, H, W)
    if len(path) != T:
        raise InputError(f"camera path has {len(path)} frames but the guides have {T}")
    with staged_output(out_dir, replaces=shot_file_names(name)) as stage:
        _write_guide_files(stage, name, guides, path, fps)
    return {k: Path(out_dir) / v for k, v in guide_file_names(name).items()}


def write_mesh_files(folder: str | os.PathLike, name: str, mesh, frames: np.ndarray) -> dict[str, Path]:
    """The DW-mesh of the whole shot (``dwmesh_<name>.npz``) and frame 0 as a coloured PLY
    (``dwmesh_<name>_frame0.ply``), each written atomically."""
    from . import dwmesh

    folder = Path(folder)
    files = {k: folder / v for k, v in mesh_file_names(name).items()}
    dwmesh.save_npz(mesh, files["mesh"])  # both write atomically themselves
    dwmesh.save_ply(mesh, files["ply"], frame_rgb=np.asarray(frames[0]), t=0)
    return files
