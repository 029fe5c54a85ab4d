"""Projection matrices: our pinhole intrinsics -> OpenGL clip space, in image row order.

Clip space is OpenGL's (x right, w = distance in front of the camera, z/w in [-1, 1] between near
and far) with one twist: NDC y = -1 is the image's TOP row. nvdiffrast (and our torch rasterizer)
write raster row r at NDC y = (2r + 1)/H - 1, so with this matrix row 0 of the raster is row 0 of the
image as stored (top first), with no flip afterwards. Pixel (row i, col j) has its centre at image
point (j + 0.5, i + 0.5), the convention of ex4d/camera.py.
"""

from __future__ import annotations

import numpy as np

from ..camera import CLIP_FAR as FAR
from ..camera import CLIP_NEAR as NEAR


def projection_matrix(K, width: int, height: int, near: float = NEAR, far: float = FAR) -> np.ndarray:
    """OpenGL-style projection for intrinsics ``K`` (3,3) or (T,3,3); returns (4,4) or (T,4,4) float64.

    A camera-space point (X, Y, Z) (OpenGL camera axes, looking down -Z) with image point
    x = cx + fx X/(-Z), y = cy - fy Y/(-Z) lands at NDC (2x/W - 1, 2y/H - 1).
    """
    K = np.asarray(K, dtype=np.float64)
    single = K.ndim == 2
    K = K.reshape(-1, 3, 3)
    P = np.zeros((len(K), 4, 4))
    fx, fy, cx, cy = K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]
    P[:, 0, 0] = 2.0 * fx / width
    P[:, 0, 2] = 1.0 - 2.0 * cx / width
    P[:, 1, 1] = -2.0 * fy / height
    P[:, 1, 2] = 1.0 - 2.0 * cy / height
    P[:, 2, 2] = -(far + near) / (far - near)
    P[:, 2, 3] = -2.0 * far * near / (far - near)
    P[:, 3, 2] = -1.0
    return P[0] if single else P


def mvp_matrices(path, near: float = NEAR, far: float = FAR) -> np.ndarray:
    """(T,4,4) world -> clip for every camera of an ``ex4d.camera.CameraPath``."""
    P = projection_matrix(path.K, path.width, path.height, near, far)
    return P @ np.linalg.inv(path.c2w)
