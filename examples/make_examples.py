"""Re-make the example shots in this folder (deterministic; run from the repository root):

    .venv/bin/python examples/make_examples.py

examples/synthetic-room/: a 256x192, 24-frame, 24 fps clip of the project's synthetic room scene
(``ex4d.synthetic.make_example``, seed 7: textured walls, moving spheres and boxes, exact depth),
with

* ``video.mp4``       - the source video (H.264),
* ``depth.npz``       - ``depth`` float32 (24,192,256) exact z-depth and ``K`` 3x3 (pixels),
* ``camera_path.json`` - a transforms.json camera path (an eased orbit to the left that rises), one
  camera per video frame, as a Blender or NeRF tool would export it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ex4d.camera import CameraPath, Intrinsics, orbit_poses, pivot_depth, write_transforms
from ex4d.synthetic import make_example

HERE = Path(__file__).resolve().parent


def make_synthetic_room(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        made = make_example(tmp, width=256, height=192, num_frames=24, seed=7, fps=24)
        os.replace(made["video"], out / "video.mp4")
        os.replace(made["depth"], out / "depth.npz")
    with np.load(out / "depth.npz") as z:
        depth0, K = z["depth"][0], z["K"]
    # An orbit 25 degrees to the left and 10 degrees up around the median depth of frame 0, eased.
    poses = orbit_poses(24, pivot_depth(depth0, "median"), yaw_deg=-25.0, pitch_deg=10.0, easing="smooth")
    intr = Intrinsics.from_K(K, 256, 192)
    write_transforms(CameraPath(poses, intr.K, 256, 192, name="orbit_left_rise"), out / "camera_path.json")


if __name__ == "__main__":
    make_synthetic_room(HERE / "synthetic-room")
    for p in sorted((HERE / "synthetic-room").iterdir()):
        print(f"{p.relative_to(HERE.parent)}  {p.stat().st_size / 1024:.0f} KiB")
    shutil.rmtree(HERE / "synthetic-room" / "__pycache__", ignore_errors=True)
