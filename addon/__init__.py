"""EX-4D for Blender: new camera moves for a filmed shot.

Sidebar tab "EX-4D" in the 3D viewport: connect to the backend, import a video, reconstruct the
DW-mesh, key a camera move, render guides, generate, send the result to the Video Sequencer.

Layout (after glTF-Blender-IO): ``core/`` is pure Python (no bpy), ``blender/`` holds everything that
touches bpy, operators stay thin. ``_core/`` (errors, camera, protocol) is copied from the ex4d package
by ``ex4d addon build``. bpy is imported only inside register(), so ``core`` is testable without Blender.
"""


def _modules():
    from .blender import jobs, operators, panels, props, viewport, workflow  # noqa: F401  (workflow: result handlers)

    return props, operators, panels, jobs, viewport


def register():
    for m in _modules():
        m.register()


def unregister():
    for m in reversed(_modules()):
        m.unregister()
