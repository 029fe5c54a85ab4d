"""Shared by the scripts run inside the bpy environment (.venv-blender/bin/python SCRIPT -- ARGS).

install(zip): the real extension install path (bpy.ops.extensions.package_install_files), then the
add-on module is bl_ext.user_default.ex4d. Scripts write their findings as JSON for the pytest side.
"""

import importlib
import json
import os
import sys
import time

import bpy

MODULE = "bl_ext.user_default.ex4d"


def args() -> list:
    return sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []


def install(zip_path: str):
    """Install + enable the built extension; returns the add-on's top module."""
    assert os.environ.get("BLENDER_USER_RESOURCES"), "tests must set BLENDER_USER_RESOURCES"
    t0 = time.perf_counter()
    res = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    assert res == {"FINISHED"}, res
    mod = importlib.import_module(MODULE)
    assert hasattr(bpy.types.Scene, "ex4d"), "add-on did not register"
    return mod, time.perf_counter() - t0


def sub(name: str):
    return importlib.import_module(f"{MODULE}.{name}")


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=float)
    os.replace(tmp, path)


def pump(scene, until, timeout_s: float = 60.0, sleep_s: float = 0.05):
    """Call the add-on's timer step (bpy runs no event loop) until ``until()`` or the timeout."""
    jobs = sub("blender.jobs")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        jobs.poll_once(scene)
        if until():
            return time.perf_counter() - t0
        time.sleep(sleep_s)
    raise TimeoutError(f"gave up after {timeout_s} s (job state {scene.ex4d.job_state!r}, {scene.ex4d.job_message!r})")
