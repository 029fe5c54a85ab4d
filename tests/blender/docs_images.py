"""Pictures for docs/addon.md, rendered headless from a test scene through the add-on's operators.

    .venv-blender/bin/python tests/blender/docs_images.py -- ZIP VIDEO DEPTH ADDRESS OUT_DIR IMG_DIR

Writes IMG_DIR/addon_workflow.png (source | DW-mesh seen from an oblique viewport camera | colour guide
| mask | generated) and IMG_DIR/addon_dwmesh.png (the DW-mesh, larger).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import bpy  # noqa: E402
import numpy as np  # noqa: E402
from mathutils import Vector  # noqa: E402

import harness  # noqa: E402

ZIP, VIDEO, DEPTH, ADDRESS, OUT, IMG = harness.args()[:6]
harness.install(ZIP)
video = harness.sub("blender.video")
guides = harness.sub("blender.guides")
workflow = harness.sub("blender.workflow")
scene = bpy.context.scene
p = scene.ex4d
p.address = ADDRESS
p.output_dir = os.path.join(OUT, "ex4d_out") + os.sep
bpy.ops.ex4d.connect(wait=True)
bpy.ops.ex4d.import_video(filepath=VIDEO, first_frame=0, num_frames=9, width=160, height=120, fov_deg=60.0)
harness.pump(scene, lambda: p.job_state != "running", 120, sleep_s=0)
bpy.ops.ex4d.reconstruct(depth_file=DEPTH)
harness.pump(scene, lambda: p.job_state != "running", 120)
bpy.ops.ex4d.camera_preset(preset="orbit_right", angle=25.0)
new_cam = scene.camera
bpy.ops.ex4d.render_guides()
harness.pump(scene, lambda: p.job_state != "running", 300, sleep_s=0)
bpy.ops.ex4d.generate()
harness.pump(scene, lambda: p.job_state != "running", 300)
assert p.job_state == "done", p.job_message
bpy.ops.ex4d.send_to_timeline()
t = p.num_frames - 1

# The DW-mesh as the artist sees it in the viewport: an oblique camera, footage texture, studio light.
view = bpy.data.objects.new("docs view", bpy.data.cameras.new("docs view"))
scene.collection.objects.link(view)
rig = p.rig
target = rig.matrix_world @ Vector((0.0, 0.0, -2.2))
view.location = rig.matrix_world @ Vector((-2.5, 1.2, 0.5))
view.rotation_euler = (target - view.location).to_track_quat("-Z", "Y").to_euler()
view.data.lens = 20
for obj in scene.objects:  # the startup scene's cube and light are not part of the shot
    if obj.type not in ("MESH", "CAMERA") or (obj.type == "MESH" and obj != p.mesh):
        obj.hide_render = True
scene.frame_set(p.frame_start + t)
r = scene.render
r.engine = "BLENDER_WORKBENCH"
r.resolution_x, r.resolution_y = 320, 240
r.use_sequencer = False  # the timeline now holds strips: render the 3D scene, not the sequencer
scene.view_settings.view_transform = "Standard"
sh = scene.display.shading
sh.light, sh.color_type = "STUDIO", "TEXTURE"
scene.world.color = (0.05, 0.05, 0.06)
scene.camera = view
path = os.path.join(OUT, "dwmesh_view.png")
bpy.ops.render.render(write_still=False)
bpy.data.images["Render Result"].save_render(path, scene=scene)
dw = video.load_png_rgb(path)

frames = workflow.shot_frames(p)
color, mask = guides.load_guides(p.guides_dir, p.num_frames)
result = video.load_png_rgb(os.path.join(p.result_dir, f"shot_{t + 1:04d}.png"))


def tile(img):  # 120 px tall
    h = img.shape[0]
    if h != 120:
        step = h // 120
        img = img[::step, ::step]
    return img


gap = np.full((120, 4, 3), 255, np.uint8)
row = [tile(frames[t]), tile(dw), tile(color[t]), tile(np.repeat(mask[t][..., None] * 255, 3, 2).astype(np.uint8)), tile(result)]
strip = np.concatenate(sum(([x, gap] for x in row), [])[:-1], axis=1)
os.makedirs(IMG, exist_ok=True)
video.save_png_rgb(os.path.join(IMG, "addon_workflow.png"), strip)
video.save_png_rgb(os.path.join(IMG, "addon_dwmesh.png"), dw)
print("camera", new_cam.name, "strip", strip.shape)
