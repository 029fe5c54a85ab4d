"""Show Validity: the viewport colours the DW-mesh by the current frame's guide mask.

A persistent frame_change_post handler rewrites ``ex4d_mask`` (corner colours: white = valid source
content, black = generated) for the scene's DW-meshes while ``scene.ex4d.show_validity`` is on, so
scrubbing the timeline in Solid mode with Attribute colour shows what each frame's guide will mask.
Turn it off to paint ``ex4d_valid`` (Vertex Paint paints the active colour attribute).
"""

import bpy

from . import dwmesh
from ..core import validity


def _dwmeshes(scene):
    return [o for o in scene.objects if o.type == "MESH" and dwmesh.PROP_SHOT in o]


def refresh(scene) -> None:
    for obj in _dwmeshes(scene):
        t = min(max(scene.frame_current - int(obj[dwmesh.PROP_FRAME_START]), 0), int(obj[dwmesh.PROP_FRAMES]) - 1)
        dwmesh.update_mask_attribute(obj.data, t)


def set_enabled(scene, on: bool) -> None:
    """Switch the meshes' active colour and every 3D view's Solid shading to the mask (or back)."""
    name = validity.MASK_ATTR if on else validity.PAINT_ATTR
    if on:
        refresh(scene)
    for obj in _dwmeshes(scene):
        if obj.data.color_attributes.get(name) is not None:
            obj.data.color_attributes.active_color_name = name
    wm = bpy.context.window_manager
    for window in getattr(wm, "windows", []):
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                shading = area.spaces.active.shading
                if on:
                    shading.type = "SOLID"
                    shading.color_type = "VERTEX" if "VERTEX" in shading.bl_rna.properties["color_type"].enum_items else "ATTRIBUTE"
                area.tag_redraw()


@bpy.app.handlers.persistent
def on_frame_change(scene, depsgraph=None):
    if getattr(scene, "ex4d", None) is not None and scene.ex4d.show_validity:
        refresh(scene)


def register():
    if on_frame_change not in bpy.app.handlers.frame_change_post:
        bpy.app.handlers.frame_change_post.append(on_frame_change)


def unregister():
    if on_frame_change in bpy.app.handlers.frame_change_post:
        bpy.app.handlers.frame_change_post.remove(on_frame_change)
