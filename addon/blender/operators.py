"""Operators: thin wrappers over workflow.py. Every one is in F3 search (bl_label + bl_description).

Errors the user can cause arrive as ex4d Ex4dError and become ``self.report({'ERROR'}, message)``; any
other exception becomes a one-line report naming the step (traceback in the console), never a traceback.
Long work starts a job and returns at once; ``invoke`` adds a modal watcher so Esc cancels it.
"""

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ExportHelper, ImportHelper

from . import jobs, workflow
from .props import PRESET_ITEMS
from ..core import errors


def _run(op, fn, *args, **kwargs):
    """Call ``fn``; errors become one-line reports. Returns (ok, value).

    A user error (Ex4dError) is reported as it is; anything else is a bug: its traceback goes to the
    console and the report names the step. An operator that starts a job (``ex4d_step``) also shows
    the failure on the panel (job_state/job_message), unless a job is running or a finished result
    waits to be fetched again (that state is kept)."""
    step = getattr(op, "ex4d_step", "") or op.bl_label.replace("EX-4D: ", "").lower()
    try:
        return True, fn(*args, **kwargs)
    except errors.Ex4dError as e:
        text = str(e)
    except Exception as e:  # a bug: never a traceback in the artist's report
        import traceback

        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        text = f"{step} failed: {type(e).__name__}: {first} (a bug in the add-on; the console has details)"
    op.report({"ERROR"}, text)
    props = getattr(bpy.context.scene, "ex4d", None)
    if getattr(op, "ex4d_step", "") and props is not None and not jobs.busy(props) and props.job_stage not in (jobs.NOT_APPLIED, jobs.BACKEND_LOST):
        props.job_kind, props.job_state, props.job_stage = op.ex4d_step, "failed", "failed"
        props.job_step = props.job_total = 0
        props.job_message = text if text.startswith(f"{op.ex4d_step} failed") else f"{op.ex4d_step} failed: {text}"
    return False, None


def _start_watch(context) -> None:
    if context.window is not None and not bpy.app.background and jobs.RT.watchers == 0:  # modal needs an event loop
        bpy.ops.ex4d.watch_job("INVOKE_DEFAULT")


class EX4D_OT_connect(bpy.types.Operator):
    bl_idname = "ex4d.connect"
    bl_label = "EX-4D: Connect to Backend"
    bl_description = ("Connect to the EX-4D backend at the address above and show what it can do "
                      "(picks up the scene's job, running or finished)")

    wait: BoolProperty(name="Wait", default=False, options={"SKIP_SAVE"},
                       description="For scripts: return only once the backend answered (at most 3 s)")

    def execute(self, context):
        ok, _ = _run(self, jobs.connect, context.scene, self.wait)
        if not ok:
            return {"CANCELLED"}
        p = context.scene.ex4d
        self.report({"INFO"}, f"connected: {p.capabilities}" if self.wait else f"connecting to {p.address}...")
        return {"FINISHED"}

    def invoke(self, context, event):
        result = self.execute(context)
        if result == {"FINISHED"}:
            _start_watch(context)  # the answer, or the report that none came
        return result


class EX4D_OT_disconnect(bpy.types.Operator):
    bl_idname = "ex4d.disconnect"
    bl_label = "EX-4D: Disconnect"
    bl_description = "Close the connection to the backend (jobs keep running there)"

    def execute(self, context):
        jobs.disconnect(context.scene)
        return {"FINISHED"}


class EX4D_OT_import_video(bpy.types.Operator, ImportHelper):
    bl_idname = "ex4d.import_video"
    ex4d_step = "import"  # failures show on the panel too
    bl_label = "EX-4D: Import Video"
    bl_description = "Read a video's frames at the working size and set the scene up for the shot"
    bl_options = {"REGISTER"}  # the frames arrive later, from the timer: nothing to undo here

    filter_glob: StringProperty(default="*.mp4;*.mov;*.mkv;*.avi;*.webm", options={"HIDDEN"})
    first_frame: IntProperty(name="First frame", default=0, min=0, description="First video frame (0-based)")
    num_frames: IntProperty(name="Frames", default=49, min=0, description="Number of frames (0 = to the end)")
    width: IntProperty(name="Width", default=512, min=16, max=4096)
    height: IntProperty(name="Height", default=512, min=16, max=4096)
    focal_px: FloatProperty(name="Focal (px)", default=0.0, min=0.0, description="Focal length in pixels at the working size (0 = unknown)")
    fov_deg: FloatProperty(name="FOV (°)", default=0.0, min=0.0, max=179.0, description="Horizontal field of view (0 = unknown)")

    def execute(self, context):
        ok, reader = _run(self, workflow.start_import, context.scene, self.filepath, self.first_frame, self.num_frames,
                          self.width, self.height, self.focal_px, self.fov_deg)
        if not ok:
            return {"CANCELLED"}
        _start_watch(context)  # the file browser calls execute, not our invoke
        self.report({"INFO"}, f"reading {reader.num_frames} frames...")
        return {"FINISHED"}


class _JobOperator:
    def invoke(self, context, event):
        result = self.execute(context)
        if result == {"FINISHED"}:
            _start_watch(context)
        return result


class EX4D_OT_reconstruct(_JobOperator, bpy.types.Operator):
    bl_idname = "ex4d.reconstruct"
    ex4d_step = "reconstruct"  # failures show on the panel too
    bl_label = "EX-4D: Reconstruct"
    bl_description = "Send the frames (and depth, if given) to the backend and build the DW-mesh and source camera"

    depth_file: StringProperty(name="Depth file", subtype="FILE_PATH", default="",
                               description="Optional .npz with depth (T,H,W) float32 (+ K); empty = the backend estimates depth")
    depth_model: StringProperty(name="Depth model", default="",
                                description="Depth model on the backend when no depth file is given (see its capabilities)")

    def execute(self, context):
        p = context.scene.ex4d
        ok, job = _run(self, workflow.submit_reconstruct, context.scene, self.depth_file or p.depth_file,
                       self.depth_model or p.depth_model)
        return {"FINISHED"} if ok else {"CANCELLED"}


class EX4D_OT_camera_preset(bpy.types.Operator):
    bl_idname = "ex4d.camera_preset"
    bl_label = "EX-4D: Key Camera Move"
    bl_description = "Key a camera move (EX-4D arcs, orbit, zoom, dolly, crane) on a camera you can then edit freely"
    bl_options = {"REGISTER", "UNDO"}

    preset: EnumProperty(name="Move", items=PRESET_ITEMS, default="30")
    angle: FloatProperty(name="Angle", default=30.0, min=1.0, max=90.0)
    distance_factor: FloatProperty(name="Distance", default=0.0, min=0.0, soft_max=2.0)
    use_active_camera: BoolProperty(name="On active camera", default=False,
                                    description="Key the scene's active camera instead of adding a new one")

    def execute(self, context):
        scene = context.scene
        cam = scene.camera if self.use_active_camera else None
        if cam is not None and cam == scene.ex4d.source_camera:
            cam = None  # the source camera stays where it filmed
        ok, value = _run(self, workflow.key_preset, scene, self.preset, cam, self.angle, self.distance_factor)
        if not ok:
            return {"CANCELLED"}
        self.report({"INFO"}, f"keyed '{self.preset}' on {value[0].name}")
        return {"FINISHED"}


class EX4D_OT_export_camera(bpy.types.Operator, ExportHelper):
    bl_idname = "ex4d.export_camera"
    bl_label = "EX-4D: Export Camera Path"
    bl_description = "Write the active camera's path over the shot as transforms.json (for the ex4d CLI and NeRF tools)"
    filename_ext = ".json"
    filter_glob: StringProperty(default="*.json", options={"HIDDEN"})

    def execute(self, context):
        from . import cameras

        scene = context.scene
        if scene.camera is None:
            self.report({"ERROR"}, "no active camera to export")
            return {"CANCELLED"}
        ok, _ = _run(self, workflow.require_shot, scene.ex4d)
        ok = ok and _run(self, cameras.export_transforms, scene, scene.ex4d, scene.camera, self.filepath)[0]
        return {"FINISHED"} if ok else {"CANCELLED"}


class EX4D_OT_import_camera(bpy.types.Operator, ImportHelper):
    bl_idname = "ex4d.import_camera"
    bl_label = "EX-4D: Import Camera Path"
    bl_description = "Key a new camera from a transforms.json camera path (instant-ngp / nerfstudio layout)"
    bl_options = {"REGISTER", "UNDO"}
    filter_glob: StringProperty(default="*.json", options={"HIDDEN"})

    def execute(self, context):
        from . import cameras

        ok, value = _run(self, cameras.import_transforms, context.scene, context.scene.ex4d, self.filepath)
        if not ok:
            return {"CANCELLED"}
        context.scene.camera = value[0]
        return {"FINISHED"}


class EX4D_OT_render_guides(_JobOperator, bpy.types.Operator):
    bl_idname = "ex4d.render_guides"
    ex4d_step = "guides"  # failures show on the panel too
    bl_label = "EX-4D: Render Guides"
    bl_description = "Render the colour and mask guides of the DW-mesh along the active camera (Workbench)"

    def execute(self, context):
        ok, _ = _run(self, workflow.start_guides, context.scene)
        return {"FINISHED"} if ok else {"CANCELLED"}


class EX4D_OT_generate(_JobOperator, bpy.types.Operator):
    bl_idname = "ex4d.generate"
    ex4d_step = "generate"  # failures show on the panel too
    bl_label = "EX-4D: Generate"
    bl_description = "Send the guides to the backend and generate the new shot"

    def execute(self, context):
        ok, _ = _run(self, workflow.submit_generate, context.scene)
        return {"FINISHED"} if ok else {"CANCELLED"}


class EX4D_OT_cancel(bpy.types.Operator):
    bl_idname = "ex4d.cancel"
    bl_label = "EX-4D: Cancel Job"
    bl_description = "Stop the running EX-4D job"

    def execute(self, context):
        ok, _ = _run(self, jobs.cancel, context.scene)
        return {"FINISHED"} if ok else {"CANCELLED"}


class EX4D_OT_send_to_timeline(bpy.types.Operator):
    bl_idname = "ex4d.send_to_timeline"
    bl_label = "EX-4D: Send to Timeline"
    bl_description = "Put the generated shot in the Video Sequencer at the shot's frames (optionally guide and source beside it)"
    bl_options = {"REGISTER", "UNDO"}

    with_guides: BoolProperty(name="Guide", default=True, description="Also add the colour guide")
    with_source: BoolProperty(name="Source", default=True, description="Also add the source clip")

    def execute(self, context):
        ok, made = _run(self, workflow.send_to_timeline, context.scene, self.with_guides, self.with_source)
        if not ok:
            return {"CANCELLED"}
        self.report({"INFO"}, "added " + ", ".join(s.name for s in made))
        return {"FINISHED"}


class EX4D_OT_watch_job(bpy.types.Operator):
    """Modal: polls the running job, shows reports, Esc cancels."""

    bl_idname = "ex4d.watch_job"
    bl_label = "EX-4D: Watch Job"
    bl_description = "Follow the running EX-4D job (Esc cancels it)"

    _timer = None

    def invoke(self, context, event):
        self._timer = context.window_manager.event_timer_add(jobs.TIMER_BUSY_S, window=context.window)
        context.window_manager.modal_handler_add(self)
        jobs.RT.watchers += 1
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        scene = context.scene
        if event.type == "ESC" and event.value == "PRESS":
            _run(self, jobs.cancel, scene)
        elif event.type == "TIMER":
            jobs.poll_once(scene)
            for level, text in jobs.take_messages():
                self.report({level}, text)
            if not jobs.busy(scene.ex4d) and jobs.RT.connecting is None:
                return self._done(context)
        return {"PASS_THROUGH"}

    def _done(self, context):
        context.window_manager.event_timer_remove(self._timer)
        jobs.RT.watchers = max(0, jobs.RT.watchers - 1)
        return {"FINISHED"}


CLASSES = (
    EX4D_OT_connect,
    EX4D_OT_disconnect,
    EX4D_OT_import_video,
    EX4D_OT_reconstruct,
    EX4D_OT_camera_preset,
    EX4D_OT_export_camera,
    EX4D_OT_import_camera,
    EX4D_OT_render_guides,
    EX4D_OT_generate,
    EX4D_OT_cancel,
    EX4D_OT_send_to_timeline,
    EX4D_OT_watch_job,
)


def register():
    for c in CLASSES:
        bpy.utils.register_class(c)


def unregister():
    for c in reversed(CLASSES):
        bpy.utils.unregister_class(c)
