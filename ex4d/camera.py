"""Cameras: intrinsics, camera-to-world poses, conventions, transforms.json and camera-path presets.

This module is the ONE place that knows about axis conventions. It depends on numpy only, so the
Blender add-on bundles it unchanged (see ``ex4d addon build``).

Conventions (docs/architecture.md has the picture):

* World frame of a shot = the source camera at that video frame, **OpenGL/Blender axes** (x right,
  y up, the camera looks down -z). Units = the depth's units. The source camera's pose is identity.
* Poses are 4x4 **camera-to-world** matrices in that OpenGL axis convention (``c2w``).
* OpenCV axes (x right, y down, +z forward) appear only through :func:`gl_to_cv` / :func:`cv_to_gl`.
* Pixel (row i, column j) has its centre at image coordinates (x, y) = (j + 0.5, i + 0.5); the
  principal point of a centred camera is (W/2, H/2).
* Camera path files are instant-ngp / nerfstudio ``transforms.json``: ``fl_x fl_y cx cy w h`` in
  pixels and ``frames[i].transform_matrix`` = c2w (OpenGL axes), one entry per output frame.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import CameraFileError, InputError

# EX-4D's hard-coded focal length (pixels at 512x512) and the release's preset constants.
EX4D_FOCAL_PX = 500.0
EX4D_REFERENCE_SIZE = 512
EX4D_PIVOT_OFFSET = 0.15
EX4D_RISE = 0.2

# OpenGL <-> OpenCV axis flip (its own inverse).
AXIS_FLIP = np.diag([1.0, -1.0, -1.0, 1.0])

# ex4d world (y up, camera looks down -z) -> Blender world (z up): +90 degrees about x.
# The source camera then looks along Blender's +y, upright, as a freshly added Blender camera does
# after a 90 degree x rotation.
EX4D_TO_BLENDER = np.array(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


# Lengths that are constants (the clip planes, the DW-mesh's far border and skirt) were chosen, as the
# release's were, for depth in metres. Depth in finer units (millimetres from a depth camera or a 16-bit
# PNG read with --depth-scale 1, centimetres) multiplies them all by scene_scale(), which keeps the
# geometry in proportion to the scene whatever its unit.
CLIP_NEAR = 1e-3  # the release's clip planes: anything nearer or farther is clipped, hence masked
CLIP_FAR = 1e3
SCENE_SCALE_REF = 10.0  # the nearer part of a metre-scale scene (10th percentile of depth) lies within this
SCENE_SCALE_QUANTILE = 10.0  # a low percentile: sky and background (often 1e4 or 1e10) must not set it
# Depth at or beyond SKY_DEPTH x scene_scale is "at infinity": Blender's 1e10 background, the depth
# models' far value (1e4) for sky. It is never content: masked, as the release's far clip masks it, and
# never a pivot. Real content up to it (a valley 2 km away in metres) keeps the far clip behind it.
SKY_DEPTH = 5e3
SKY_ABSOLUTE = 1e9  # ...and whatever the scale, 1e9 units and beyond (Cycles writes 1e10) is sky


def scene_scale(depth) -> float:
    """1 for a metre-scale scene; the clip's 10th-percentile depth / 10 for depth in finer units.

    ``depth``: z-depth of the clip (any shape; non-finite and non-positive values are ignored). Pass a
    subsample for long clips: the rule reads one percentile.
    """
    d = np.asarray(depth, dtype=np.float64).ravel()
    d = d[np.isfinite(d) & (d > 0) & (d < SKY_ABSOLUTE)]
    if d.size == 0:
        return 1.0
    return max(1.0, float(np.percentile(d, SCENE_SCALE_QUANTILE)) / SCENE_SCALE_REF)


def clip_planes(scale: float = 1.0, content_max: float = 0.0) -> tuple[float, float]:
    """(near, far) clip distances for a scene of ``scene_scale`` ``scale`` whose farthest content (depth
    short of the sky) is ``content_max``: the release's planes for a metre-scale room; farther content
    pushes the far plane back (room for the DW-mesh's skirt at 4x the content, with a margin), never
    past the sky."""
    far = min(sky_depth(scale), max(CLIP_FAR * scale, 8.0 * float(content_max)))
    return CLIP_NEAR * scale, far


def sky_depth(scale: float) -> float:
    """Depth from which on everything is sky, for a scene of ``scene_scale`` ``scale``."""
    return min(SKY_DEPTH * scale, SKY_ABSOLUTE)


def content_depth(depth, scale: float) -> np.ndarray:
    """The valid depth values short of the sky (see SKY_DEPTH), flattened."""
    d = np.asarray(depth, dtype=np.float64).ravel()
    return d[np.isfinite(d) & (d > 0) & (d < sky_depth(scale))]


# --------------------------------------------------------------------------------------------------
# Intrinsics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels for an image of ``width`` x ``height``."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        if not (self.width > 0 and self.height > 0):
            raise InputError(f"image size must be positive, got {self.width}x{self.height}")
        for name in ("fx", "fy"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise InputError(f"focal length {name} must be a positive number, got {v}")
        for name in ("cx", "cy"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"principal point {name} must be finite")

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @classmethod
    def from_K(cls, K: np.ndarray, width: int, height: int) -> "Intrinsics":
        K = np.asarray(K, dtype=np.float64)
        if K.shape != (3, 3):
            raise InputError(f"intrinsics K must be 3x3, got shape {K.shape}")
        return cls(float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), int(width), int(height))

    @classmethod
    def from_focal(cls, focal_px: float, width: int, height: int) -> "Intrinsics":
        return cls(float(focal_px), float(focal_px), width / 2.0, height / 2.0, int(width), int(height))

    @classmethod
    def from_fov(cls, fov_deg: float, width: int, height: int, axis: str = "horizontal") -> "Intrinsics":
        """Square pixels; ``fov_deg`` spans the image ``axis`` ('horizontal' or 'vertical')."""
        if not (0.0 < fov_deg < 180.0):
            raise InputError(f"field of view must be between 0 and 180 degrees, got {fov_deg}")
        span = width if axis == "horizontal" else height
        return cls.from_focal(span / 2.0 / math.tan(math.radians(fov_deg) / 2.0), width, height)

    @classmethod
    def ex4d_default(cls, width: int, height: int, warn: bool = True) -> "Intrinsics":
        """EX-4D's f = 500 px at 512 px, scaled with the longer side so the field of view is kept."""
        if warn:
            warnings.warn(
                "no intrinsics given: using EX-4D's default focal length (500 px at 512 px, about 54 "
                "degrees of field of view); pass --focal or --fov for real footage",
                stacklevel=2,
            )
        return cls.from_focal(EX4D_FOCAL_PX * max(width, height) / EX4D_REFERENCE_SIZE, width, height)

    def resized(self, width: int, height: int) -> "Intrinsics":
        """The same camera seen at another resolution (plain scaling, no crop)."""
        sx, sy = width / self.width, height / self.height
        return Intrinsics(self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, int(width), int(height))

    def cropped(self, left: float, top: float, width: int, height: int) -> "Intrinsics":
        return Intrinsics(self.fx, self.fy, self.cx - left, self.cy - top, int(width), int(height))

    @property
    def fov_x_deg(self) -> float:
        return math.degrees(2.0 * math.atan(self.width / 2.0 / self.fx))

    @property
    def fov_y_deg(self) -> float:
        return math.degrees(2.0 * math.atan(self.height / 2.0 / self.fy))


def resolve_intrinsics(
    width: int,
    height: int,
    focal_px: float | None = None,
    fov_deg: float | None = None,
    file_K: np.ndarray | None = None,
    file_size: tuple[int, int] | None = None,
) -> tuple[Intrinsics, str]:
    """Pick intrinsics in DESIGN.md's order: the user's focal/FOV, the depth file's K, EX-4D's default.

    ``file_size`` is the (width, height) the file's K refers to; K is rescaled to the working size.
    Returns the intrinsics and a short word saying where they came from.
    """
    if focal_px is not None and fov_deg is not None:
        raise InputError("give either --focal or --fov, not both")
    if focal_px is not None:
        return Intrinsics.from_focal(focal_px, width, height), "user focal"
    if fov_deg is not None:
        return Intrinsics.from_fov(fov_deg, width, height), "user fov"
    if file_K is not None:
        fw, fh = file_size if file_size is not None else (width, height)
        return Intrinsics.from_K(file_K, fw, fh).resized(width, height), "depth file"
    return Intrinsics.ex4d_default(width, height), "EX-4D default (f=500 px at 512)"


# --------------------------------------------------------------------------------------------------
# Poses and conventions
# --------------------------------------------------------------------------------------------------


def gl_to_cv(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world with OpenGL camera axes -> OpenCV camera axes (same world). Works on (...,4,4)."""
    return np.asarray(c2w) @ AXIS_FLIP


def cv_to_gl(c2w: np.ndarray) -> np.ndarray:
    return np.asarray(c2w) @ AXIS_FLIP


def world_cv_to_gl(c2w_in_cv_world: np.ndarray) -> np.ndarray:
    """Re-express a pose given in an OpenCV-axis *world* (the EX-4D release's) in our OpenGL world."""
    return AXIS_FLIP @ np.asarray(c2w_in_cv_world)


def ex4d_extrinsics_to_c2w(extrinsics: np.ndarray) -> np.ndarray:
    """The release's saved ``extrinsics`` (world-to-camera, OpenCV world -> OpenGL camera) -> our c2w."""
    E = np.asarray(extrinsics, dtype=np.float64)
    return AXIS_FLIP @ np.linalg.inv(E)


def c2w_to_ex4d_extrinsics(c2w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ex4d_extrinsics_to_c2w`."""
    return np.linalg.inv(AXIS_FLIP @ np.asarray(c2w, dtype=np.float64))


def check_poses(c2w: np.ndarray, what: str = "camera pose", tol: float = 1e-3) -> np.ndarray:
    """Validate (T,4,4) rigid camera-to-world matrices; return them as float64.

    Rejects wrong shapes, non-finite values, a last row other than (0,0,0,1), rotations that are not
    orthonormal (scaled or sheared cameras) and mirrored frames (det = -1: usually a mixed-up axis
    convention).
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    if c2w.ndim == 2:
        c2w = c2w[None]
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4):
        raise CameraFileError(f"{what}: expected 4x4 matrices, got shape {c2w.shape[1:] if c2w.ndim == 3 else c2w.shape}")
    if not np.isfinite(c2w).all():
        raise CameraFileError(f"{what}: matrices contain NaN or infinite values")
    if np.abs(c2w[:, 3] - np.array([0, 0, 0, 1.0])).max() > tol:
        bad = int(np.argmax(np.abs(c2w[:, 3] - np.array([0, 0, 0, 1.0])).max(axis=1)))
        raise CameraFileError(f"{what} {bad}: last row must be 0 0 0 1 (is it a projection matrix?)")
    R = c2w[:, :3, :3]
    err = np.abs(R @ np.swapaxes(R, 1, 2) - np.eye(3)).max(axis=(1, 2))
    if err.max() > tol:
        bad = int(np.argmax(err))
        raise CameraFileError(f"{what} {bad}: rotation is not orthonormal (scaled or sheared camera)")
    det = np.linalg.det(R)
    if (det < 0).any():
        bad = int(np.argmax(det < 0))
        raise CameraFileError(
            f"{what} {bad}: mirrored rotation (det -1); one axis is flipped - is the file in another convention?"
        )
    return c2w


@dataclass
class CameraPath:
    """One camera per output frame: c2w (T,4,4) in our world, per-frame intrinsics (T,3,3), image size."""

    c2w: np.ndarray
    K: np.ndarray
    width: int
    height: int
    name: str = "path"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.c2w = check_poses(self.c2w)
        K = np.asarray(self.K, dtype=np.float64)
        if K.shape == (3, 3):
            K = np.broadcast_to(K, (len(self.c2w), 3, 3)).copy()
        if K.shape != (len(self.c2w), 3, 3):
            raise CameraFileError(f"intrinsics: expected (T,3,3) with T={len(self.c2w)}, got {K.shape}")
        self.K = K

    def __len__(self) -> int:
        return len(self.c2w)

    @property
    def w2c(self) -> np.ndarray:
        return np.linalg.inv(self.c2w)

    def intrinsics(self, i: int = 0) -> Intrinsics:
        return Intrinsics.from_K(self.K[i], self.width, self.height)

    def resized(self, width: int, height: int) -> "CameraPath":
        S = np.diag([width / self.width, height / self.height, 1.0])
        return CameraPath(self.c2w.copy(), S @ self.K, width, height, self.name, dict(self.meta))

    def take(self, num_frames: int) -> "CameraPath":
        """The first ``num_frames`` cameras (a path must cover every video frame it is used for)."""
        if num_frames > len(self):
            raise CameraFileError(
                f"camera path '{self.name}' has {len(self)} frames but the video has {num_frames}: "
                "give one camera per video frame (or pass --frames to use fewer video frames)"
            )
        return CameraPath(self.c2w[:num_frames], self.K[:num_frames], self.width, self.height, self.name, dict(self.meta))


# --------------------------------------------------------------------------------------------------
# transforms.json
# --------------------------------------------------------------------------------------------------

_FOCAL_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")


def path_to_transforms(path: CameraPath) -> dict:
    """A CameraPath as a transforms.json dict (shared intrinsics on top, per-frame ones where they differ)."""
    K0 = path.K[0]
    out: dict = {
        "camera_model": "PINHOLE",
        "fl_x": float(K0[0, 0]),
        "fl_y": float(K0[1, 1]),
        "cx": float(K0[0, 2]),
        "cy": float(K0[1, 2]),
        "w": int(path.width),
        "h": int(path.height),
        "ex4d": {
            "convention": "opengl",
            "world": "source camera at each video frame (camera-relative)",
            "units": "depth units",
            "name": path.name,
            **path.meta,
        },
        "frames": [],
    }
    for i, (M, K) in enumerate(zip(path.c2w, path.K)):
        fr = {"file_path": f"frame_{i:05d}", "transform_matrix": [[float(v) for v in row] for row in M]}
        if not np.allclose(K, K0):
            fr.update(fl_x=float(K[0, 0]), fl_y=float(K[1, 1]), cx=float(K[0, 2]), cy=float(K[1, 2]))
        out["frames"].append(fr)
    return out


def transforms_to_path(data: dict, name: str = "trajectory", source: str = "transforms.json") -> CameraPath:
    """Parse a transforms.json dict. Raises CameraFileError with a one-line reason on anything off."""
    if not isinstance(data, dict):
        raise CameraFileError(f"{source}: top level must be a JSON object")
    meta = data.get("ex4d") or {}
    convention = str(meta.get("convention", data.get("convention", "opengl"))).lower()
    if convention not in ("opengl", "blender", "opencv", "colmap"):
        raise CameraFileError(f"{source}: unknown convention '{convention}' (use opengl or opencv)")
    frames = data.get("frames")
    if not isinstance(frames, list) or not frames:
        raise CameraFileError(f"{source}: missing or empty 'frames' list")
    try:
        w, h = int(data["w"]), int(data["h"])
    except (KeyError, TypeError, ValueError):
        raise CameraFileError(f"{source}: missing image size 'w' and 'h' (pixels)") from None

    def focal(d: dict, fallback: dict | None, i: str) -> np.ndarray:
        src = dict(fallback or {})
        src.update({k: d[k] for k in ("fl_x", "fl_y", "cx", "cy") if k in d})
        if "fl_x" not in src and "camera_angle_x" in data:
            src["fl_x"] = w / 2.0 / math.tan(float(data["camera_angle_x"]) / 2.0)
        if "fl_x" not in src:
            raise CameraFileError(f"{source}: {i} has no focal length (fl_x or camera_angle_x)")
        src.setdefault("fl_y", src["fl_x"])
        src.setdefault("cx", w / 2.0)
        src.setdefault("cy", h / 2.0)
        try:
            return Intrinsics(float(src["fl_x"]), float(src["fl_y"]), float(src["cx"]), float(src["cy"]), w, h).K
        except (TypeError, ValueError, InputError) as e:
            raise CameraFileError(f"{source}: {i}: bad intrinsics ({e})") from None

    top = {k: data[k] for k in ("fl_x", "fl_y", "cx", "cy") if k in data}
    mats, Ks = [], []
    for i, fr in enumerate(frames):
        if not isinstance(fr, dict) or "transform_matrix" not in fr:
            raise CameraFileError(f"{source}: frame {i} has no 'transform_matrix'")
        try:
            M = np.asarray(fr["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            raise CameraFileError(f"{source}: frame {i}: transform_matrix is not a numeric 4x4 matrix") from None
        if M.shape != (4, 4):
            raise CameraFileError(f"{source}: frame {i}: transform_matrix must be 4x4, got shape {M.shape}")
        mats.append(M)
        Ks.append(focal(fr, top, f"frame {i}"))
    c2w = check_poses(np.stack(mats), what=f"{source}: frame")
    if convention in ("opencv", "colmap"):
        c2w = cv_to_gl(c2w)
    elif np.allclose(c2w[0], AXIS_FLIP, atol=1e-6) and len(c2w) > 1:
        # Our frame 0 is the source camera (identity). diag(1,-1,-1) there means OpenCV camera axes.
        raise CameraFileError(
            f"{source}: frame 0 is diag(1,-1,-1), i.e. the source camera in OpenCV axes; this file is "
            "probably in the OpenCV/COLMAP convention - set \"ex4d\": {\"convention\": \"opencv\"} in it"
        )
    c2w = _camera_relative(c2w, meta, data, source)
    # What the move was sized for (our files say it), so a clip in other units can be noticed.
    kept = {k: meta[k] for k in _SIZING_KEYS if isinstance(meta.get(k), (int, float, str)) and k in meta}
    return CameraPath(c2w, np.stack(Ks), w, h, name=str(meta.get("name", name)), meta=kept)


_SIZING_KEYS = ("preset", "pivot", "pivot_rule", "angle_deg", "distance")


def check_units(path: CameraPath, depth0, source: str = "camera file") -> None:
    """Warn when a camera file was sized for a scene of another scale than this clip's depth (a move
    made in metres used on millimetre depth turns an orbit into a pan in place)."""
    made_for = path.meta.get("pivot")
    if not isinstance(made_for, (int, float)) or not made_for > 0 or depth0 is None:
        return
    d = content_depth(depth0, scene_scale(depth0))
    if d.size == 0:
        return
    here = float(np.median(d))
    ratio = here / float(made_for)
    if not 0.1 <= ratio <= 10.0:
        warnings.warn(
            f"{source}: the move was made for a subject {made_for:g} units away, but this clip's depth puts it "
            f"{here:g} units away ({ratio:.3g}x): are the camera file and the depth in the same units? "
            "(--depth-scale converts the depth)",
            stacklevel=2,
        )


WORLDS = ("camera-relative", "absolute")


def _camera_relative(c2w: np.ndarray, meta: dict, data: dict, source: str) -> np.ndarray:
    """Poses in our world (the source camera at frame 0 is identity).

    Files from NeRF tools and Blender exporters hold absolute world poses: frame 0 is wherever that
    camera stood in its scene. Used as they are, the whole move would start far from the source view
    (a guide with almost no valid pixels), so such files are re-based onto frame 0: the move keeps its
    shape and starts at the source camera. ``"ex4d": {"world": ...}`` says which a file holds; files
    we write say camera-relative, and a file that says nothing is taken as absolute only when its
    frame 0 is not the identity (with a warning saying so).
    """
    world = str(meta.get("world", data.get("world", ""))).lower()
    if world.startswith("source camera"):  # what path_to_transforms writes
        world = "camera-relative"
    if world and world not in WORLDS:
        raise CameraFileError(f"{source}: unknown world '{world}' (use {' or '.join(WORLDS)})")
    at_source = np.allclose(c2w[0], np.eye(4), atol=1e-5 * max(1.0, float(np.abs(c2w[0, :3, 3]).max())))
    if world == "camera-relative" or at_source:
        return c2w
    if not world:
        warnings.warn(
            f"{source}: frame 0 is not the source camera (identity), so the poses look like absolute world "
            "poses (a NeRF or Blender export); the move is re-based to start at the source view. Set "
            "\"ex4d\": {\"world\": \"camera-relative\"} in the file to use the poses as they are",
            stacklevel=3,
        )
    return np.linalg.inv(c2w[0]) @ c2w


def write_transforms(path: CameraPath, filename: str | os.PathLike) -> None:
    """Write atomically (temp file + rename)."""
    atomic_write_text(filename, json.dumps(path_to_transforms(path), indent=2))


def read_transforms(filename: str | os.PathLike, name: str | None = None) -> CameraPath:
    filename = Path(filename)
    try:  # utf-8-sig: Windows tools often start JSON with a byte-order mark
        data = json.loads(filename.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise CameraFileError(f"camera file not found: {filename}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CameraFileError(f"{filename}: not a readable JSON file ({e})") from None
    return transforms_to_path(data, name=name or plain_name(filename.stem.replace("cameras_", "")), source=str(filename))


def plain_name(text: str) -> str:
    """``text`` as a shot name (letters and digits of any script, '_', '-', '+', '.'; 64 at most; the
    rule of ``recon.check_name``): a file called 'my camera v2.json' names its move 'my_camera_v2',
    '左から.json' stays '左から'."""
    import unicodedata

    # NFC: macOS file systems hand back decomposed names, whose combining marks are not letters
    text = unicodedata.normalize("NFC", text)
    name = "".join(c if c.isalnum() or c in "_-+." else "_" for c in text).lstrip(".")[:64]
    return name or "trajectory"


def atomic_write_text(filename: str | os.PathLike, text: str) -> None:
    """Write ``text`` through a temp file in the same folder and a rename; nothing is left behind on failure."""
    filename = Path(filename)
    tmp = filename.with_name(f".{filename.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, filename)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


def look_at_ex4d(eye: np.ndarray, center: np.ndarray, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """The release's view matrix: OpenCV world -> OpenGL camera (rows negated as it does)."""
    eye, center, up = (np.asarray(v, dtype=np.float64) for v in (eye, center, up))
    f = center - eye
    f /= np.linalg.norm(f)
    r = np.cross(f, up)
    r /= np.linalg.norm(r)
    u = np.cross(r, f)
    V = np.eye(4)
    V[0, :3], V[1, :3], V[2, :3] = r, u, f
    V[:3, 3] = -V[:3, :3] @ eye
    V[:3] *= -1.0
    return V


def ex4d_preset_extrinsics(preset: str, num_frames: int, radius: float) -> np.ndarray:
    """The release's ``--cam`` preset as it saves it (world-to-camera, (T,4,4)); ``radius`` = min depth + 0.15."""
    try:
        theta = float(preset)
    except ValueError:
        raise InputError(f"unknown EX-4D preset '{preset}'") from None
    r = float(radius)
    center = np.array([0.0, 0.0, r])
    out = []
    if preset == "180":
        angles = np.linspace(0.0, 2.0 * math.pi, num_frames)
        for a in angles:
            eye = np.array([r * math.sin(a), (math.cos(a) - 1.0) * EX4D_RISE * r, 0.0])
            out.append(look_at_ex4d(eye, center))
    else:
        angles = np.linspace(0.0, math.radians(theta), num_frames)
        for a in angles:
            c = abs(math.cos(a))
            eye = np.array([r * math.sin(a), (c - 1.0) * EX4D_RISE * r, r - r * c])
            out.append(look_at_ex4d(eye, center))
    return np.stack(out)


def pivot_depth(depth0: np.ndarray, mode: str = "median") -> float:
    """Depth of the point the camera moves around, from frame 0's depth.

    ``median`` (ours): the median of the valid depth - the subject's distance for typical framing.
    ``ex4d``: the release's min depth + 0.15, which for a close foreground object orbits its front face.
    """
    d = np.asarray(depth0, dtype=np.float64)
    content = content_depth(d, scene_scale(d))
    d = content if content.size else d[np.isfinite(d) & (d > 0)]  # the sky is no pivot, unless it is all there is
    if d.size == 0:
        raise InputError("cannot choose a pivot: frame 0 has no valid depth")
    if mode == "median":
        return float(np.median(d))
    if mode in ("ex4d", "min"):
        return float(d.min()) + EX4D_PIVOT_OFFSET
    raise InputError(f"unknown pivot mode '{mode}' (median or ex4d)")


def _ease(t: np.ndarray, easing: str) -> np.ndarray:
    if easing == "linear":
        return t
    if easing in ("smooth", "ease"):
        return t * t * (3.0 - 2.0 * t)
    raise InputError(f"unknown easing '{easing}' (linear or smooth)")


def _rot(axis: str, a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    R = np.eye(4)
    if axis == "x":
        R[1:3, 1:3] = [[c, -s], [s, c]]
    elif axis == "y":
        R[0, 0], R[0, 2], R[2, 0], R[2, 2] = c, s, -s, c
    else:
        R[0:2, 0:2] = [[c, -s], [s, c]]
    return R


def _translate(v) -> np.ndarray:
    M = np.eye(4)
    M[:3, 3] = v
    return M


def orbit_poses(num_frames: int, pivot: float, yaw_deg: float = 0.0, pitch_deg: float = 0.0, easing: str = "linear") -> np.ndarray:
    """Orbit around the pivot (0, 0, -pivot), keeping it centred, no roll.

    yaw > 0 moves the camera to the right (it then looks left at the subject), pitch > 0 moves it up.
    Angles go linearly (or eased) from 0 at frame 0 to the given value at the last frame.
    """
    if abs(yaw_deg) > 90.0 + 1e-9 or abs(pitch_deg) > 90.0 + 1e-9:
        raise InputError("orbit angles are limited to +-90 degrees")
    t = _ease(np.linspace(0.0, 1.0, num_frames), easing)
    P, Pinv = _translate([0, 0, -pivot]), _translate([0, 0, pivot])
    return np.stack([P @ _rot("y", math.radians(yaw_deg) * s) @ _rot("x", -math.radians(pitch_deg) * s) @ Pinv for s in t])


def translate_poses(num_frames: int, offset: Sequence[float], easing: str = "linear") -> np.ndarray:
    t = _ease(np.linspace(0.0, 1.0, num_frames), easing)
    return np.stack([_translate(np.asarray(offset, dtype=np.float64) * s) for s in t])


PRESETS = ("30", "60", "90", "-30", "-60", "-90", "180", "orbit_left", "orbit_right", "orbit_up", "orbit_down",
           "zoom_in", "zoom_out", "dolly_left", "dolly_right", "crane_up", "crane_down")


def preset_path(
    preset: str,
    num_frames: int,
    intrinsics: Intrinsics,
    depth0: np.ndarray | None = None,
    pivot: float | None = None,
    pivot_mode: str = "median",
    angle_deg: float | None = None,
    distance: float | None = None,
    easing: str = "linear",
) -> CameraPath:
    """Build a named camera move as a CameraPath in our convention.

    * ``30 60 90 -30 -60 -90 180`` (and any number up to +-90): EX-4D's arcs exactly as released
      (pivot = min depth + 0.15 unless ``pivot`` is given; ``pivot_mode`` is ignored for these).
    * ``orbit_left/right/up/down``: orbit by ``angle_deg`` (default 30, at most 90) around the pivot.
    * ``zoom_in`` / ``zoom_out``: push in / pull out along the view axis by ``distance``
      (default 30% of the pivot depth).
    * ``dolly_left/right``: track sideways; ``crane_up/down``: rise or sink, by ``distance``
      (default 20% of the pivot depth).
    """
    if num_frames < 1:
        raise InputError("a camera path needs at least one frame")
    is_ex4d = preset == "180" or is_number(preset)
    if pivot is None:
        if depth0 is None:
            raise InputError(f"preset '{preset}' needs frame 0's depth (or an explicit pivot) to size the move")
        pivot = pivot_depth(depth0, "ex4d" if is_ex4d else pivot_mode)
    if pivot <= 0 or not math.isfinite(pivot):
        raise InputError(f"pivot depth must be positive, got {pivot}")
    if is_ex4d:
        if preset != "180" and abs(float(preset)) > 90:
            raise InputError("EX-4D arcs are limited to +-90 degrees (use 180 for the release's sweep)")
        c2w = ex4d_extrinsics_to_c2w(ex4d_preset_extrinsics(preset, num_frames, pivot))
        meta = {"preset": preset, "pivot": pivot, "pivot_rule": "ex4d min depth + 0.15"}
    else:
        ang = 30.0 if angle_deg is None else float(angle_deg)
        dist_t = (0.3 if preset.startswith("zoom") else 0.2) * pivot if distance is None else float(distance)
        moves = {
            "orbit_left": lambda: orbit_poses(num_frames, pivot, yaw_deg=-ang, easing=easing),
            "orbit_right": lambda: orbit_poses(num_frames, pivot, yaw_deg=ang, easing=easing),
            "orbit_up": lambda: orbit_poses(num_frames, pivot, pitch_deg=ang, easing=easing),
            "orbit_down": lambda: orbit_poses(num_frames, pivot, pitch_deg=-ang, easing=easing),
            "zoom_in": lambda: translate_poses(num_frames, [0, 0, -dist_t], easing),
            "zoom_out": lambda: translate_poses(num_frames, [0, 0, dist_t], easing),
            "dolly_left": lambda: translate_poses(num_frames, [-dist_t, 0, 0], easing),
            "dolly_right": lambda: translate_poses(num_frames, [dist_t, 0, 0], easing),
            "crane_up": lambda: translate_poses(num_frames, [0, dist_t, 0], easing),
            "crane_down": lambda: translate_poses(num_frames, [0, -dist_t, 0], easing),
        }
        if preset not in moves:
            raise InputError(f"unknown camera preset '{preset}'; choose one of: {', '.join(PRESETS)}")
        c2w = moves[preset]()
        meta = {"preset": preset, "pivot": pivot, "pivot_rule": pivot_mode, "angle_deg": ang, "distance": dist_t}
    return CameraPath(c2w, intrinsics.K, intrinsics.width, intrinsics.height, name=preset, meta=meta)


def is_number(s: str) -> bool:
    """True for a preset given as a number (EX-4D's arcs: '30', '-60', '180')."""
    try:
        float(s)
        return True
    except ValueError:
        return False


def relative_angle_deg(c2w: np.ndarray) -> np.ndarray:
    """Angle (degrees) between each camera's view direction and the source camera's: the 'how extreme' measure."""
    fwd = -np.asarray(c2w)[..., :3, 2]
    return np.degrees(np.arccos(np.clip(fwd @ np.array([0.0, 0.0, -1.0]), -1.0, 1.0)))


def iter_frames(path: CameraPath) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    yield from zip(path.c2w, path.K)
