"""The "EX-4D" sidebar tab of the 3D viewport."""

import bpy

from . import jobs


class _Panel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "EX-4D"


class EX4D_PT_backend(_Panel, bpy.types.Panel):
    bl_label = "Backend"
    bl_idname = "EX4D_PT_backend"

    def draw(self, context):
        p = context.scene.ex4d
        col = self.layout.column(align=True)
        col.prop(p, "address", text="")
        if not p.address.startswith(("tcp://127.", "tcp://localhost", "ipc://", "inproc://")):
            col.prop(p, "keys_dir")
        row = col.row(align=True)
        connected = jobs.RT.client is not None
        row.operator("ex4d.connect", text="Reconnect" if connected else "Connect", icon="LINKED")
        if connected:
            row.operator("ex4d.disconnect", text="", icon="UNLINKED")
        ok = p.backend_state == "connected"
        col.label(text=p.backend_state, icon="CHECKMARK" if ok else "ERROR" if connected else "BLANK1")
        if p.capabilities:
            for part in p.capabilities.split("; "):
                col.label(text=part)


class EX4D_PT_shot(_Panel, bpy.types.Panel):
    bl_label = "Shot"
    bl_idname = "EX4D_PT_shot"

    def draw(self, context):
        scene = context.scene
        p = scene.ex4d
        layout = self.layout
        layout.operator("ex4d.import_video", icon="FILE_MOVIE")
        if p.has_shot:
            col = layout.column(align=True)
            col.label(text=f"{p.shot_name}: {p.num_frames} frames at {p.width}x{p.height}")
            col.label(text=f"focal {p.fx:.0f} px ({p.intrinsics_source})")
        layout.prop(p, "output_dir")
        layout.prop(p, "depth_file")
        layout.prop(p, "depth_model")
        row = layout.row()
        row.enabled = p.has_shot and not jobs.busy(p)
        row.operator("ex4d.reconstruct", icon="MESH_GRID")
        if p.mesh is not None:
            layout.prop(p, "show_validity", icon="HIDE_OFF")
            layout.label(text="Vertex Paint 'ex4d_valid' black = regenerate", icon="BRUSH_DATA")


class EX4D_PT_camera(_Panel, bpy.types.Panel):
    bl_label = "Camera"
    bl_idname = "EX4D_PT_camera"

    def draw(self, context):
        p = context.scene.ex4d
        layout = self.layout
        layout.prop(p, "preset")
        row = layout.row(align=True)
        row.prop(p, "angle")
        row.prop(p, "distance_factor")
        op = layout.operator("ex4d.camera_preset", text="Key New Camera", icon="CAMERA_DATA")
        op.preset, op.angle, op.distance_factor = p.preset, p.angle, p.distance_factor
        op = layout.operator("ex4d.camera_preset", text="Key Active Camera", icon="CON_CAMERASOLVER")
        op.preset, op.angle, op.distance_factor, op.use_active_camera = p.preset, p.angle, p.distance_factor, True
        row = layout.row(align=True)
        row.operator("ex4d.import_camera", text="Import Path", icon="IMPORT")
        row.operator("ex4d.export_camera", text="Export Path", icon="EXPORT")


class EX4D_PT_generate(_Panel, bpy.types.Panel):
    bl_label = "Guides and Generation"
    bl_idname = "EX4D_PT_generate"

    def draw(self, context):
        scene = context.scene
        p = scene.ex4d
        layout = self.layout
        cam = scene.camera.name if scene.camera else "no active camera"
        busy = jobs.busy(p)
        row = layout.row()
        row.enabled = not busy
        row.operator("ex4d.render_guides", text=f"Render Guides ({cam})", icon="RENDER_ANIMATION")
        layout.prop(p, "prompt")
        layout.prop(p, "seed")
        row = layout.row()
        row.enabled = not busy and bool(p.guides_dir)
        row.operator("ex4d.generate", icon="PLAY")
        if p.job_state:
            box = layout.box()
            text = jobs.progress_text(p)
            if busy and p.job_total:
                if hasattr(box, "progress"):
                    box.progress(factor=p.job_step / max(p.job_total, 1), type="BAR", text=text)
                else:
                    box.label(text=text)
            else:
                box.label(text=text, icon="ERROR" if p.job_state == "failed" else "INFO")
            if busy and jobs.RT.client is None and p.job_id:
                box.label(text="not connected: press Connect to follow this job", icon="INFO")
            if busy:
                box.operator("ex4d.cancel", icon="CANCEL")
        row = layout.row()
        row.enabled = bool(p.result_dir)
        row.operator("ex4d.send_to_timeline", icon="SEQUENCE")


class EX4D_MT_main(bpy.types.Menu):
    """Every step as a menu entry (Render > EX-4D): F3 is a *menu* search, it finds only operators in menus."""

    bl_label = "EX-4D"
    bl_idname = "EX4D_MT_main"

    def draw(self, context):
        layout = self.layout
        layout.operator("ex4d.connect", text="Connect to Backend", icon="LINKED")
        layout.operator("ex4d.disconnect", text="Disconnect", icon="UNLINKED")
        layout.separator()
        layout.operator("ex4d.import_video", text="Import Video...", icon="FILE_MOVIE")
        layout.operator("ex4d.reconstruct", text="Reconstruct", icon="MESH_GRID")
        layout.separator()
        layout.operator_menu_enum("ex4d.camera_preset", "preset", text="Key Camera Move", icon="CAMERA_DATA")
        layout.operator("ex4d.import_camera", text="Import Camera Path...", icon="IMPORT")
        layout.operator("ex4d.export_camera", text="Export Camera Path...", icon="EXPORT")
        layout.separator()
        layout.operator("ex4d.render_guides", text="Render Guides", icon="RENDER_ANIMATION")
        layout.operator("ex4d.generate", text="Generate", icon="PLAY")
        layout.operator("ex4d.cancel", text="Cancel Job", icon="CANCEL")
        layout.operator("ex4d.send_to_timeline", text="Send to Timeline", icon="SEQUENCE")


def menu_func(self, context):
    self.layout.separator()
    self.layout.menu(EX4D_MT_main.bl_idname)


MENU_PARENT = "TOPBAR_MT_render"  # Render > EX-4D: reachable from every editor, and by F3

CLASSES = (EX4D_PT_backend, EX4D_PT_shot, EX4D_PT_camera, EX4D_PT_generate, EX4D_MT_main)


def register():
    for c in CLASSES:
        bpy.utils.register_class(c)
    getattr(bpy.types, MENU_PARENT).append(menu_func)


def unregister():
    getattr(bpy.types, MENU_PARENT).remove(menu_func)
    for c in reversed(CLASSES):
        bpy.utils.unregister_class(c)
