"""Measurement at EX-4D's size (512x512, 49 frames): DW-mesh import, playback cost per frame, save +
reload, frame reading and one guide frame. Numbers go to docs/benchmarks.md."""

from __future__ import annotations

import json

import numpy as np
import pytest

from addon_fixtures import build_zip, needs_blender, run_blender

pytestmark = [needs_blender, pytest.mark.blender, pytest.mark.slow]


def test_dwmesh_playback_at_512x512x49(tmp_path):
    from ex4d.video import write_video

    yy, xx = np.mgrid[0:480, 0:640]
    frames = np.stack([np.stack([(xx + 5 * t) % 256, yy % 256, (xx // 32 + yy // 32) % 2 * 255], -1)
                       for t in range(49)]).astype(np.uint8)
    video = write_video(tmp_path / "v.mp4", frames, fps=24)
    r = run_blender("bench_playback.py", build_zip(tmp_path / "dist"), video, tmp_path, tmp=tmp_path)
    assert (tmp_path / "bench.json").exists(), r.stdout[-3000:] + r.stderr[-3000:]
    b = json.loads((tmp_path / "bench.json").read_text())
    print(json.dumps(b, indent=1))
    assert b["pos_err_last_frame"] == 0 and b["playback_check_err"] < 1e-6 and b["pos_err_after_reload"] == 0
    assert b["playback_ms_mean"] < 1000 / 24  # evaluation leaves room for drawing at 24 fps
    assert b["import_steps"] >= 8 and b["import_step_max_s"] < b["import_s"] / 2  # built a piece per timer step
    assert b["read_frames_steps"] >= 8 and b["read_frames_step_max_s"] < b["read_frames_s"] / 4  # read stepwise
    assert b["read_guides_steps"] >= 8 and b["read_guides_step_max_s"] < b["read_guides_s"] / 4
