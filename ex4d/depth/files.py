"""Depth from files: ``.npz``/``.npy`` arrays, 16-bit PNG sequences and OpenEXR Z passes (Blender's).

Depth here is always **z-depth along the optical axis** (not the length of the ray), positive, in scene
units; the world of a shot is measured in these units (docs/architecture.md).

* ``.npz``: ``depth`` float (T,H,W) (or (H,W) for one frame), optional ``K`` 3x3 in pixels of the
  depth maps' size. ``.npy``: the depth array alone.
* 16-bit PNG sequence: a folder of ``*.png`` (in natural order: depth_2 before depth_10) or a glob such as ``depth/*.png``.
  depth = PNG value x ``scale`` (default 1/1000: millimetres -> metres, as most depth cameras and
  datasets store them). 0 is "no depth" in those files and is refused like any other invalid value.
* OpenEXR (optional ``openexr`` package): one file or a sequence (folder / glob of ``*.exr``), single-
  or multi-part. The channel is Blender's Z pass (``<ViewLayer>.Depth.Z``, ``Depth.Z`` or ``Z``), else
  ``depth``/``D``, else the only channel. Values are used as they are (scale 1 unless ``scale`` is
  given). Blender 5.0's Z pass is planar z-depth in all three engines (checked with bpy 5.0.1:
  a wall facing a 12 mm camera reads 5.0 at the centre and at the corners); pixels that see no surface
  hold 1e10 (Cycles) or about the camera's clip end (EEVEE) - finite and positive, i.e. "far".

:func:`check_depth` validates against the video (frame count, aspect ratio, finite, positive) and
:func:`fit_depth` brings depth to the working size exactly as :func:`ex4d.video.fit_frames` does for the
frames, with nearest-neighbour sampling so depth edges never blend into floating in-between values.
"""

from __future__ import annotations

import glob as globlib
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..depth_rules import check_aspect, check_frame_count, check_values, same_aspect, turn_words
from ..errors import DepthError, InputError

PNG_DEFAULT_SCALE = 1.0 / 1000.0
_EXR_CHANNEL_PREFERENCE = ("depth.z", "z", "depth", "d")


@dataclass
class DepthData:
    depth: np.ndarray  # (T, H, W) float32, z-depth
    K: np.ndarray | None  # 3x3 pixels, for an image of `size`, or None when the file has none
    size: tuple[int, int]  # (width, height) of the depth maps as stored
    source: str = ""

    @property
    def num_frames(self) -> int:
        return int(self.depth.shape[0])


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_depth(path: str | os.PathLike, scale: float | None = None) -> DepthData:
    """Load depth from ``path`` (a file, a folder of images, or a glob). ``scale`` multiplies the stored
    values (PNG: units per step, default 1/1000; EXR and arrays: default 1)."""
    if scale is not None and not (np.isfinite(scale) and scale > 0):
        raise InputError(f"--depth-scale must be a positive number, got {scale}")
    text = str(path)
    p = Path(path)
    # An existing file or folder is itself even when its name has glob characters ('shot [v2]').
    if not p.exists() and any(c in text for c in "*?["):
        files = sorted(_glob_files(text), key=natural_sort_key)
        if not files:
            raise DepthError(f"no depth files match {text}")
        return _load_sequence(files, text, scale)
    if not p.exists():
        raise DepthError(f"depth file not found: {p}")
    if p.is_dir():
        files = sorted(
            (q for q in p.iterdir() if q.suffix.lower() in (".png", ".exr") and not q.name.startswith(".")),
            key=natural_sort_key,
        )
        if not files:
            raise DepthError(f"{p}: the folder has no .png or .exr depth images")
        return _load_sequence(files, str(p), scale)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _load_npz(p, scale)
    if suffix == ".npy":
        return _with_scale(DepthData(_as_depth_array(_np_load(p), p), None, (0, 0), str(p)), scale)
    if suffix in (".png", ".exr"):
        return _load_sequence([p], str(p), scale)
    raise DepthError(f"{p}: unknown depth format '{p.suffix}' (use .npz, .npy, a 16-bit PNG sequence or OpenEXR)")


def natural_sort_key(path: str | os.PathLike) -> tuple:
    """Sort key that compares digit runs as numbers: depth_2.png before depth_10.png, as frame
    sequences without zero padding need. The plain text breaks ties (depth_01 vs depth_1)."""
    text = str(path)
    parts = re.split(r"(\d+)", text)
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)), text


def _glob_files(pattern: str) -> list[Path]:
    """Files matching ``pattern``. If nothing matches and the pattern's folder exists as written
    ('shot [v2]/*.png'), its brackets are names, not character classes: match in that folder."""
    files = [Path(f) for f in globlib.glob(pattern)]
    folder, name = os.path.split(pattern)
    if not files and folder and os.path.isdir(folder):
        files = [Path(f) for f in globlib.glob(os.path.join(globlib.escape(folder), name))]
    return [f for f in files if f.is_file()]


def _np_load(p: Path):
    try:
        return np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DepthError(f"{p}: not a readable numpy file ({' '.join(str(e).split())[:160]})") from None


def _as_depth_array(a, p: Path) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise DepthError(f"{p}: depth must be (T,H,W) (or (H,W) for one frame), got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise DepthError(f"{p}: depth must be numeric, got dtype {a.dtype}")
    if 0 in a.shape:
        raise DepthError(f"{p}: depth is empty (shape {a.shape})")
    return a.astype(np.float32, copy=False)


def _with_scale(data: DepthData, scale: float | None, default: float = 1.0) -> DepthData:
    s = default if scale is None else float(scale)
    if s != 1.0:
        data.depth = (data.depth.astype(np.float64) * s).astype(np.float32)
    if data.size == (0, 0):
        data.size = (int(data.depth.shape[2]), int(data.depth.shape[1]))
    return data


def _load_npz(p: Path, scale: float | None) -> DepthData:
    z = _np_load(p)
    with z:
        keys = list(z.keys())
        if "depth" not in keys:
            raise DepthError(f"{p}: no 'depth' array in the file (found: {', '.join(keys) or 'nothing'})")
        try:
            depth = _as_depth_array(z["depth"], p)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DepthError(f"{p}: the 'depth' array cannot be read ({' '.join(str(e).split())[:160]})") from None
        K = None
        if "K" in keys:
            K = np.asarray(z["K"], dtype=np.float64)
            if K.shape == (1, 3, 3) or (K.ndim == 3 and K.shape[1:] == (3, 3) and np.allclose(K, K[:1])):
                K = K[0]
            if K.shape != (3, 3):
                raise DepthError(f"{p}: 'K' must be a 3x3 intrinsics matrix, got shape {K.shape}")
            if not (np.isfinite(K).all() and K[0, 0] > 0 and K[1, 1] > 0):
                raise DepthError(f"{p}: 'K' must hold finite, positive focal lengths")
    return _with_scale(DepthData(depth, K, (int(depth.shape[2]), int(depth.shape[1])), str(p)), scale)


def _load_sequence(files: list[Path], source: str, scale: float | None) -> DepthData:
    kinds = {f.suffix.lower() for f in files}
    if len(kinds) > 1:
        raise DepthError(f"{source}: mixes {' and '.join(sorted(kinds))} files; use one format per sequence")
    kind = kinds.pop()
    if kind == ".png":
        maps = [_read_png16(f) for f in files]
        default = PNG_DEFAULT_SCALE
    elif kind == ".exr":
        maps = [_read_exr_depth(f) for f in files]
        default = 1.0
    else:
        raise DepthError(f"{source}: unknown depth image format '{kind}' (16-bit .png or .exr)")
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        raise DepthError(f"{source}: depth images have different sizes ({', '.join(f'{w}x{h}' for h, w in sorted(shapes))})")
    depth = np.stack(maps).astype(np.float32)
    return _with_scale(DepthData(depth, None, (0, 0), source), scale, default)


def _read_png16(f: Path) -> np.ndarray:
    import cv2

    im = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
    if im is None:
        raise DepthError(f"{f}: not a readable PNG")
    if im.ndim == 3:
        if im.shape[2] == 1 or (np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 0], im[..., 2])):
            im = im[..., 0]
        else:
            raise DepthError(f"{f}: a depth PNG must have one channel (grey), this one has {im.shape[2]}")
    if im.dtype != np.uint16:
        raise DepthError(f"{f}: depth PNGs must be 16-bit (this one is {im.dtype}; 8 bits give only 256 depth steps)")
    return im


def _read_exr_depth(f: Path) -> np.ndarray:
    try:
        import OpenEXR
    except ImportError:
        raise DepthError(
            f"{f}: reading OpenEXR needs the 'openexr' package (pip install openexr), or save depth as .npz"
        ) from None
    try:
        # Blender 5 writes multilayer EXRs as multi-part files (one part per pass: the Z pass is the
        # channel 'ViewLayer.Depth.Z' of part 'ViewLayer.Depth'), so look through every part.
        with OpenEXR.File(str(f), separate_channels=True) as exr:
            channels = {name: ch.pixels for part in exr.parts for name, ch in part.channels.items()}
    except Exception as e:  # the bindings raise plain RuntimeError/OSError on bad files
        raise DepthError(f"{f}: not a readable OpenEXR file ({' '.join(str(e).split())[:160]})") from None
    name = pick_exr_depth_channel(list(channels))
    if name is None:
        raise DepthError(
            f"{f}: no depth channel (found: {', '.join(sorted(channels))}); enable the Z pass in Blender's "
            "View Layer properties and save as OpenEXR (MultiLayer)"
        )
    a = np.asarray(channels[name])
    if a.ndim != 2:
        raise DepthError(f"{f}: channel {name} is not a single-channel image (shape {a.shape})")
    return a.astype(np.float32)


def pick_exr_depth_channel(names: list[str]) -> str | None:
    """Blender names its Z pass ``<ViewLayer>.Depth.Z`` (multilayer) or ``Z``; tools vary otherwise."""
    lowered = {n.lower(): n for n in names}
    for want in _EXR_CHANNEL_PREFERENCE:
        hits = [orig for low, orig in lowered.items() if low == want or low.endswith("." + want)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return sorted(hits)[0]
    if len(names) == 1:
        return names[0]
    return None


# --------------------------------------------------------------------------------------------------
# Validation and fitting
# --------------------------------------------------------------------------------------------------


def check_depth(
    depth: np.ndarray,
    num_frames: int,
    size: tuple[int, int],
    source: str = "depth",
    allow_longer: bool = False,
    *,
    stored_size: tuple[int, int] | None = None,
    rotation: int = 0,
) -> np.ndarray:
    """Check ``depth`` against a video of ``num_frames`` frames of ``size`` = (height, width) as displayed.

    The depth may have another resolution with the same aspect ratio (it is resized later). For an
    anamorphic video, ``stored_size`` = (height, width) of its stored pixel grid (upright): depth with
    that aspect covers the same picture in stored pixels and is accepted too. ``rotation`` (degrees the
    video is turned for display) only adds a hint to the aspect error and, where the shape cannot show
    a wrong orientation (180 degrees, square pictures), a warning. With ``allow_longer`` (the user cut
    the video with --frames) extra depth frames are dropped. Every value must be finite and > 0.
    Returns float32 (num_frames, h, w).
    """
    depth = np.asarray(depth)
    if depth.ndim != 3:
        raise DepthError(f"{source}: depth must be (T,H,W), got shape {depth.shape}")
    T, h, w = depth.shape
    H, W = size
    check_frame_count(T, num_frames, source, allow_longer)
    check_aspect(w, h, (H, W), source, stored_size=stored_size, rotation=rotation)
    if rotation % 360 == 180 or (rotation % 180 == 90 and same_aspect(W, H, 1, 1)):
        warnings.warn(
            f"the video is rotated {turn_words(rotation)} for display; the depth is used as given, so it must be "
            "in the displayed (upright) orientation - depth made from the stored pictures would be misaligned"
        )
    depth = depth[:num_frames].astype(np.float32, copy=False)
    check_values(depth, source)
    return depth


def fit_depth(depth: np.ndarray, video_size: tuple[int, int], width: int, height: int, mode: str = "resize") -> np.ndarray:
    """Bring (T,h,w) depth to the working size the way the video's frames are brought there.

    ``video_size`` = (width, height) of the source video. Depth at another resolution (same aspect) is
    first mapped onto the video's pixel grid, then cropped/resized through the same box.
    """
    from ..video import apply_fit, box_in_pixels_of, fit_box

    vw, vh = video_size
    T, h, w = depth.shape
    box = box_in_pixels_of(fit_box(vw, vh, width, height, mode), (vw, vh), (w, h))
    return apply_fit(depth, box, nearest=True).astype(np.float32, copy=False)


def depth_K_at_video_size(data: DepthData, video_size: tuple[int, int]) -> np.ndarray | None:
    """The depth file's K rescaled to the video's pixels (it refers to the depth maps' size)."""
    if data.K is None:
        return None
    vw, vh = video_size
    w, h = data.size
    return np.diag([vw / w, vh / h, 1.0]) @ data.K
