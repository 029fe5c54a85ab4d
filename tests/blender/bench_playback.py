"""Measures the DW-mesh object at EX-4D's size (512x512 pixels, 49 frames) inside Blender.

    .venv-blender/bin/python tests/blender/bench_playback.py -- ZIP VIDEO OUT_DIR [FRAMES]

import_s      building the object (mesh, UVs, attributes, 48 shape keys + keys, material), a piece per
              step as the add-on does (import_step_max_s: the longest step = the longest UI pause)
playback_ms   scene.frame_set(f) per frame = depsgraph evaluation of the shape-key mix (what playback
              pays before drawing), warm pass over all frames
save/reload   .blend size and times; positions checked after reload
read_frames_s reading 49 frames of the video at 512x512 through the sequencer, a few per step as the
              add-on does (read_frames_step_max_s: the longest step = the longest UI pause)
guide_frame_s one Workbench colour + mask guide frame at 512x512
read_guides_s reading 49 colour + mask guide PNGs at 512x512 as Generate does (GuideReader steps;
              read_guides_step_max_s the longest)
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import bpy  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402

ZIP, VIDEO, OUT = harness.args()[:3]
T = int(harness.args()[3]) if len(harness.args()) > 3 else 49
H = W = 512
R = {"frames": T, "size": [W, H]}
harness.install(ZIP)
dwmesh = harness.sub("blender.dwmesh")
video = harness.sub("blender.video")
workflow = harness.sub("blender.workflow")
guides = harness.sub("blender.guides")
scene = bpy.context.scene
props = scene.ex4d



def stepped(worker):
    """Drive a local job as the timer does; (total s, number of steps, longest step s)."""
    steps, t = [], time.perf_counter()
    try:
        while True:
            t0 = time.perf_counter()
            more = worker.step()
            steps.append(time.perf_counter() - t0)
            if not more:
                break
    finally:
        worker.finish()
    return time.perf_counter() - t, len(steps), max(steps)


reader = video.FrameReader(VIDEO, 0, T, W, H)  # as Reconstruct re-reads them after a reload
R["read_frames_s"], R["read_frames_steps"], R["read_frames_step_max_s"] = stepped(reader)
frames = reader.frames

# A DW-mesh like the backend's at 512x512: one vertex per pixel, two triangles per quad, moving depth.
yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
f = 500.0
verts = np.empty((T, H * W, 3), np.float32)
for i in range(T):
    d = 2.0 + 0.3 * np.sin(xx / 40.0 + i * 0.2) + 0.2 * np.cos(yy / 30.0)
    verts[i, :, 0] = ((xx + 0.5 - W / 2) / f * d).ravel()
    verts[i, :, 1] = (-(yy + 0.5 - H / 2) / f * d).ravel()
    verts[i, :, 2] = -d.ravel()
idx = np.arange(H * W).reshape(H, W)
a, b, c, e = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
faces = np.concatenate([np.stack([a, c, b], 1), np.stack([b, c, e], 1)]).astype(np.int32)
uv = np.stack([(xx.ravel() + 0.5) / W, 1.0 - (yy.ravel() + 0.5) / H], 1).astype(np.float32)
face_valid = np.random.default_rng(0).random((T, len(faces))) > 0.05
R["vertices"], R["faces"] = H * W, len(faces)

image = video.load_footage_image(VIDEO)
rig = dwmesh.ensure_rig(scene, "EX4D Rig bench")
t = time.perf_counter()
build = dwmesh.DWMeshBuild(scene, "bench", rig, verts, faces, uv, face_valid, image, 1, 0)  # as the add-on applies it
steps = []
while True:
    t0 = time.perf_counter()
    more = build.step()
    steps.append(time.perf_counter() - t0)
    if not more:
        break
build.finish()
obj = build.obj
R["import_s"] = time.perf_counter() - t
R["import_steps"], R["import_step_max_s"] = len(steps), max(steps)  # the longest pause of the UI
scene.frame_start, scene.frame_end = 1, T

def playback(check=False):
    times, errs = [], []
    for fr in range(1, T + 1):
        t0 = time.perf_counter()
        scene.frame_set(fr)
        if check:  # the evaluated mesh really holds frame fr's vertices
            co = obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).data.vertices[H * W // 2 + 7].co
            errs.append(float(np.abs(np.array(co) - verts[fr - 1, H * W // 2 + 7]).max()))
        times.append(time.perf_counter() - t0)
    return (np.array(times) * 1000, max(errs)) if check else np.array(times) * 1000

playback()  # cold pass
ms = playback()
R["playback_ms_mean"], R["playback_ms_p95"] = float(ms.mean()), float(np.percentile(ms, 95))
R["playback_fps"] = 1000.0 / float(ms.mean())
ms_checked, R["playback_check_err"] = playback(check=True)
R["playback_checked_ms_mean"] = float(ms_checked.mean())

# the alternative the shape keys replace: rewriting positions per frame from Python
me2 = bpy.data.meshes.new("direct")
me2.vertices.add(H * W)
times = []
for i in range(min(T, 10)):
    t0 = time.perf_counter()
    me2.vertices.foreach_set("co", verts[i].ravel())
    me2.update()
    times.append(time.perf_counter() - t0)
R["direct_foreach_set_ms"] = float(np.mean(times) * 1000)
bpy.data.meshes.remove(me2)

scene.frame_set(T)
pos = dwmesh.evaluated_positions(obj, bpy.context.evaluated_depsgraph_get())
R["pos_err_last_frame"] = float(np.abs(pos - verts[T - 1]).max())

path = os.path.join(OUT, "bench.blend")
t = time.perf_counter()
bpy.ops.wm.save_as_mainfile(filepath=path, compress=False)
R["save_s"] = time.perf_counter() - t
R["blend_mb"] = os.path.getsize(path) / 1e6
t = time.perf_counter()
bpy.ops.wm.open_mainfile(filepath=path)
R["reload_s"] = time.perf_counter() - t
scene = bpy.context.scene
obj = bpy.data.objects["DW-mesh bench"]
scene.frame_set(T // 2 + 1)
pos = dwmesh.evaluated_positions(obj, bpy.context.evaluated_depsgraph_get())
R["pos_err_after_reload"] = float(np.abs(pos - verts[T // 2]).max())

cam = bpy.data.objects.new("bench cam", bpy.data.cameras.new("bench cam"))
scene.collection.objects.link(cam)
cam.parent = obj.parent
dwmesh.set_lens(cam.data, np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]]), W, H)
cam.location = (0.2, 0.0, 0.1)
g = guides.GuideRender(scene, [obj], cam, os.path.join(OUT, "bench_guides"), 1, 2, W, H)
t = time.perf_counter()
g.step()
g.step()
g.finish()
R["guide_frame_s"] = (time.perf_counter() - t) / 2
import shutil  # noqa: E402

gdir = os.path.join(OUT, "bench_guides")
for i in range(3, T + 1):  # the two rendered frames stand in for a whole shot's guides
    for kind in ("color", "mask"):
        shutil.copy(os.path.join(gdir, f"{kind}_{(i - 1) % 2 + 1:04d}.png"), os.path.join(gdir, f"{kind}_{i:04d}.png"))
R["read_guides_s"], R["read_guides_steps"], R["read_guides_step_max_s"] = stepped(guides.GuideReader(gdir, T))
harness.write_json(os.path.join(OUT, "bench.json"), R)
print(R)
