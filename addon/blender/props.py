"""Scene properties (``scene.ex4d``): connection, the shot, the running job. Saved with the .blend."""

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

PRESET_ITEMS = [
    ("30", "Arc 30°", "EX-4D's 30 degree arc around the subject"),
    ("60", "Arc 60°", "EX-4D's 60 degree arc"),
    ("90", "Arc 90°", "EX-4D's 90 degree arc"),
    ("180", "Sweep 180", "EX-4D's full left-right sweep"),
    ("orbit_left", "Orbit Left", "Orbit left around the subject"),
    ("orbit_right", "Orbit Right", "Orbit right around the subject"),
    ("orbit_up", "Orbit Up", "Orbit upwards around the subject"),
    ("orbit_down", "Orbit Down", "Orbit downwards around the subject"),
    ("zoom_in", "Zoom In", "Push in along the view axis"),
    ("zoom_out", "Zoom Out", "Pull out along the view axis"),
    ("dolly_left", "Dolly Left", "Track sideways to the left"),
    ("dolly_right", "Dolly Right", "Track sideways to the right"),
    ("crane_up", "Crane Up", "Rise"),
    ("crane_down", "Crane Down", "Sink"),
]


def _show_validity_changed(self, context):
    from . import viewport

    viewport.set_enabled(context.scene, self.show_validity)


class EX4D_SceneProps(bpy.types.PropertyGroup):
    # connection
    address: StringProperty(name="Backend", default="tcp://127.0.0.1:5555",
                            description="ZeroMQ address of `ex4d serve` (loopback by default)")
    keys_dir: StringProperty(name="Keys", subtype="DIR_PATH", default="",
                             description="Folder with server.key and client.key_secret from `ex4d keys generate` "
                                         "(only for a backend beyond this machine, started with --keys-dir)")
    capabilities: StringProperty(name="Capabilities", default="")
    backend_state: StringProperty(name="Backend state", default="not connected")

    # the shot
    video_path: StringProperty(name="Video", subtype="FILE_PATH", default="")
    shot_name: StringProperty(name="Shot", default="")
    image: PointerProperty(name="Footage", type=bpy.types.Image)
    src_width: IntProperty(default=0)
    src_height: IntProperty(default=0)
    first_frame: IntProperty(name="First video frame", default=0, min=0)
    num_frames: IntProperty(name="Frames", default=0, min=0)
    video_frames: IntProperty(default=0, min=0, description="Frames in the whole video (a depth file may cover them all)")
    frame_start: IntProperty(name="Scene start", default=1, description="Scene frame that shows video frame 'first'")
    width: IntProperty(name="Width", default=0)
    height: IntProperty(name="Height", default=0)
    fps: FloatProperty(default=24.0)
    fx: FloatProperty(default=0.0)
    fy: FloatProperty(default=0.0)
    cx: FloatProperty(default=0.0)
    cy: FloatProperty(default=0.0)
    intrinsics_source: StringProperty(default="")
    depth_file: StringProperty(name="Depth", subtype="FILE_PATH", default="",
                               description="Optional .npz/.npy with depth (T,H,W) float32 (+ K) for Reconstruct")
    depth_model: StringProperty(name="Depth model", default="",
                                description="Depth model on the backend, used when no depth file is given")
    depth_min: FloatProperty(default=0.0)
    depth_median: FloatProperty(default=0.0)
    scene_scale: FloatProperty(default=1.0, min=1e-6,
                               description="1 for depth in metres; larger for finer units (clip planes follow it)")
    clip_far: FloatProperty(default=0.0, min=0.0,
                            description="Far clip of the shot's cameras (0: 1000 x the scene scale)")
    rig: PointerProperty(name="Rig", type=bpy.types.Object)
    mesh: PointerProperty(name="DW-mesh", type=bpy.types.Object)
    source_camera: PointerProperty(name="Source camera", type=bpy.types.Object)
    output_dir: StringProperty(name="Output", subtype="DIR_PATH", default="//ex4d/",
                               description="Folder for guide renders and generated shots (// = next to the .blend)")

    show_validity: BoolProperty(name="Show Validity", default=False, update=_show_validity_changed,
                                description="Colour the DW-mesh by the current frame's guide mask (white = source, "
                                            "black = generated); turn off to paint ex4d_valid")

    # camera moves
    preset: EnumProperty(name="Move", items=PRESET_ITEMS, default="30")
    angle: FloatProperty(name="Angle", default=30.0, min=1.0, max=90.0, description="Orbit angle (orbit moves)")
    distance_factor: FloatProperty(name="Distance", default=0.0, min=0.0, soft_max=2.0,
                                   description="Move distance as a fraction of the subject depth (0 = preset default)")

    # guides and results
    guides_dir: StringProperty(name="Guides", subtype="DIR_PATH", default="")
    guides_camera: StringProperty(default="")
    result_dir: StringProperty(name="Result", subtype="DIR_PATH", default="")
    prompt: StringProperty(name="Prompt", default="")
    seed: IntProperty(name="Seed", default=0, min=0)

    # the running (or last) job; survives save + reload so a reconnect picks it up
    job_id: StringProperty(default="")
    job_kind: StringProperty(default="")
    job_state: StringProperty(default="")  # "", running, done, failed, cancelled
    job_stage: StringProperty(default="")
    job_step: IntProperty(default=0)
    job_total: IntProperty(default=0)
    job_message: StringProperty(default="")

    @property
    def has_shot(self) -> bool:
        return self.num_frames > 0 and self.width > 0


CLASSES = (EX4D_SceneProps,)


def register():
    for c in CLASSES:
        bpy.utils.register_class(c)
    bpy.types.Scene.ex4d = PointerProperty(type=EX4D_SceneProps)


def unregister():
    del bpy.types.Scene.ex4d
    for c in reversed(CLASSES):
        bpy.utils.unregister_class(c)
