"""Render Blender Z passes to OpenEXR (run inside the bpy environment).

    .venv-blender/bin/python tests/blender/render_zpass.py -- OUT_DIR ENGINE [ENGINE ...]

Scene: a 4x4 plane 5 units in front of a 12 mm camera (a wide view, so planar and radial depth differ a
lot at the corners), 32x24 pixels; the plane covers the centre and the sky shows at the corners. Writes
OUT_DIR/z_<ENGINE>.exr as Blender's multilayer OpenEXR, as an artist's render would.
"""

import sys
from pathlib import Path

import bpy

args = sys.argv[sys.argv.index("--") + 1:]
out_dir, engines = Path(args[0]), args[1:]
bpy.ops.wm.read_factory_settings(use_empty=True)
scene = bpy.context.scene
bpy.ops.mesh.primitive_plane_add(size=4, location=(0, 0, 0))
cam = bpy.data.objects.new("cam", bpy.data.cameras.new("cam"))
cam.data.lens = 12
cam.location = (0, 0, 5)  # looks down -z at the plane
scene.collection.objects.link(cam)
scene.camera = cam
scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 32, 24, 100
scene.view_layers[0].use_pass_z = True
settings = scene.render.image_settings
settings.media_type = "MULTI_LAYER_IMAGE"
settings.file_format = "OPEN_EXR_MULTILAYER"
for engine in engines:
    scene.render.engine = engine
    if engine == "CYCLES":
        scene.cycles.samples = 1
        scene.cycles.device = "CPU"
    scene.render.filepath = str(out_dir / f"z_{engine}.exr")
    bpy.ops.render.render(write_still=True)
