"""The whole artist workflow, run inside the bpy environment against a real backend.

    .venv-blender/bin/python tests/blender/workflow.py -- ZIP VIDEO DEPTH ADDRESS DEAD_ADDRESS BACKEND_PID OUT_DIR

Every step goes through the add-on's operators (bpy.ops.ex4d.*) where one exists; the timer step is
pumped by hand because the bpy module runs no event loop. Findings -> OUT_DIR/workflow.json (+ npz).
"""

import os
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))

import bpy  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402

ZIP, VIDEO, DEPTH, ADDRESS, DEAD, BACKEND_PID, OUT = harness.args()[:7]
R = {"steps": {}}
T0 = time.perf_counter()


def step(name):
    def deco(fn):
        t = time.perf_counter()
        try:
            out = fn() or {}
            out["ok"] = True
        except Exception as e:  # recorded for the pytest side, which asserts on it
            out = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        out["seconds"] = time.perf_counter() - t
        R["steps"][name] = out
        harness.write_json(os.path.join(OUT, "workflow.json"), R)
        return fn

    return deco


mod, install_s = harness.install(ZIP)
R["install_s"] = install_s
R["blender_version"] = bpy.app.version_string
import zipfile  # noqa: E402

import zmq  # noqa: E402  (the one the add-on got: the zip's wheel when it has one)

R["zmq"] = {"version": zmq.__version__, "file": zmq.__file__,
            "zip_wheels": [n for n in zipfile.ZipFile(ZIP).namelist() if n.startswith("wheels/")]}
R["operators"] = sorted(dir(bpy.ops.ex4d))
R["descriptions"] = {n: getattr(bpy.ops.ex4d, n).get_rna_type().description for n in R["operators"]}
R["labels"] = {n: getattr(bpy.ops.ex4d, n).get_rna_type().name for n in R["operators"]}
_icons = set(bpy.types.UILayout.bl_rna.functions["operator"].parameters["icon"].enum_items.keys())
_panel_src = open(os.path.join(os.path.dirname(mod.__file__), "blender", "panels.py")).read()
import re  # noqa: E402

R["missing_icons"] = sorted(set(re.findall(r'icon="([A-Z0-9_]+)"', _panel_src)) - _icons)
R["panels"] = sorted(c.bl_label for c in bpy.types.Panel.__subclasses__() if getattr(c, "bl_category", "") == "EX-4D")
jobs = harness.sub("blender.jobs")
workflow = harness.sub("blender.workflow")
dwmesh = harness.sub("blender.dwmesh")
bcams = harness.sub("blender.cameras")
core = harness.sub("core")
camera = core.camera
scene = bpy.context.scene
props = scene.ex4d
captured = {}
_orig_apply = dict(jobs.RT.result_handlers)


def call(op, **kw):
    """Run an operator; an ERROR report raises RuntimeError in background mode: return it as text."""
    try:
        return sorted(op(**kw)), None
    except RuntimeError as e:
        return ["CANCELLED"], str(e)


def capture(kind):
    def handler(sc, result):
        if hasattr(result, "arrays"):  # the backend's result (not the DW-mesh build that applies it)
            captured[kind] = result
        return _orig_apply[kind](sc, result)

    return handler


jobs.RT.result_handlers.update(reconstruct=capture("reconstruct"), generate=capture("generate"))


def backend_job_state(job_id, wait_for=None, timeout_s=3.0):
    """The job's state as the backend reports it to another client ("unknown_job" once released); with
    ``wait_for``, keep asking (pumping the add-on) until it is that state or the timeout."""
    Client = core.protocol_client().Client
    t0 = time.perf_counter()
    with Client(ADDRESS, timeout_s=3.0) as c:
        while True:
            try:
                state = c.status(job_id, timeout_s=3.0).get("state")
            except core.errors.Ex4dError as e:
                state = getattr(e, "code", type(e).__name__)
            if wait_for is None or state == wait_for or time.perf_counter() - t0 > timeout_s:
                return state
            jobs.poll_once(bpy.context.scene)
            time.sleep(0.1)


def ui_snapshot():
    """Draw every EX-4D panel and the Render > EX-4D menu on a fake layout (the bpy module draws no UI)."""
    panels = harness.sub("blender.panels")
    out = {"panels": {}, "problems": []}
    for cls in panels.CLASSES:
        log, problems = harness.draw_ui(cls)
        out["panels"][cls.bl_label] = [list(map(str, x)) for x in log]
        out["problems"] += [f"{cls.bl_label}: {p}" for p in problems]
    parent = getattr(bpy.types, panels.MENU_PARENT)
    out["menu_in_parent"] = panels.menu_func in getattr(parent.draw, "_draw_funcs", [])
    log, problems = harness.draw_ui(panels.menu_func)
    out["parent_entry"] = [list(map(str, x)) for x in log]
    out["problems"] += problems
    return out


@step("ui_idle")
def _():
    return ui_snapshot()


@step("connect_dead_backend")
def _():
    props.address = DEAD
    jobs.take_messages()
    t = time.perf_counter()
    res, msg = call(bpy.ops.ex4d.connect)  # the panel's button: returns at once, the timer reports
    op_s = time.perf_counter() - t
    state_during = props.backend_state
    took = harness.pump(scene, lambda: jobs.RT.connecting is None, 15)
    messages = jobs.take_messages()
    t = time.perf_counter()
    res_wait, msg_wait = call(bpy.ops.ex4d.connect, wait=True)  # scripts: waits, then reports
    return {"result": res, "op_s": op_s, "took_s": took, "messages": messages, "state_during": state_during,
            "state": props.backend_state, "result_wait": res_wait, "message_wait": msg_wait,
            "took_wait_s": time.perf_counter() - t}


@step("connect")
def _():
    props.address = ADDRESS
    t = time.perf_counter()
    res = bpy.ops.ex4d.connect()
    op_s = time.perf_counter() - t
    took = harness.pump(scene, lambda: props.backend_state == "connected", 15, sleep_s=0.01)
    return {"result": sorted(res), "op_s": op_s, "took_s": took, "capabilities": props.capabilities,
            "state": props.backend_state}


@step("relative_output_unsaved")
def _():
    """An output folder without '//' in an unsaved .blend: refused (it used to go to /tmp silently)."""
    p = bpy.context.scene.ex4d
    before = p.output_dir
    p.output_dir = "rel_out/"
    try:
        workflow.output_dir(p)
        err = None
    except core.errors.InputError as e:
        err = str(e)
    finally:
        p.output_dir = before
    return {"error": err, "blend": bpy.data.filepath}


@step("import_video")
def _():
    props.output_dir = os.path.join(OUT, "ex4d_out") + os.sep
    res = bpy.ops.ex4d.import_video(filepath=VIDEO, first_frame=0, num_frames=9, width=64, height=48, fov_deg=60.0)
    steps = []
    harness.pump(scene, lambda: steps.append(props.job_step) or props.job_state != "running", 60, sleep_s=0)
    frames = workflow.shot_frames(props)
    np.save(os.path.join(OUT, "frames_blender.npy"), frames)
    return {"result": sorted(res), "num_frames": props.num_frames, "size": [props.width, props.height],
            "fx": props.fx, "frame_range": [scene.frame_start, scene.frame_end], "frames_shape": list(frames.shape),
            "state": props.job_state, "message": props.job_message, "progress_steps": steps}


@step("reconstruct")
def _():
    res = bpy.ops.ex4d.reconstruct(depth_file=DEPTH)
    building = []

    def until():
        if props.job_stage == "building the DW-mesh":  # applied a piece per timer step
            building.append([props.job_step, any(o.name.startswith("DW-mesh") for o in scene.objects)])
        return props.job_state != "running"

    took = harness.pump(scene, until, 120)
    r = captured["reconstruct"]
    np.savez(os.path.join(OUT, "mesh.npz"), **r.arrays)
    obj = props.mesh
    me = obj.data
    V, F = len(r.arrays["vertices"][0]), len(r.arrays["faces"])
    uv = np.empty(len(me.loops) * 2, np.float32)
    me.uv_layers["ex4d_uv"].data.foreach_get("uv", uv)
    crop = core.shot.FillCrop(props.src_width, props.src_height, props.width, props.height)
    uv_expected = crop.uv_to_source(r.arrays["uv"])[r.arrays["faces"].ravel()]
    errs = []
    dg = bpy.context.evaluated_depsgraph_get()
    for t in range(props.num_frames):
        scene.frame_set(props.frame_start + t)
        dg = bpy.context.evaluated_depsgraph_get()
        pos = dwmesh.evaluated_positions(obj, dg)
        errs.append(float(np.abs(pos - r.arrays["vertices"][t]).max()))
    words = dwmesh.auto_words(me)
    fv = core.validity.unpack(words, props.num_frames)
    # the result lives in the scene until the .blend is saved: the backend keeps it till then
    job = props.job_id
    kept_before_save = backend_job_state(job)
    bpy.ops.wm.save_as_mainfile(filepath=os.path.join(OUT, "after_reconstruct.blend"), copy=True)
    after_save = backend_job_state(job, wait_for="unknown_job")
    return {"building": building, "kept_before_save": kept_before_save, "after_save": after_save,
            "result": sorted(res), "state": props.job_state, "message": props.job_message, "took_s": took,
            "V": V, "F": F, "mesh_vertices": len(me.vertices), "mesh_faces": len(me.polygons),
            "uv_err": float(np.abs(uv.reshape(-1, 2) - uv_expected).max()), "pos_err_per_frame": errs,
            "validity_equal": bool((fv == r.arrays["face_valid"]).all()),
            "has_paint_attr": "ex4d_valid" in me.color_attributes, "source_camera": props.source_camera.name,
            "source_lens": props.source_camera.data.lens, "depth_min": props.depth_min, "depth_median": props.depth_median}


@step("cancel_while_building")
def _():
    """Cancel while the DW-mesh is being built: nothing half-built stays, the shot's mesh is untouched,
    and the backend keeps the result (it was never on disk)."""
    mesh_before, meshes, objects = props.mesh, len(bpy.data.meshes), len(bpy.data.objects)
    bpy.ops.ex4d.reconstruct(depth_file=DEPTH)
    harness.pump(scene, lambda: props.job_stage == "building the DW-mesh" and len(bpy.data.meshes) > meshes, 120)
    res = bpy.ops.ex4d.cancel()
    return {"result": sorted(res), "state": props.job_state, "mesh_kept": props.mesh == mesh_before,
            "meshes": [meshes, len(bpy.data.meshes)], "objects": [objects, len(bpy.data.objects)],
            "backend": backend_job_state(props.job_id)}


@step("camera_presets")
def _():
    out = {}
    rig = np.array(props.rig.matrix_world)
    for name in ("30", "60", "90", "180", "orbit_left", "zoom_in", "zoom_out", "dolly_right"):
        res = bpy.ops.ex4d.camera_preset(preset=name)
        cam = scene.camera
        got = bcams.read_path(scene, cam, props.frame_start, props.num_frames, props.width, props.height, rig)
        want = bcams.preset(props, name, 30.0, 0.0)
        out[name] = {"result": sorted(res), "camera": cam.name, "max_err": float(np.abs(got.c2w - want.c2w).max()),
                     "K_err": float(np.abs(got.K - want.K).max()), "keyed": cam.animation_data is not None}
    # moving the rig places the whole shot elsewhere: the move, read relative to the rig, is unchanged
    from mathutils import Matrix

    saved = props.rig.matrix_world.copy()
    props.rig.matrix_world = Matrix.Translation((1.0, -2.0, 0.5)) @ Matrix.Rotation(0.4, 4, "Z") @ saved
    bpy.context.view_layer.update()
    cam = bpy.data.objects[out["60"]["camera"]]
    got = bcams.read_path(scene, cam, props.frame_start, props.num_frames, props.width, props.height,
                          np.array(props.rig.matrix_world))
    out["after_moving_rig_err"] = float(np.abs(got.c2w - bcams.preset(props, "60", 30.0, 0.0).c2w).max())
    props.rig.matrix_world = saved
    bpy.context.view_layer.update()
    return out


@step("transforms_round_trip")
def _():
    cam = bpy.data.objects[R["steps"]["camera_presets"]["30"]["camera"]]
    scene.camera = cam
    a = os.path.join(OUT, "cameras_a.json")
    b = os.path.join(OUT, "cameras_b.json")
    bpy.ops.ex4d.export_camera(filepath=a)
    res = bpy.ops.ex4d.import_camera(filepath=a)
    imported = scene.camera
    bpy.ops.ex4d.export_camera(filepath=b)
    pa, pb = camera.read_transforms(a), camera.read_transforms(b)
    # a path written by the ex4d library (as `ex4d recon/run --camera` read it) -> Blender -> file
    c, d = os.path.join(OUT, "cameras_lib.json"), os.path.join(OUT, "cameras_lib_back.json")
    lib = bcams.preset(props, "orbit_right", 25.0, 0.0)
    camera.write_transforms(lib, c)
    bpy.ops.ex4d.import_camera(filepath=c)
    bpy.ops.ex4d.export_camera(filepath=d)
    pc, pd = camera.read_transforms(c), camera.read_transforms(d)
    scene.camera = cam
    return {"result": sorted(res), "imported": imported.name, "c2w_err": float(np.abs(pa.c2w - pb.c2w).max()),
            "K_err": float(np.abs(pa.K - pb.K).max()), "frames": len(pa),
            "lib_c2w_err": float(np.abs(pc.c2w - pd.c2w).max()), "lib_K_err": float(np.abs(pc.K - pd.K).max()),
            "lib_frames": [len(pc), len(pd)], "lib_size": [pd.width, pd.height]}


@step("render_guides")
def _():
    cam = bpy.data.objects[R["steps"]["camera_presets"]["30"]["camera"]]
    scene.camera = cam
    bpy.ops.ex4d.export_camera(filepath=os.path.join(OUT, "guide_camera.json"))
    engine_before = scene.render.engine
    cam.data.clip_start, cam.data.clip_end = 0.5, 20.0  # an artist's own clip range: the render overrides it
    res = bpy.ops.ex4d.render_guides()
    took = harness.pump(scene, lambda: props.job_state != "running", 120, sleep_s=0)
    color, mask = harness.sub("blender.guides").load_guides(props.guides_dir, props.num_frames)
    np.savez(os.path.join(OUT, "guides_blender.npz"), color=color, mask=mask)
    return {"result": sorted(res), "state": props.job_state, "message": props.job_message, "took_s": took,
            "per_frame_s": took / props.num_frames, "engine_restored": scene.render.engine == engine_before,
            "mask_fraction": float(mask.mean()), "dir": props.guides_dir, "scene_scale": props.scene_scale,
            "clip_restored": [round(cam.data.clip_start, 6), round(cam.data.clip_end, 6)] == [0.5, 20.0]}


@step("painted_validity")
def _():
    me = props.mesh.data
    t = props.num_frames - 1
    before = dwmesh.frame_face_mask(me, t)
    attr = me.color_attributes["ex4d_valid"]
    col = np.ones((len(me.vertices), 4), np.float32)
    co = np.empty(len(me.vertices) * 3, np.float32)
    me.vertices.foreach_get("co", co)
    left = co.reshape(-1, 3)[:, 0] < np.median(co.reshape(-1, 3)[:, 0])
    col[left, :3] = 0.0  # the artist paints the left half black: regenerate it
    attr.data.foreach_set("color", col.ravel())
    after = dwmesh.frame_face_mask(me, t)
    worker = workflow.start_guides(scene)
    harness.pump(scene, lambda: props.job_state != "running", 120, sleep_s=0)
    _, mask = harness.sub("blender.guides").load_guides(props.guides_dir, props.num_frames)
    attr.data.foreach_set("color", np.ones(len(me.vertices) * 4, np.float32))
    ref = np.load(os.path.join(OUT, "guides_blender.npz"))["mask"]
    workflow.start_guides(scene)  # put the unpainted guides back for Generate
    harness.pump(scene, lambda: props.job_state != "running", 120, sleep_s=0)
    return {"faces_valid_before": int(before.sum()), "faces_valid_after": int(after.sum()),
            "mask_px_before": int(ref.sum()), "mask_px_after": int(mask.sum()),
            "left_half_after": int(mask[:, :, : props.width // 2].sum()), "state": props.job_state}


@step("show_validity")
def _():
    me = props.mesh.data
    props.show_validity = True
    t = props.num_frames - 2
    scene.frame_set(props.frame_start + t)
    col = np.empty(len(me.loops) * 4, np.float32)
    me.color_attributes["ex4d_mask"].data.foreach_get("color", col)
    starts = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("loop_start", starts)
    shown = col.reshape(-1, 4)[starts, 0] > 0.5
    want = dwmesh.frame_face_mask(me, t)
    active = me.color_attributes.active_color_name
    props.show_validity = False
    return {"equal": bool((shown == want).all()), "active_while_on": active,
            "active_after": me.color_attributes.active_color_name}


@step("generate")
def _():
    t = time.perf_counter()
    res = bpy.ops.ex4d.generate()
    op_s = time.perf_counter() - t
    stage_after_op = [props.job_stage, props.job_step, props.job_total, props.job_id]
    seen = set()
    ui = {}

    def until():
        seen.add((props.job_stage, props.job_step))
        if props.job_stage == "reading the guides":  # a few frames per timer step, then sent
            ui.setdefault("reading", []).append(props.job_step)
        if props.job_stage == "writing the shot":  # a few PNGs per timer step
            ui.setdefault("writing", []).append(props.job_step)
        if props.job_state == "running" and props.job_total and "busy" not in ui:
            ui["busy"] = ui_snapshot()  # progress bar and Cancel while it runs
        return props.job_state != "running"

    took = harness.pump(scene, until, 300)
    frames = captured["generate"].arrays["frames"]
    released = backend_job_state(props.job_id, wait_for="unknown_job")  # the PNGs are on disk: released
    return {"op_s": op_s, "stage_after_op": stage_after_op, "reading_steps": ui.get("reading"),
            "writing_steps": ui.get("writing"), "ui_busy": ui.get("busy"), "released": released, "result": sorted(res), "state": props.job_state, "message": props.job_message, "took_s": took,
            "progress_seen": sorted(map(list, seen)), "frames_shape": list(frames.shape), "result_dir": props.result_dir,
            "files": sorted(os.listdir(props.result_dir))}


@step("send_to_timeline")
def _():
    se = scene.sequence_editor_create()
    coll = se.strips if hasattr(se, "strips") else se.sequences
    # the artist's own strip on channel 2 over the shot's frames: the shot must go around it
    blocker = coll.new_image("artist strip", os.path.join(props.guides_dir, "mask_0001.png"), 2, scene.frame_start)
    blocker.frame_final_duration = props.num_frames + 4
    res = bpy.ops.ex4d.send_to_timeline(with_guides=True, with_source=True)
    out = {"result": sorted(res), "strips": [
        {"name": s.name, "type": s.type, "channel": s.channel, "start": s.frame_final_start, "end": s.frame_final_end}
        for s in coll if s != blocker], "scene_range": [scene.frame_start, scene.frame_end],
        "blocker_channel": blocker.channel, "shot": props.shot_name, "camera": props.guides_camera}
    coll.remove(blocker)
    out["ui_with_shot"] = ui_snapshot()
    return out


@step("result_kept_until_written")
def _():
    """A result that cannot be written stays on the backend; Connect fetches it again once fixed."""
    import shutil

    shot = props.result_dir
    aside = shot + "_aside"
    shutil.move(shot, aside)
    os.makedirs(os.path.join(shot, "shot_0003.png"))  # a folder where frame 3 goes: writing fails midway
    try:
        res = bpy.ops.ex4d.generate()
        harness.pump(scene, lambda: props.job_state != "running", 300)
        job = props.job_id
        out = {"result": sorted(res), "state_failed": props.job_state, "message_failed": props.job_message,
               "backend_after_failure": backend_job_state(job)}
    finally:
        shutil.rmtree(shot)
        shutil.move(aside, shot)
    jobs.take_messages()
    res = bpy.ops.ex4d.connect()
    harness.pump(scene, lambda: props.job_state == "done", 60)
    out.update(reconnect=sorted(res), state=props.job_state, message=props.job_message,
               files=len([f for f in os.listdir(shot) if f.startswith("shot_")]),
               backend_after_write=backend_job_state(job, wait_for="unknown_job"))
    return out


@step("cancel_remote")
def _():
    color, mask = harness.sub("blender.guides").load_guides(props.guides_dir, props.num_frames)
    jobs.submit(scene, "generate", {"steps": 400, "seed": 1}, {"color": color, "mask": mask})
    time.sleep(0.3)
    t = time.perf_counter()
    res = bpy.ops.ex4d.cancel()
    took = harness.pump(scene, lambda: props.job_state != "running", 60)
    return {"result": sorted(res), "state": props.job_state, "message": props.job_message, "took_s": took,
            "cancel_to_stop_s": time.perf_counter() - t}


@step("cancel_local")
def _():
    workflow.start_guides(scene)
    jobs.poll_once(scene)
    res = bpy.ops.ex4d.cancel()
    return {"result": sorted(res), "state": props.job_state, "engine": scene.render.engine}


@step("cancel_while_reading_guides")
def _():
    """Cancel while Generate still reads the guide PNGs: nothing is sent, the panel is free again."""
    jobs.take_messages()
    res = bpy.ops.ex4d.generate()
    stage = props.job_stage
    jobs.poll_once(scene)  # one timer step: some frames read, not all
    step_before_cancel, total = props.job_step, props.job_total
    res_cancel = bpy.ops.ex4d.cancel()
    for _ in range(5):  # the timer goes on: nothing arrives, nothing is sent
        jobs.poll_once(scene)
    return {"result": sorted(res), "stage": stage, "step_before_cancel": step_before_cancel, "total": total,
            "cancel": sorted(res_cancel), "state": props.job_state, "message": props.job_message,
            "job_id": props.job_id, "pending": len(jobs.RT.pending_submit), "local": len(jobs.RT.local),
            "messages": jobs.take_messages()}


@step("reattach_after_reload")
def _():
    color, mask = harness.sub("blender.guides").load_guides(props.guides_dir, props.num_frames)
    job = jobs.submit(scene, "generate", {"seed": 2}, {"color": color, "mask": mask})
    props.job_kind = "generate"
    harness.pump(scene, lambda: props.job_stage != "sending", 30)  # the backend has it
    bpy.ops.ex4d.disconnect()
    path = os.path.join(OUT, "shot.blend")
    bpy.ops.wm.save_as_mainfile(filepath=path)
    bpy.ops.wm.open_mainfile(filepath=path)
    sc = bpy.context.scene
    p = sc.ex4d
    out = {"job_id_kept": p.job_id == job, "state_after_load": p.job_state}
    errs = []
    obj = p.mesh
    ref = np.load(os.path.join(OUT, "mesh.npz"))["vertices"]
    for t in range(p.num_frames):
        sc.frame_set(p.frame_start + t)
        pos = dwmesh.evaluated_positions(obj, bpy.context.evaluated_depsgraph_get())
        errs.append(float(np.abs(pos - ref[t]).max()))
    out["pos_err_after_reload"] = errs
    res = bpy.ops.ex4d.connect()
    harness.pump(sc, lambda: p.job_state != "running", 300)
    out.update(result=sorted(res), state=p.job_state, message=p.job_message)
    return out


@step("artist_deletes_vertices")
def _():
    """Deleting part of the DW-mesh (bmesh, as Edit Mode does) keeps the per-frame keys of the rest, and the
    guides show the edit: the deleted region is no longer valid source content."""
    import bmesh

    sc = bpy.context.scene
    p = sc.ex4d
    me = p.mesh.data
    ref = np.load(os.path.join(OUT, "mesh.npz"))["vertices"]
    co = ref[0]
    doomed = (co[:, 0] > np.percentile(co[:, 0], 70))
    bm = bmesh.new()
    bm.from_mesh(me)
    bm.verts.ensure_lookup_table()
    bmesh.ops.delete(bm, geom=[bm.verts[i] for i in np.nonzero(doomed)[0]], context="VERTS")
    bm.to_mesh(me)
    bm.free()
    me.update()
    errs = []
    for t in range(p.num_frames):
        sc.frame_set(p.frame_start + t)
        pos = dwmesh.evaluated_positions(p.mesh, bpy.context.evaluated_depsgraph_get())
        errs.append(float(np.abs(pos - ref[t][~doomed]).max()))
    before = np.load(os.path.join(OUT, "guides_blender.npz"))["mask"]
    sc.camera = bpy.data.objects[R["steps"]["camera_presets"]["30"]["camera"]]
    workflow.start_guides(sc)
    harness.pump(sc, lambda: p.job_state != "running", 120, sleep_s=0)
    _, after = harness.sub("blender.guides").load_guides(p.guides_dir, p.num_frames)
    return {"deleted": int(doomed.sum()), "vertices_left": len(me.vertices), "pos_err": errs,
            "mask_px_before": int(before.sum()), "mask_px_after": int(after.sum()), "state": p.job_state,
            "message": p.job_message}


@step("reattach_running")
def _():
    """Reconnecting while a job runs: progress now comes to the new connection."""
    sc = bpy.context.scene
    p = sc.ex4d
    color, mask = harness.sub("blender.guides").load_guides(p.guides_dir, p.num_frames)
    jobs.submit(sc, "generate", {"steps": 400, "seed": 3}, {"color": color, "mask": mask})
    harness.pump(sc, lambda: p.job_step > 0, 60)
    bpy.ops.ex4d.disconnect()
    time.sleep(0.5)
    res = bpy.ops.ex4d.connect()
    step0 = p.job_step
    harness.pump(sc, lambda: p.job_step > step0 + 1, 60)
    out = {"result": sorted(res), "state": p.job_state, "step_before": step0, "step_after": p.job_step}
    bpy.ops.ex4d.cancel()
    harness.pump(sc, lambda: p.job_state != "running", 60)
    out["final_state"] = p.job_state
    return out


@step("reconstruct_after_reload_reads_stepwise")
def _():
    """After reopening a .blend the shot's frames are not in memory: Reconstruct returns at once and
    reads them from the movie a few per timer step (Cancel meanwhile sends nothing), then sends the job."""
    sc = bpy.context.scene
    p = sc.ex4d
    workflow._FRAMES_CACHE.clear()  # as in a Blender just started on the saved file
    mesh_before, scenes_before = p.mesh, len(bpy.data.scenes)
    t = time.perf_counter()
    res = bpy.ops.ex4d.reconstruct(depth_file=DEPTH)
    op_s = time.perf_counter() - t
    out = {"result": sorted(res), "op_s": op_s, "stage_after_op": [p.job_stage, p.job_step, p.job_total, p.job_id]}
    jobs.poll_once(sc)
    out["step_before_cancel"] = p.job_step
    out["cancel"] = sorted(bpy.ops.ex4d.cancel())
    for _ in range(5):
        jobs.poll_once(sc)
    out.update(cancelled_state=p.job_state, cancelled_job_id=p.job_id, pending=len(jobs.RT.pending_submit),
               local=len(jobs.RT.local), mesh_kept=p.mesh == mesh_before, scenes=[scenes_before, len(bpy.data.scenes)],
               cached_after_cancel=len(workflow._FRAMES_CACHE))
    res = bpy.ops.ex4d.reconstruct(depth_file=DEPTH)
    reading, stages = [], []

    def until():
        stages.append(p.job_stage)
        if p.job_stage == "reading frames":
            reading.append(p.job_step)
        return p.job_state != "running"

    out["took_s"] = harness.pump(sc, until, 120)
    frames = workflow.shot_frames(p)  # the cache the reading filled
    ref = np.load(os.path.join(OUT, "frames_blender.npy"))
    out.update(result2=sorted(res), reading_steps=reading, stages=sorted(set(stages)), state=p.job_state,
               message=p.job_message, frames_max_diff=int(np.abs(frames.astype(int) - ref).max()),
               new_mesh=p.mesh is not None and p.mesh != mesh_before)
    return out


@step("frame_range_import")
def _():
    """Video frames 3..7: the footage material and the guides show frame 3+t at shot frame t."""
    sc = bpy.context.scene
    p = sc.ex4d
    res = bpy.ops.ex4d.import_video(filepath=VIDEO, first_frame=3, num_frames=5, width=64, height=48, fov_deg=60.0)
    harness.pump(sc, lambda: p.job_state != "running", 60, sleep_s=0)
    p.source_camera = None
    big = os.path.join(OUT, "depth_2x.npz")  # depth at twice the working size: resampled by the add-on
    d = np.load(DEPTH)["depth"]
    np.savez(big, depth=d.repeat(2, axis=1).repeat(2, axis=2))
    bpy.ops.ex4d.reconstruct(depth_file=big)
    harness.pump(sc, lambda: p.job_state != "running", 120)
    sc.camera = p.source_camera
    workflow.start_guides(sc)
    harness.pump(sc, lambda: p.job_state != "running", 120, sleep_s=0)
    color, mask = harness.sub("blender.guides").load_guides(p.guides_dir, p.num_frames)
    full = np.load(os.path.join(OUT, "frames_blender.npy")).astype(int)  # video frames 0..8
    m = mask.astype(bool)

    def mae(a, b):
        return float(np.abs(a.astype(int) - b)[m].mean())

    return {"result": sorted(res), "state": p.job_state, "mask_fraction": float(m.mean()),
            "err_right_frames": mae(color, full[3:8]), "err_frames_0_4": mae(color, full[0:5]),
            "frame_range": [sc.frame_start, sc.frame_end]}


@step("bad_depth_files")
def _():
    """Depth that does not fit the shot is refused with the CLI's one-line errors (ex4d/depth_rules.py),
    shown on the panel too; nothing is added to the scene."""
    sc = bpy.context.scene
    p = sc.ex4d
    d = np.load(DEPTH)["depth"]  # the whole video's: 9 frames of 64x48 (the shot is video frames 3..7)
    cases = {"square": {"depth": d[:, :, :48]}, "transposed": {"depth": np.ascontiguousarray(d.transpose(0, 2, 1))},
             "frames_12": {"depth": np.concatenate([d, d[:3]])}, "frames_2": {"depth": d[:2]},
             "K_2x2": {"depth": d, "K": np.eye(2)}, "K_zero_focal": {"depth": d, "K": np.zeros((3, 3))},
             "nan": {"depth": np.where(np.arange(d.shape[-1]) == 5, np.nan, d).astype(np.float32)},
             "zeros": {"depth": np.zeros_like(d)}}
    out = {}
    p.job_state, p.job_message = "done", "imported 5 frames"  # what the panel said before
    for name, arrays in cases.items():
        path = os.path.join(OUT, f"bad_{name}.npz")
        np.savez(path, **arrays)
        counts = (len(bpy.data.objects), len(bpy.data.meshes))
        res, err = call(bpy.ops.ex4d.reconstruct, depth_file=path)
        out[name] = {"result": res, "error": err, "state": p.job_state, "message": p.job_message,
                     "unchanged": counts == (len(bpy.data.objects), len(bpy.data.meshes))}
        p.job_state, p.job_message = "done", "imported 5 frames"
    # any other exception (a bug) is a one-line report naming the step, never a traceback
    real = workflow.submit_generate

    def broken(scene):
        raise ValueError("cannot reshape array of size 4 into shape (3,3)\nsecond line")

    workflow.submit_generate = broken  # fault injection: the operator looks the step up at call time
    try:
        res, err = call(bpy.ops.ex4d.generate)
    finally:
        workflow.submit_generate = real
    out["bug"] = {"result": res, "error": err, "state": p.job_state, "message": p.job_message}
    return out


@step("footage_missing_and_reconstruct_again")
def _():
    """Footage moved after Import: Render Guides refuses (no magenta guides). Reconstructing again
    replaces the mesh datablock too (no orphans) and keeps its name."""
    import shutil

    sc = bpy.context.scene
    p = sc.ex4d
    clip = os.path.join(OUT, "footage.mp4")
    shutil.copy(VIDEO, clip)
    bpy.ops.ex4d.import_video(filepath=clip, first_frame=0, num_frames=9, width=64, height=48, fov_deg=60.0)
    harness.pump(sc, lambda: p.job_state != "running", 60, sleep_s=0)
    meshes, names = [], []
    for _ in range(3):
        bpy.ops.ex4d.reconstruct(depth_file=DEPTH)
        harness.pump(sc, lambda: p.job_state != "running", 120)
        meshes.append(len(bpy.data.meshes))
        names.append([p.mesh.name, p.mesh.data.name])
    sc.camera = p.source_camera
    moved = clip + ".moved"
    os.rename(clip, moved)
    try:
        p.image.reload()  # what Blender sees once the file is gone (e.g. the .blend reopened)
        res, err = call(bpy.ops.ex4d.render_guides)
        out = {"result": res, "error": err, "state": p.job_state, "message": p.job_message, "meshes": meshes,
               "names": names, "orphans": sum(1 for m in bpy.data.meshes if m.users == 0)}
    finally:
        os.rename(moved, clip)
    res = bpy.ops.ex4d.render_guides()
    harness.pump(sc, lambda: p.job_state != "running", 120, sleep_s=0)
    out["relinked"] = [sorted(res), p.job_state]
    return out


@step("another_clip_keeps_the_previous_shot")
def _():
    """Importing another clip starts a new shot: the previous shot's DW-mesh (paint and edits), rig and
    source camera stay; a clip with the same file name from another folder gets its own name and rig."""
    import shutil

    sc = bpy.context.scene
    p = sc.ex4d
    before = {"mesh": p.mesh.name, "rig": p.rig.name, "camera": p.source_camera.name, "shot": p.shot_name}
    folder = os.path.join(OUT, "again")
    os.makedirs(folder, exist_ok=True)
    clip = os.path.join(folder, "footage.mp4")  # the same file name as the previous shot's clip
    shutil.copy(VIDEO, clip)
    bpy.ops.ex4d.import_video(filepath=clip, first_frame=0, num_frames=9, width=64, height=48, fov_deg=60.0)
    harness.pump(sc, lambda: p.job_state != "running", 60, sleep_s=0)
    imported = {"message": p.job_message, "shot": p.shot_name, "mesh": p.mesh}
    bpy.ops.ex4d.reconstruct(depth_file=DEPTH)
    harness.pump(sc, lambda: p.job_state != "running", 120)
    objects = set(bpy.data.objects.keys())
    return {"before": before, "import_message": imported["message"], "new_shot": imported["shot"],
            "mesh_cleared": imported["mesh"] is None, "previous_kept": all(v in objects for k, v in before.items() if k != "shot"),
            "new": [p.mesh.name, p.rig.name, p.source_camera.name], "state": p.job_state}


@step("reattach_unknown_job")
def _():
    """Connect after a backend restart: the job it had is gone; the message says so."""
    import uuid

    sc = bpy.context.scene
    p = sc.ex4d
    p.job_id, p.job_kind, p.job_state, p.job_stage = uuid.uuid4().hex, "reconstruct", "failed", jobs.BACKEND_LOST
    bpy.ops.ex4d.connect(wait=True)
    harness.pump(sc, lambda: p.job_state != "running", 15)
    return {"state": p.job_state, "message": p.job_message}


@step("backend_frozen")
def _():
    """A backend that takes the connection but does not answer (stopped): Generate returns at once and
    the job fails after the submit time-out; the panel shows the lost heartbeat meanwhile."""
    sc = bpy.context.scene
    p = sc.ex4d
    os.kill(int(BACKEND_PID), signal.SIGSTOP)
    try:
        t = time.perf_counter()
        res = bpy.ops.ex4d.generate()
        op_s = time.perf_counter() - t
        took = harness.pump(sc, lambda: p.job_state != "running", 30)
        out = {"result": sorted(res), "op_s": op_s, "failed_after_s": took, "state": p.job_state,
               "message": p.job_message, "backend_state": p.backend_state}
    finally:
        os.kill(int(BACKEND_PID), signal.SIGCONT)
    out["back_after_s"] = harness.pump(sc, lambda: p.backend_state == "connected", 15)
    return out


@step("backend_dies")
def _():
    sc = bpy.context.scene
    p = sc.ex4d
    color, mask = harness.sub("blender.guides").load_guides(p.guides_dir, p.num_frames)
    jobs.submit(sc, "generate", {"steps": 400, "seed": 3}, {"color": color, "mask": mask})
    harness.pump(sc, lambda: p.job_step > 0, 60)
    os.kill(int(BACKEND_PID), signal.SIGKILL)  # a crash: no goodbye
    t = time.perf_counter()
    jobs.take_messages()
    noticed = None
    while time.perf_counter() - t < 15:
        jobs.poll_once(sc)
        if p.backend_state != "connected":
            noticed = time.perf_counter() - t
            break
        time.sleep(0.2)
    msgs = jobs.take_messages()
    job_after = {"state": p.job_state, "stage": p.job_stage, "message": p.job_message}
    res, err = call(bpy.ops.ex4d.render_guides)  # the panel is free again: local steps work
    harness.pump(sc, lambda: p.job_state != "running", 60, sleep_s=0)
    job_after["guides"] = [res, err, p.job_state]
    t = time.perf_counter()
    res, err = call(bpy.ops.ex4d.generate)
    p.job_state, p.job_kind, p.job_id = "running", "generate", "0" * 32  # a job the dead backend had
    call(bpy.ops.ex4d.cancel)
    abandoned = p.job_state
    return {"job_after": job_after, "abandoned_state": abandoned, "noticed_after_s": noticed, "state": p.backend_state, "messages": msgs, "generate_result": res, "generate_error": err,
            "generate_took_s": time.perf_counter() - t, "job_state": p.job_state}


@step("local_job_saved_while_running")
def _():
    """A .blend saved while the guides render says 'running': after opening it the panel is free."""
    sc = bpy.context.scene
    workflow.start_guides(sc)
    jobs.poll_once(sc)
    path = os.path.join(OUT, "saved_while_rendering.blend")
    bpy.ops.wm.save_as_mainfile(filepath=path, copy=True)
    bpy.ops.wm.open_mainfile(filepath=path)
    p = bpy.context.scene.ex4d
    return {"state": p.job_state, "message": p.job_message, "local_jobs": len(jobs.RT.local)}


@step("relative_output_saved")
def _():
    """The same in a saved .blend: next to it."""
    p = bpy.context.scene.ex4d
    p.output_dir = "rel_out/"
    return {"dir": workflow.output_dir(p), "blend": bpy.data.filepath}


@step("disable_enable")
def _():
    bpy.ops.preferences.addon_disable(module=harness.MODULE)
    gone = not hasattr(bpy.types.Scene, "ex4d") and "connect" not in dir(bpy.ops.ex4d)
    bpy.ops.preferences.addon_enable(module=harness.MODULE)
    return {"gone_when_disabled": gone, "back": hasattr(bpy.types.Scene, "ex4d") and "connect" in dir(bpy.ops.ex4d)}


R["total_s"] = time.perf_counter() - T0
harness.write_json(os.path.join(OUT, "workflow.json"), R)
jobs.disconnect()
print("workflow done in %.1f s" % R["total_s"])
