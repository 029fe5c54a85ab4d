"""Blender camera <-> ex4d camera (intrinsics and poses), through the rig matrix ``camera.EX4D_TO_BLENDER``.

Blender cameras use OpenGL camera axes already, so a pose only changes world: the shot's world (y up) is
the rig's local space; ``matrix_world = rig_world @ c2w`` and ``c2w = inv(rig_world) @ matrix_world``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import camera, errors

DEFAULT_SENSOR_WIDTH = 36.0


@dataclass(frozen=True)
class BlenderLens:
    """What to set on a Blender camera (sensor_fit HORIZONTAL) to get pinhole K at width x height."""

    lens: float
    sensor_width: float
    shift_x: float
    shift_y: float
    pixel_aspect_y: float = 1.0


def lens_from_K(K: np.ndarray, width: int, height: int, sensor_width: float = DEFAULT_SENSOR_WIDTH) -> BlenderLens:
    """Pinhole K -> Blender lens. With sensor_fit HORIZONTAL the sensor spans the image width, and shifts
    are in units of the width (Blender's viewplane code), so fx = lens / sensor_width * W."""
    K = np.asarray(K, dtype=np.float64)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    return BlenderLens(
        lens=float(fx * sensor_width / width),
        sensor_width=float(sensor_width),
        shift_x=float((width / 2.0 - cx) / width),
        shift_y=float((cy - height / 2.0) / width),
        pixel_aspect_y=float(fx / fy),
    )


def K_from_lens(lens: float, sensor_width: float, shift_x: float, shift_y: float, width: int, height: int,
                sensor_fit: str = "HORIZONTAL", sensor_height: float = 24.0, pixel_aspect_y: float = 1.0) -> np.ndarray:
    """Blender camera settings -> pinhole K (square pixels unless pixel_aspect_y != 1)."""
    fit = sensor_fit
    if fit == "AUTO":
        fit = "HORIZONTAL" if width >= height else "VERTICAL"
    if fit == "HORIZONTAL":
        fx = lens / sensor_width * width
        span = width
    else:
        size = sensor_width if sensor_fit == "AUTO" else sensor_height
        fy_v = lens / size * height
        fx = fy_v
        span = height
    fy = fx / pixel_aspect_y
    cx = width / 2.0 - shift_x * span
    cy = height / 2.0 + shift_y * span
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def world_from_c2w(c2w: np.ndarray, rig_world: np.ndarray | None = None) -> np.ndarray:
    """(T,4,4) or (4,4) shot-world c2w -> Blender matrix_world."""
    rig = camera.EX4D_TO_BLENDER if rig_world is None else np.asarray(rig_world, dtype=np.float64)
    return rig @ np.asarray(c2w, dtype=np.float64)


def c2w_from_world(matrix_world: np.ndarray, rig_world: np.ndarray | None = None) -> np.ndarray:
    """Blender matrix_world (camera scale removed) -> shot-world c2w, validated."""
    rig = camera.EX4D_TO_BLENDER if rig_world is None else np.asarray(rig_world, dtype=np.float64)
    M = np.linalg.inv(rig) @ np.asarray(matrix_world, dtype=np.float64)
    R = M[..., :3, :3]
    M[..., :3, :3] = R / np.linalg.norm(R, axis=-2, keepdims=True)  # a scaled camera object still looks the same
    return camera.check_poses(M, what="Blender camera")


def path_from_blender(matrices_world: np.ndarray, K: np.ndarray, width: int, height: int, name: str,
                      rig_world: np.ndarray | None = None) -> camera.CameraPath:
    return camera.CameraPath(c2w_from_world(matrices_world, rig_world), K, width, height, name=name)


def check_single_focal(path: camera.CameraPath) -> np.ndarray:
    """Blender animates one lens per camera here: refuse per-frame intrinsics that differ."""
    if not np.allclose(path.K, path.K[0], rtol=1e-6, atol=1e-6):
        raise errors.CameraFileError(
            f"camera path '{path.name}' changes focal length per frame; the add-on keys one lens per camera"
        )
    return path.K[0]
