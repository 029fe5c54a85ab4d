"""EX-4D for Blender: new camera moves for a filmed shot.

Sidebar tab "EX-4D" in the 3D viewport: connect to the backend, import a video, reconstruct the
DW-mesh, key a camera move, render guides, generate, send the result to the Video Sequencer.

Layout (after glTF-Blender-IO): ``core/`` is pure Python (no bpy), ``blender/`` holds everything that
touches bpy, operators stay thin. ``_core/`` (errors, camera, protocol) is copied from the ex4d package
by ``ex4d addon build``.
"""

if "bpy" in locals():  # script reload (F8 / reload scripts)
    import importlib

    for _name in ("props", "jobs", "operators", "panels"):
        if _name in locals():
            importlib.reload(locals()[_name])

import bpy  # noqa: F401

from .blender import jobs, operators, panels, props


def register():
    props.register()
    operators.register()
    panels.register()
    jobs.register()


def unregister():
    jobs.unregister()
    panels.unregister()
    operators.unregister()
    props.unregister()
