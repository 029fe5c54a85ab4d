"""CPU timings of the recon I/O half (video read/fit/write, depth load/check/fit) on the EX-4D clip.

    .venv/bin/python bench/recon_io_cpu.py [path/to/input.mp4]

Prints one line per step: the best of 3 runs in milliseconds.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ex4d.depth.files import check_depth, fit_depth, load_depth
from ex4d.video import fit_frames, probe_video, read_video, write_npz_atomic, write_video


def best_of(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1000.0


def main() -> None:
    default = Path(__file__).parents[1].parent / "shared" / "data" / "ex4d-flower" / "input.mp4"
    video = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    frames = read_video(video).frames
    T, H, W = frames.shape[:3]
    depth = np.random.default_rng(0).uniform(1.0, 10.0, (T, H, W)).astype(np.float32)
    print(f"clip {video.name}: {T} frames {W}x{H}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_npz_atomic(tmp / "depth.npz", depth=depth)
        rows = [
            ("probe_video", lambda: probe_video(video)),
            ("read_video (all frames)", lambda: read_video(video)),
            ("fit_frames resize to 256x256", lambda: fit_frames(frames, 256, 256, "resize")),
            ("fit_frames crop to 512x288", lambda: fit_frames(frames, 512, 288, "crop")),
            ("write_video H.264 crf 16", lambda: write_video(tmp / "out.mp4", frames, 30)),
            ("write_npz_atomic depth (compressed)", lambda: write_npz_atomic(tmp / "d.npz", depth=depth)),
            ("load_depth npz", lambda: load_depth(tmp / "depth.npz")),
            ("check_depth", lambda: check_depth(depth, T, (H, W))),
            ("fit_depth crop to 512x288 (nearest)", lambda: fit_depth(depth, (W, H), 512, 288, "crop")),
        ]
        for name, fn in rows:
            print(f"{name:40s} {best_of(fn):8.1f} ms")


if __name__ == "__main__":
    main()
