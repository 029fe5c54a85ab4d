"""Video in and out (PyAV), fitting frames to a working size, and atomic file writes.

Frames are numpy ``uint8`` arrays of shape (T, H, W, 3), RGB. Everything a user can get wrong (missing,
empty, corrupt or non-video files) raises :class:`ex4d.errors.VideoError` with a one-line message.
Writers never leave a half-written file behind: they write to a temporary name beside the target and
``os.replace`` it into place.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from .camera import Intrinsics
from .errors import Ex4dError, InputError, VideoError
from .fit import FIT_MODES, FitBox, box_in_pixels_of, fit_box  # noqa: F401 (part of this module's API)


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` finds without decoding pixels."""

    num_frames: int
    fps: float
    width: int  # as displayed: the file's rotation applied (a phone's portrait clip), pixels made square
    height: int
    codec: str
    rotation: int = 0  # degrees counter-clockwise applied to the stored pictures (0, 90, 180, 270)
    sample_aspect: Fraction = Fraction(1)  # width/height of one stored pixel (anamorphic: not 1)

    @property
    def stored_upright_size(self) -> tuple[int, int]:
        """(width, height) of the stored pixel grid turned upright: differs from the displayed size
        only for non-square pixels (depth made from the stored pictures has this size)."""
        return _squeezed(self.width, self.height, self.sample_aspect, self.rotation // 90)


@dataclass
class Video:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    fps: float
    source_size: tuple[int, int] = (0, 0)  # (width, height) as displayed, before read_video's ``size``

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@contextmanager
def _open_video(path: str | os.PathLike):
    import av

    path = Path(path)
    if not path.exists():
        raise VideoError(f"video not found: {path}")
    if path.is_dir():
        raise VideoError(f"{path} is a folder, not a video file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: the file is empty")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(f"{path}: not a readable video ({_short(e)})") from None
    try:
        if not container.streams.video:
            raise VideoError(f"{path}: the file has no video stream")
        yield container, container.streams.video[0]
    finally:
        container.close()


def _short(e: Exception) -> str:
    """An FFmpeg error as one short line (no file name repeated, no newlines)."""
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(str(text).split())[:200]


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.base_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if not (math.isfinite(fps) and fps > 0):
        warnings.warn("the video does not state its frame rate; assuming 30 fps", stacklevel=3)
        fps = 30.0
    return fps


def _sample_aspect(stream) -> Fraction:
    """Width/height of one stored pixel (anamorphic footage, DV: not 1); 1 when the file does not say."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    sar = Fraction(sar) if sar else Fraction(1)
    return sar if sar > 0 else Fraction(1)


def _display_size(stored_w: int, stored_h: int, sample_aspect: Fraction, turns: int) -> tuple[int, int]:
    """Displayed (width, height) of a stored picture: pixels made square by scaling the stored width,
    as players and FFmpeg do, then the display rotation."""
    w = max(1, round(stored_w * sample_aspect))
    return (stored_h, w) if turns % 2 else (w, stored_h)


def _squeezed(display_w: int, display_h: int, sample_aspect: Fraction, turns: int) -> tuple[int, int]:
    """Inverse of :func:`_display_size` without the rotation: the stored grid, upright."""
    if sample_aspect == 1:
        return display_w, display_h
    if turns % 2:  # the stored width runs down the displayed picture
        return display_w, max(1, round(display_h / sample_aspect))
    return max(1, round(display_w / sample_aspect)), display_h


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that show ``frame`` upright (phones store portrait clips as
    landscape pictures plus a display matrix; FFmpeg reports its angle as ``frame.rotation``)."""
    angle = float(getattr(frame, "rotation", 0) or 0)
    return int(round(angle / 90.0)) % 4


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, fps and displayed size (rotation and sample aspect applied). The count comes from
    the container or, if it does not say, from counting packets; one frame is decoded to learn the
    display rotation."""
    import av

    with _open_video(path) as (container, stream):
        count = int(stream.frames or 0)
        turns = 0
        try:
            first = next(container.decode(stream), None)
            if first is None:
                raise VideoError(f"{path}: the video contains no decodable frames")
            turns = _quarter_turns(first)
            if count <= 0:
                container.seek(0)
                count = sum(1 for p in container.demux(stream) if p.size > 0)
        except av.FFmpegError as e:
            raise VideoError(f"{path}: the video is corrupt ({_short(e)})") from None
        if count <= 0:
            raise VideoError(f"{path}: the video contains no frames")
        cc = stream.codec_context
        if not (cc.width and cc.height):
            raise VideoError(f"{path}: the video stream has no picture size")
        sar = _sample_aspect(stream)
        w, h = _display_size(int(cc.width), int(cc.height), sar, turns)
        return VideoInfo(count, _stream_fps(stream), w, h, str(cc.name), 90 * turns, sar)


def read_video(
    path: str | os.PathLike,
    max_frames: int | None = None,
    start: int = 0,
    *,
    size: tuple[int, int] | None = None,
    fit: str = "resize",
) -> Video:
    """Decode frames ``start .. start+max_frames`` (all by default) as RGB uint8, as players show them:
    upright (the file's display rotation applied) and with square pixels (anamorphic footage, stored
    with a sample aspect ratio other than 1, is stretched to its display aspect).

    ``size`` = (width, height) brings each frame to that size through :func:`fit_box` (``fit`` mode) as
    soon as it is decoded: the same pixels as :func:`fit_frames` on the whole clip, but only one
    full-size frame is in memory at a time (a long 4K clip would not fit otherwise).

    A clip that decodes to fewer frames than its container lists is a broken copy: :class:`VideoError`
    "decoded N of M frames" rather than a shorter clip that fails later against its depth. Where that
    count is exact one missing frame is only a warning (edit lists can hide one); where the container
    gives only a duration, a few frames are. With ``max_frames`` only those frames must decode.
    """
    import av

    if start < 0:
        raise InputError(f"start frame must be >= 0, got {start}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"number of frames must be >= 1, got {max_frames}")
    with _open_video(path) as (container, stream):
        fps = _stream_fps(stream)
        sar = _sample_aspect(stream)
        listed, slack = _listed_frames(container, stream, fps)
        expected = max(0, listed - start) if max_frames is None else min(max_frames, max(0, listed - start))
        if max_frames is not None and expected == max_frames:
            slack = 0  # the user asked for exactly these frames
        stream.thread_type = "AUTO"  # threaded decoding ends quietly at a cut, hence the count check below
        frames = _FrameStack(expected or max_frames or 64)
        source_shape = None
        display = box = None
        index = 0
        try:
            for frame in container.decode(stream):
                if index >= start:
                    picture = frame.to_ndarray(format="rgb24")
                    turns = _quarter_turns(frame)
                    if turns:
                        picture = np.ascontiguousarray(np.rot90(picture, turns))
                    if source_shape is None:
                        source_shape = picture.shape
                        ph, pw = picture.shape[:2]
                        stored = (ph, pw) if turns % 2 else (pw, ph)  # the picture is already turned
                        display = _display_size(*stored, sar, turns)
                        box = _picture_box(display, (pw, ph), size or display, fit)
                    elif picture.shape != source_shape:
                        raise VideoError(
                            f"{path}: the picture size changes inside the video ({sorted([source_shape, picture.shape])[:2]})"
                        )
                    frames.append(picture if box.is_identity else apply_fit(picture[None], box)[0])
                    if max_frames is not None and len(frames) >= max_frames:
                        break
                index += 1
        except av.FFmpegError as e:
            raise VideoError(f"{path}: the video is corrupt at frame {index} ({_short(e)})") from None
    if not len(frames):
        if index == 0:
            raise VideoError(f"{path}: the video contains no decodable frames")
        raise VideoError(f"{path}: start frame {start} is past the end of the video ({index} frames)")
    missing = expected - len(frames)
    if missing > slack:
        raise VideoError(
            f"{path}: decoded {len(frames)} of {expected} frames - the file is cut short or corrupt (copy or export it again)"
        )
    if missing > 0:
        warnings.warn(f"{path}: decoded {len(frames)} of the {expected} frames the file lists; using {len(frames)}", stacklevel=2)
    return Video(frames.array(), fps, display)


def _picture_box(display: tuple[int, int], picture: tuple[int, int], size: tuple[int, int], mode: str) -> FitBox:
    """The fit box from the displayed picture to ``size``, in the pixels of the decoded ``picture``
    (the same unless the stored pixels are not square)."""
    return box_in_pixels_of(fit_box(display[0], display[1], size[0], size[1], mode), display, picture)


def _listed_frames(container, stream, fps: float) -> tuple[int, int]:
    """(frames the file says it has, how many fewer may decode without the file being broken).

    mp4/mov list every frame in their index; an edit list can hide one. Others (mkv, ts) may give only a
    duration, an estimate: allow a few frames. (0, 0) when the file says nothing."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames), 1
    seconds = 0.0
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1e6  # microseconds (AV_TIME_BASE)
    estimate = int(round(seconds * fps)) if math.isfinite(seconds) and seconds > 0 else 0
    return estimate, max(2, math.ceil(0.05 * estimate))


class _FrameStack:
    """Frames gathered into one array that grows when needed; ``np.stack`` of a list would need the
    clip's memory twice at the end."""

    def __init__(self, capacity: int):
        self.capacity = max(1, int(capacity))
        self.data: np.ndarray | None = None
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def append(self, image: np.ndarray) -> None:
        if self.data is None:
            # a damaged header may list absurd counts: start at most ~4 GB and grow from there
            self.capacity = min(self.capacity, max(1, (4 << 30) // max(1, image.nbytes)))
            self.data = np.empty((self.capacity, *image.shape), image.dtype)
        elif self.count == len(self.data):
            grown = np.empty((2 * len(self.data), *image.shape), image.dtype)
            grown[: self.count] = self.data
            self.data = grown
        self.data[self.count] = image
        self.count += 1

    def array(self) -> np.ndarray:
        return self.data[: self.count]


# --------------------------------------------------------------------------------------------------
# Fitting to a working size (frames, depth and intrinsics all go through the same box)
# --------------------------------------------------------------------------------------------------


def apply_fit(images: np.ndarray, box: FitBox, nearest: bool = False) -> np.ndarray:
    """Crop and scale (T,H,W[,C]) images through ``box``. ``nearest`` keeps values (depth edges)."""
    import cv2

    images = np.asarray(images)
    region = images[:, box.y0 : box.y0 + box.h, box.x0 : box.x0 + box.w]
    if (box.w, box.h) == (box.width, box.height):
        return np.ascontiguousarray(region)
    if nearest:
        interp = cv2.INTER_NEAREST_EXACT  # pixel-centre aligned, unlike INTER_NEAREST
    elif box.width <= box.w and box.height <= box.h:
        interp = cv2.INTER_AREA
    else:
        interp = cv2.INTER_LINEAR
    return np.stack([cv2.resize(np.ascontiguousarray(im), (box.width, box.height), interpolation=interp) for im in region])


def fit_frames(frames: np.ndarray, width: int, height: int, mode: str = "resize") -> np.ndarray:
    """Frames (T,H,W,3) brought to ``width`` x ``height`` (see :class:`FitBox`)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames must be (T,H,W,3), got shape {frames.shape}")
    return apply_fit(frames, fit_box(frames.shape[2], frames.shape[1], width, height, mode))


def fit_intrinsics(intrinsics: Intrinsics, width: int, height: int, mode: str = "resize") -> Intrinsics:
    """The intrinsics matching :func:`fit_frames` on an image of ``intrinsics``' size."""
    box = fit_box(intrinsics.width, intrinsics.height, width, height, mode)
    return intrinsics.cropped(box.x0, box.y0, box.w, box.h).resized(width, height)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _temp_name(path: Path) -> Path:
    # Same folder (so os.replace is a rename) and same suffix (tools that sniff names stay happy).
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it into place, on failure delete it."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def _encoder_errors(path: Path):
    import av

    try:
        yield
    except av.FFmpegError as e:
        raise Ex4dError(f"cannot write {path} ({_short(e)})") from None


def even_size(width: int, height: int) -> tuple[int, int]:
    return width + (width & 1), height + (height & 1)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 16) -> Path:
    """Write (T,H,W,3) or (T,H,W) uint8 frames as H.264 yuv420p mp4, atomically.

    yuv420p needs even sizes: odd sizes are padded by repeating the last row/column, with a warning.
    ``crf`` 16 keeps guides close to lossless; the exact arrays are in the ``render_*.npz`` files anyway.
    """
    import av

    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise InputError(f"frames to write must be (T,H,W,3) with T >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise InputError(f"frames to write must be uint8, got {frames.dtype}")
    if not (math.isfinite(fps) and fps > 0):
        raise InputError(f"frame rate must be positive, got {fps}")
    h, w = frames.shape[1:3]
    W, H = even_size(w, h)
    if (W, H) != (w, h):
        warnings.warn(f"{path.name}: padded {w}x{h} to {W}x{H} (H.264 yuv420p needs even sizes)", stacklevel=2)
        frames = np.pad(frames, ((0, 0), (0, H - h), (0, W - w), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp, _encoder_errors(path):
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for im in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(im), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def write_npz_atomic(path: str | os.PathLike, compress: bool = True, **arrays) -> Path:
    """``np.savez(_compressed)`` through a temporary file (no '.npz' is appended to the name)."""
    path = Path(path)
    save = np.savez_compressed if compress else np.savez
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            save(f, **arrays)
    return path
