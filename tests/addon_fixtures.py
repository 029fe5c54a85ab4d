"""Fixtures shared by the add-on tests: the built zip, a synthetic shot, a real backend process."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BLENDER_SCRIPTS = ROOT / "tests" / "blender"

# The Python that has the bpy module: .venv-blender (bpy 5.0.1, set up by .ci/setup) unless
# EX4D_TEST_BPY_PYTHON names another one, e.g. a venv with bpy 4.2 LTS (docs/addon.md, "Tests").
BPY_PYTHON_ENV = "EX4D_TEST_BPY_PYTHON"
if os.environ.get(BPY_PYTHON_ENV):
    BLENDER_PY = Path(os.environ[BPY_PYTHON_ENV]).expanduser()
    if not BLENDER_PY.exists():  # asked for explicitly: an error, not a silent skip
        raise RuntimeError(f"{BPY_PYTHON_ENV}={BLENDER_PY} does not exist")
else:
    BLENDER_PY = ROOT / ".venv-blender" / "bin" / "python"

needs_blender = pytest.mark.skipif(
    not BLENDER_PY.exists(),
    reason=f"no .venv-blender (bpy 5.0.1 needs Python 3.11; run `bash .ci/setup`) and no {BPY_PYTHON_ENV}",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_blender(script: str, *args, tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a tests/blender script in the bpy environment with a throw-away user resources folder."""
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp / "blender_user"), PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(BLENDER_PY), str(BLENDER_SCRIPTS / script), "--", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    (tmp / f"{Path(script).stem}.log").write_text(r.stdout + "\n---- stderr ----\n" + r.stderr)
    return r


def build_zip(out: Path) -> Path:
    """The real zip with its wheels; offline without cached wheels, the zip without them (the bpy
    environment has pyzmq already), with a warning."""
    import warnings

    from ex4d.commands.addon import build_addon
    from ex4d.errors import Ex4dError

    cache = Path(os.environ.get("EX4D_WHEEL_CACHE", ROOT / ".whl"))
    try:
        return build_addon(out, wheel_cache=cache, log=lambda *a: None)
    except Ex4dError as e:
        warnings.warn(f"building the add-on without wheels: {e}")
        return build_addon(out, with_wheels=False, log=lambda *a: None)


def synthetic_shot(folder: Path, width: int = 64, height: int = 48, frames: int = 9) -> tuple[Path, Path]:
    """A textured video and its depth: a back wall at 3 with a box at 1.5 in front (occlusion edges)."""
    from ex4d.video import write_video

    yy, xx = np.mgrid[0:height, 0:width]
    video, depth = [], []
    for t in range(frames):
        img = np.zeros((height, width, 3), np.uint8)
        img[..., 0] = (xx * 255 // (width - 1)).astype(np.uint8)
        img[..., 1] = (yy * 255 // (height - 1)).astype(np.uint8)
        img[..., 2] = ((xx // 8 + yy // 8 + t) % 2 * 200).astype(np.uint8)
        d = np.full((height, width), 3.0, np.float32)
        x0 = width // 3 + t // 3
        box = (xx >= x0) & (xx < x0 + width // 3) & (yy >= height // 4) & (yy < 3 * height // 4)
        d[box] = 1.5
        img[box] = (255, 220, 40)
        video.append(img)
        depth.append(d)
    vpath, dpath = folder / "shot.mp4", folder / "shot_depth.npz"
    write_video(vpath, np.stack(video), fps=24, crf=0)
    np.savez(dpath, depth=np.stack(depth))
    return vpath, dpath


class Backend:
    """``ex4d serve --generator tiny`` on a free loopback port, as its own process."""

    def __init__(self, jobs_dir: Path, log: Path, generator: str = "tiny"):
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "ex4d"), "serve", "--generator", generator, "--bind", self.address,
             "--jobs-dir", str(jobs_dir)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited: {log.read_text()[-2000:]}")
            if "ready" in log.read_text():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("backend did not start within 180 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
