"""Shared fixtures: a tiny synthetic clip on disk (mp4 + depth.npz with K) and the shared reference data.

The tiny clip is made here with numpy only (no dependency on the scene generator) so every test area
can use it: a textured background wall at depth 4 and a textured box at depth 2 that slides right by
one pixel per frame. 64x48 pixels, 6 frames, 24 fps, focal 56 px.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

SHARED_DIR = Path(__file__).parents[1].parent / "shared"

# Tiny-model artefacts (offline tokenizer, etc.) shared by every test process.
os.environ.setdefault("EX4D_CACHE_DIR", str(Path(tempfile.gettempdir()) / "ex4d-test-cache"))


def small_guide_clip():
    """A 5-frame 32x32 random colour guide whose right half is masked from frame 1 on (tiny generators)."""
    rng = np.random.default_rng(0)
    color = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    mask = np.ones((5, 32, 32), bool)
    mask[1:, :, 16:] = False
    return color, mask


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny CPU kernels: one thread is fastest and keeps timings stable on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
FLOWER_DIR = SHARED_DIR / "data" / "ex4d-flower"


@dataclass
class TinyClip:
    video: Path
    depth_file: Path
    frames: np.ndarray  # (T,H,W,3) uint8, as written (the mp4 is lossy)
    depth: np.ndarray  # (T,H,W) float32
    K: np.ndarray  # 3x3
    fps: float

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[1])


def make_tiny_scene(num_frames: int = 6, width: int = 64, height: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames (T,H,W,3) uint8, z-depth (T,H,W) float32 and K (3x3) of a two-layer scene."""
    yy, xx = np.mgrid[0:height, 0:width]
    wall = np.stack([(xx * 4) % 256, (yy * 5) % 256, ((xx // 8 + yy // 8) % 2) * 200 + 30], axis=-1)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    depth = np.full((num_frames, height, width), 4.0, np.float32)
    for t in range(num_frames):
        img = wall.copy()
        x0, y0 = width // 4 + t, height // 4
        box = (slice(y0, y0 + height // 2), slice(x0, x0 + width // 3))
        stripes = 60 + 80 * ((xx[box] // 4) % 2)
        img[box] = np.stack([np.full_like(stripes, 230), stripes, np.full_like(stripes, 40)], axis=-1)
        depth[t][box] = 2.0
        frames[t] = img
    f = 56.0
    K = np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])
    return frames, depth, K


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> TinyClip:
    from ex4d.video import write_npz_atomic, write_video

    folder = tmp_path_factory.mktemp("tiny_clip")
    frames, depth, K = make_tiny_scene()
    video = write_video(folder / "video.mp4", frames, 24.0)
    depth_file = write_npz_atomic(folder / "depth.npz", depth=depth, K=K)
    return TinyClip(video, depth_file, frames, depth, K, 24.0)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared reference folder {SHARED_DIR} is not there (it sits beside the repository on project machines)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def flower_dir(shared_dir) -> Path:
    if not (FLOWER_DIR / "input.mp4").is_file():
        pytest.skip(f"EX-4D reference clip {FLOWER_DIR}/input.mp4 is not there")
    return FLOWER_DIR


def write_clip(path, frames, fps=24, *, container_options=None, sample_aspect=None, crf=18) -> Path:
    """Write frames as H.264 mp4 with PyAV directly, for the file layouts write_video never makes:
    ``container_options`` such as {'movflags': 'faststart'}, ``sample_aspect`` (a Fraction: anamorphic)."""
    import av

    frames = np.asarray(frames)
    with av.open(str(path), "w", format="mp4", options=container_options or {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        if sample_aspect is not None:
            stream.codec_context.sample_aspect_ratio = sample_aspect
        for im in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(im), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def cut_clip(tmp_path, num_frames=24, keep=0.7) -> Path:
    """A clip whose index (moov at the front: 'faststart') lists ``num_frames`` frames but whose data
    is cut to ``keep`` of its bytes, as an interrupted copy leaves it."""
    frames, _, _ = make_tiny_scene(num_frames)
    full = write_clip(tmp_path / "full.mp4", frames, container_options={"movflags": "faststart"}, crf=30)
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * keep)])
    full.unlink()
    return cut


def clip_missing_last_frame(tmp_path, num_frames=24) -> Path:
    """A clip whose index lists ``num_frames`` frames but whose data ends just before the last one's:
    ``num_frames - 1`` decode, as a copy missing its final packet (or an edit list hiding one) leaves it."""
    import av

    frames, _, _ = make_tiny_scene(num_frames)
    full = write_clip(tmp_path / "full.mp4", frames, container_options={"movflags": "faststart"}, crf=30)
    with av.open(str(full)) as container:
        last = max((p for p in container.demux(container.streams.video[0]) if p.size > 0), key=lambda p: p.pos)
    short = tmp_path / "short.mp4"
    short.write_bytes(full.read_bytes()[: last.pos])
    full.unlink()
    return short


# Track-header display matrices (a b u / c d v / x y w; 16.16 fixed point, u v w 2.30) by clockwise turn.
_DISPLAY_MATRICES = {
    90: (0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000),
    180: (-0x10000, 0, 0, 0, -0x10000, 0, 0, 0, 0x40000000),
    270: (0, -0x10000, 0, 0x10000, 0, 0, 0, 0, 0x40000000),
}


def with_display_rotation(clip: Path, out: Path, clockwise: int) -> Path:
    """A copy of an mp4 whose track header tells players to turn the pictures ``clockwise`` degrees,
    as phones write portrait (90) or upside-down (180) clips."""
    import struct

    raw = bytearray(Path(clip).read_bytes())
    tkhd = raw.find(b"tkhd")
    assert tkhd > 0 and raw[tkhd + 4] == 0  # version 0 track header: the matrix starts 44 bytes after 'tkhd'
    raw[tkhd + 44 : tkhd + 80] = struct.pack(">9i", *_DISPLAY_MATRICES[clockwise])
    Path(out).write_bytes(bytes(raw))
    return Path(out)
