"""A shot as the add-on sees it: source video crop, working size, intrinsics, frame numbering."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import camera, errors


@dataclass(frozen=True)
class FillCrop:
    """Scale-to-fill then centre-crop of a ``src_w`` x ``src_h`` video to ``width`` x ``height``.

    This is what the sequencer's FILL fit does when the add-on reads frames; it maps working-image UVs
    back into the source video so the DW-mesh material samples the full-resolution footage.
    """

    src_w: int
    src_h: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if min(self.src_w, self.src_h, self.width, self.height) <= 0:
            raise errors.InputError(f"video and working sizes must be positive ({self.src_w}x{self.src_h} -> {self.width}x{self.height})")

    @property
    def scale(self) -> float:
        return max(self.width / self.src_w, self.height / self.src_h)

    @property
    def window(self) -> tuple[float, float, float, float]:
        """(left, bottom, width, height) of the visible part, as fractions of the source frame."""
        fw = self.width / self.scale / self.src_w
        fh = self.height / self.scale / self.src_h
        return (1.0 - fw) / 2.0, (1.0 - fh) / 2.0, fw, fh

    def uv_to_source(self, uv: np.ndarray) -> np.ndarray:
        """Working-image UVs (u = x/W, v = 1 - y/H) -> UVs into the source video frame."""
        left, bottom, fw, fh = self.window
        uv = np.asarray(uv, dtype=np.float64)
        return np.stack([left + uv[..., 0] * fw, bottom + uv[..., 1] * fh], axis=-1)


    def sample_nearest(self, images: np.ndarray) -> np.ndarray:
        """(T, src_h, src_w, ...) -> (T, height, width, ...): the working pixel centres' nearest source pixels."""
        images = np.asarray(images)
        if images.shape[1:3] != (self.src_h, self.src_w):
            raise errors.InputError(f"expected images of {self.src_w}x{self.src_h}, got {images.shape[2]}x{images.shape[1]}")
        s = self.scale
        x0 = (self.src_w - self.width / s) / 2.0
        y0 = (self.src_h - self.height / s) / 2.0
        cols = np.clip(np.floor(x0 + (np.arange(self.width) + 0.5) / s), 0, self.src_w - 1).astype(np.int64)
        rows = np.clip(np.floor(y0 + (np.arange(self.height) + 0.5) / s), 0, self.src_h - 1).astype(np.int64)
        return images[:, rows][:, :, cols]

    def intrinsics(self, K: np.ndarray) -> np.ndarray:
        """K of the source image -> K of the working image (scale, then centre crop)."""
        s = self.scale
        K = np.asarray(K, dtype=np.float64)
        out = K.copy()
        out[0, 0], out[1, 1] = K[0, 0] * s, K[1, 1] * s
        out[0, 2] = K[0, 2] * s - (self.src_w * s - self.width) / 2.0
        out[1, 2] = K[1, 2] * s - (self.src_h * s - self.height) / 2.0
        return out


def scene_frame(frame_start: int, index: int) -> int:
    """Shot frame ``index`` (0-based, = video frame first + index) -> scene frame number."""
    return int(frame_start) + int(index)


def shot_index(frame_start: int, num_frames: int, frame: float) -> int:
    """Scene frame -> nearest shot frame index, clamped to the shot."""
    return int(min(max(round(frame - frame_start), 0), num_frames - 1))


def working_intrinsics(width: int, height: int, focal_px: float = 0.0, fov_deg: float = 0.0) -> tuple[camera.Intrinsics, str]:
    """The import dialog's focal (px at the working size) or FOV (horizontal, degrees); 0 = not given."""
    return camera.resolve_intrinsics(
        width, height, focal_px=focal_px if focal_px > 0 else None, fov_deg=fov_deg if fov_deg > 0 else None
    )


BLENDER_NAME_BYTES = 63  # Blender cuts longer ID names (UTF-8 bytes), then adds .001 on a clash
STRIP_NAME_BYTES = 61  # sequencer strips keep fewer (seen on Blender 5.0.1)


def fitted_name(base: str, suffix: str = "", limit: int = STRIP_NAME_BYTES) -> str:
    """``base + suffix`` within Blender's name limit, shortening ``base`` (never mid-character) so the
    suffix that tells names apart (' guide', ' source') survives a long shot or camera name."""
    room = limit - len(suffix.encode("utf-8"))
    raw = base.encode("utf-8")
    if len(raw) > room:
        base = raw[: max(0, room - 1)].decode("utf-8", errors="ignore").rstrip() + "~"
    return base + suffix


def shot_name(video_path: str) -> str:
    """The shot's name from its video file, by the library's rule for shot names (any script's letters)."""
    import os

    stem = os.path.splitext(os.path.basename(video_path))[0]
    return camera.plain_name(stem) if stem.strip(".") else "shot"
