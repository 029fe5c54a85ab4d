"""Reading a real clip inside Blender: time, and the frames saved for comparison with PyAV.

    .venv-blender/bin/python tests/blender/bench_read_clip.py -- ZIP VIDEO OUT.npy [FRAMES] [SIZE]

then in .venv: ex4d.video.read_video + fit_frames(frames, SIZE, SIZE, "crop") vs OUT.npy.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import harness  # noqa: E402

args = harness.args()
ZIP, VIDEO, OUT = args[:3]
T = int(args[3]) if len(args) > 3 else 49
S = int(args[4]) if len(args) > 4 else 512
harness.install(ZIP)
video = harness.sub("blender.video")
t = time.perf_counter()
frames = video.read_frames(VIDEO, 0, T, S, S)
print(f"read {T} frames at {S}x{S} in {time.perf_counter() - t:.2f} s")
np.save(OUT, frames)
