"""Per-frame face validity, stored on the mesh as bit-packed integer face attributes.

The backend sends ``face_valid`` (T,F) bool: which faces show real source content at each frame. The
mesh keeps it as ``ex4d_auto_valid_<k>`` INT face attributes holding frames 32k..32k+31 as bits, so it
survives saving and the artist deleting faces. ``ex4d_valid`` is the artist's paintable per-vertex value
(1 = keep, 0 = force regeneration). The guide mask of frame t = auto bit t AND painted >= 0.5 on all the
face's vertices.
"""

from __future__ import annotations

import numpy as np

BITS = 32
AUTO_PREFIX = "ex4d_auto_valid_"
PAINT_ATTR = "ex4d_valid"
MASK_ATTR = "ex4d_mask"


def num_words(num_frames: int) -> int:
    return (int(num_frames) + BITS - 1) // BITS


def pack(face_valid: np.ndarray) -> np.ndarray:
    """(T,F) bool -> (ceil(T/32), F) int32 words, bit t%32 of word t//32 = frame t."""
    fv = np.asarray(face_valid, dtype=bool)
    T, F = fv.shape
    words = np.zeros((num_words(T), F), dtype=np.uint32)
    for t in range(T):
        words[t // BITS] |= fv[t].astype(np.uint32) << np.uint32(t % BITS)
    return words.view(np.int32)


def unpack_frame(words: np.ndarray, t: int) -> np.ndarray:
    """(W,F) int32 words -> (F,) bool validity of frame t."""
    w = np.asarray(words).view(np.uint32)
    return ((w[t // BITS] >> np.uint32(t % BITS)) & np.uint32(1)).astype(bool)


def unpack(words: np.ndarray, num_frames: int) -> np.ndarray:
    return np.stack([unpack_frame(words, t) for t in range(num_frames)])


def face_mask(auto_valid: np.ndarray, painted_vertex: np.ndarray, corner_vertex: np.ndarray, corner_start: np.ndarray) -> np.ndarray:
    """Combine one frame's automatic face validity with the painted per-vertex value.

    ``corner_vertex`` = vertex index of every face corner, ``corner_start`` = first corner of every face.
    """
    painted_ok = np.asarray(painted_vertex) >= 0.5
    if len(corner_start) == 0:
        return np.zeros(0, dtype=bool)
    per_corner = painted_ok[np.asarray(corner_vertex)].astype(np.int8)
    all_ok = np.minimum.reduceat(per_corner, np.asarray(corner_start)).astype(bool)
    return np.asarray(auto_valid, dtype=bool) & all_ok
