"""The add-on in real Blender (PyPI bpy in .venv-blender), installed from the built zip, against a real
backend process (`ex4d serve --generator tiny`). One Blender run does the whole workflow (startup is the
expensive part); each test checks one promise from its findings."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from addon_fixtures import Backend, build_zip, free_port, needs_blender, run_blender, synthetic_shot

pytestmark = [needs_blender, pytest.mark.blender]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("addon_workflow")
    zip_path = build_zip(tmp / "dist")
    video, depth = synthetic_shot(tmp)
    backend = Backend(tmp / "jobs", tmp / "backend.log")
    try:
        t = time.perf_counter()
        r = run_blender("workflow.py", zip_path, video, depth, backend.address, f"tcp://127.0.0.1:{free_port()}",
                        backend.proc.pid, tmp, tmp=tmp)
        wall = time.perf_counter() - t
    finally:
        backend.stop()
    report = tmp / "workflow.json"
    assert report.exists(), f"Blender script failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    data = json.loads(report.read_text())
    if os.environ.get("EX4D_KEEP_ADDON_REPORT"):  # for docs/benchmarks.md
        shutil.copy(report, os.environ["EX4D_KEEP_ADDON_REPORT"])
    data["wall_s"] = wall
    data["tmp"] = tmp
    return data


def ok(run, name) -> dict:
    s = run["steps"].get(name)
    assert s is not None, f"step {name} did not run"
    assert s["ok"], s.get("trace") or s.get("error")
    return s


STEPS = ("connect", "import_video", "reconstruct", "camera_preset", "render_guides", "generate", "cancel",
         "send_to_timeline", "export_camera", "import_camera")


def test_installs_from_zip_with_every_operator(run):
    print(f"Blender {run['blender_version']}")
    major_minor = tuple(int(x) for x in run["blender_version"].split()[0].split(".")[:2])
    assert major_minor >= (4, 2)  # the manifest's blender_version_min
    z = run["zmq"]
    if z["zip_wheels"]:  # Blender installed the bundled pyzmq wheel and the add-on uses it
        assert "extensions" in z["file"] and any(z["version"] in w for w in z["zip_wheels"]), z
    for op in ("connect", "import_video", "reconstruct", "camera_preset", "render_guides", "generate", "cancel",
               "send_to_timeline", "export_camera", "import_camera"):
        assert op in run["operators"]
        assert run["labels"][op].startswith("EX-4D: ") and len(run["descriptions"][op]) > 20  # F3 search
    assert run["panels"] == ["Backend", "Camera", "Guides and Generation", "Shot"]
    assert run["missing_icons"] == []


def _ops(log) -> set:
    return {x[1].split(".")[1] for x in log if x[0] in ("operator", "operator_menu_enum")}


def test_sidebar_tab_draws_every_step(run):
    """The panels' draw() on this Blender version (a fake layout checks each operator, property and icon)."""
    idle, busy = ok(run, "ui_idle"), ok(run, "generate")["ui_busy"]
    shot = ok(run, "send_to_timeline")["ui_with_shot"]
    for ui in (idle, busy, shot):
        assert ui["problems"] == []
    on_panels = set().union(*(_ops(log) for ui in (idle, busy, shot) for label, log in ui["panels"].items()
                              if label != "EX-4D"))  # that one is the menu
    assert set(STEPS) <= on_panels, set(STEPS) - on_panels
    gen = busy["panels"]["Guides and Generation"]
    assert any(x[0] == "progress" and "generate:" in x[2] for x in gen)  # a progress bar while it runs
    assert "cancel" in _ops(gen)
    assert "show_validity" in {x[1] for x in shot["panels"]["Shot"] if x[0] == "prop"}


def test_every_step_is_in_a_menu_for_f3_search(run):
    """F3 is a menu search: it finds operators that are in menus (Render > EX-4D), not panel buttons."""
    ui = ok(run, "ui_idle")
    assert ui["menu_in_parent"] and ["menu", "EX4D_MT_main", "None"] in ui["parent_entry"]
    assert set(STEPS) <= _ops(ui["panels"]["EX-4D"])


def test_disable_and_enable_again(run):
    s = ok(run, "disable_enable")
    assert s["gone_when_disabled"] and s["back"]


def test_dead_backend_is_reported_quickly_without_blocking(run):
    s = ok(run, "connect_dead_backend")
    assert s["result"] == ["FINISHED"] and s["op_s"] < 0.5 and s["state_during"].startswith("connecting")
    assert 2.5 < s["took_s"] < 10 and s["state"] == "not connected"
    assert any(level == "ERROR" and "no answer from the backend" in text for level, text in s["messages"])
    assert s["result_wait"] == ["CANCELLED"] and "no answer from the backend" in s["message_wait"]  # scripts
    assert s["took_wait_s"] < 10


def test_connect_shows_capabilities(run):
    s = ok(run, "connect")
    assert s["result"] == ["FINISHED"] and s["op_s"] < 0.5 and s["state"] == "connected"
    assert "tiny" in s["capabilities"]


def test_unanswered_submit_fails_without_blocking(run):
    s = ok(run, "backend_frozen")
    assert s["result"] == ["FINISHED"] and s["op_s"] < 1.0  # Generate only sends
    assert s["state"] == "failed" and "no answer from the backend" in s["message"], s["message"]
    assert 2.5 < s["failed_after_s"] < 15 and s["backend_state"].startswith("no heartbeat")
    assert s["back_after_s"] < 10


def test_import_video_reads_frames_in_blender(run):
    s = ok(run, "import_video")
    assert s["state"] == "done", s["message"]
    assert s["frames_shape"] == [9, 48, 64, 3] and s["frame_range"] == [1, 9]
    assert len(set(s["progress_steps"])) >= 3  # read a few frames per timer step, not all at once
    assert s["fx"] == pytest.approx(64 / 2 / np.tan(np.radians(30)))
    from ex4d.video import read_video

    ours = np.load(run["tmp"] / "frames_blender.npy").astype(int)
    ref = read_video(run["tmp"] / "shot.mp4").frames.astype(int)
    assert np.abs(ours - ref).mean() < 3.0  # YUV decode differences only


def test_dwmesh_vertices_uvs_and_per_frame_positions(run):
    s = ok(run, "reconstruct")
    assert s["state"] == "done", s["message"]
    assert s["mesh_vertices"] == s["V"] and s["mesh_faces"] == s["F"]
    assert s["uv_err"] < 1e-6
    assert max(s["pos_err_per_frame"]) < 1e-5
    assert s["validity_equal"] and s["has_paint_attr"]
    # built over several timer steps (the UI stays responsive), joining the scene only when complete
    assert len(s["building"]) >= 2 and not any(linked for _, linked in s["building"]), s["building"]


def test_cancel_while_building_the_dwmesh_leaves_nothing_behind(run):
    s = ok(run, "cancel_while_building")
    assert s["result"] == ["FINISHED"] and s["state"] == "cancelled" and s["mesh_kept"]
    assert s["meshes"][0] == s["meshes"][1] and s["objects"][0] == s["objects"][1]
    assert s["backend"] == "done"  # not released


def test_backend_results_released_only_once_on_disk(run):
    s = ok(run, "reconstruct")  # lives in the scene: kept until the .blend is saved
    assert s["kept_before_save"] == "done" and s["after_save"] == "unknown_job"
    s = ok(run, "generate")
    assert s["released"] == "unknown_job"  # the PNG files are written
    assert s["writing_steps"] and len(s["writing_steps"]) >= 2  # written a few frames per timer step
    s = ok(run, "result_kept_until_written")
    assert s["state_failed"] == "failed" and "could not write" in s["message_failed"], s["message_failed"]
    assert s["backend_after_failure"] == "done"  # not released: still there to fetch
    assert s["reconnect"] == ["FINISHED"] and s["state"] == "done", s["message"]
    assert s["files"] == 9 and s["backend_after_write"] == "unknown_job"


def test_presets_match_ex4d_camera_through_the_rig(run):
    s = ok(run, "camera_presets")
    for name, r in s.items():
        if isinstance(r, dict):
            assert r["result"] == ["FINISHED"] and r["keyed"]
            assert r["max_err"] < 1e-5, (name, r)
            assert r["K_err"] < 1e-3, (name, r)
    assert s["after_moving_rig_err"] < 1e-5


def test_transforms_json_round_trip(run):
    s = ok(run, "transforms_round_trip")
    assert s["frames"] == 9 and s["c2w_err"] < 1e-6 and s["K_err"] < 1e-4
    # a file written by the ex4d library, through Blender's keyframes and back (float32 in Blender)
    assert s["lib_frames"] == [9, 9] and s["lib_size"] == [64, 48]
    assert s["lib_c2w_err"] < 1e-6 and s["lib_K_err"] < 1e-4


def test_guides_render_and_settings_restored(run):
    s = ok(run, "render_guides")
    assert s["state"] == "done", s["message"]
    assert s["engine_restored"] and s["clip_restored"]
    assert s["scene_scale"] == 1.0  # a metre-scale shot (docs/geometry.md, "Scene scale")
    assert 0.2 < s["mask_fraction"] < 1.0


def test_painted_validity_reaches_the_guides(run):
    s = ok(run, "painted_validity")
    assert s["faces_valid_after"] < s["faces_valid_before"]
    assert s["mask_px_after"] < s["mask_px_before"]


def test_show_validity_follows_the_frame(run):
    s = ok(run, "show_validity")
    assert s["equal"] and s["active_while_on"] == "ex4d_mask" and s["active_after"] == "ex4d_valid"


def test_generate_with_progress(run):
    s = ok(run, "generate")
    assert s["state"] == "done", s["message"]
    assert s["frames_shape"][0] == 9 and len([f for f in s["files"] if f.endswith(".png")]) == 9
    assert len(s["progress_seen"]) > 1


def test_send_to_timeline(run):
    s = ok(run, "send_to_timeline")
    strips = {x["name"]: x for x in s["strips"]}
    name = f"{s['shot']} {s['camera']}"  # named after shot and camera
    assert set(strips) == {name, f"{name} guide", f"{s['shot']} source"}, strips
    assert strips[name]["type"] == "IMAGE" and strips[f"{s['shot']} source"]["type"] == "MOVIE"
    channels = [x["channel"] for x in s["strips"]]
    assert len(set(channels)) == 3 and s["blocker_channel"] not in channels, (channels, s["blocker_channel"])
    assert strips[name]["channel"] == 1  # the lowest free channel; guide and source above it
    for x in s["strips"]:  # the scene's frame range (set by Import Video), end exclusive
        assert (x["start"], x["end"]) == (s["scene_range"][0], s["scene_range"][1] + 1) == (1, 10)


def test_generate_reads_the_guides_stepwise_and_cancels_cleanly(run):
    """Generate returns at once; the guide PNGs are read a few frames per timer step (progress in the
    panel), then sent; Cancel while reading sends nothing and frees the panel."""
    s = ok(run, "generate")
    assert s["result"] == ["FINISHED"] and s["op_s"] < 1.0
    assert s["stage_after_op"][:3] == ["reading the guides", 0, 9] and s["stage_after_op"][3] == ""
    assert s["reading_steps"] and len(set(s["reading_steps"])) >= 2, s["reading_steps"]
    assert "generate: reading the guides" in str(s["ui_busy"]["panels"]["Guides and Generation"])
    s = ok(run, "cancel_while_reading_guides")
    assert s["result"] == ["FINISHED"] and s["stage"] == "reading the guides"
    assert 0 < s["step_before_cancel"] < s["total"]
    assert s["cancel"] == ["FINISHED"] and s["state"] == "cancelled" and s["message"] == "generate cancelled"
    assert s["job_id"] == "" and s["pending"] == 0 and s["local"] == 0  # nothing sent, nothing left running


def test_reconstruct_after_reload_reads_frames_stepwise(run):
    """A reopened .blend has no frames in memory: Reconstruct returns at once, re-reads them from the
    movie over several timer steps (Cancel meanwhile sends nothing, leaves no temporary scene), then sends."""
    s = ok(run, "reconstruct_after_reload_reads_stepwise")
    assert s["result"] == ["FINISHED"] and s["op_s"] < 1.0
    assert s["stage_after_op"] == ["reading frames", 0, 9, ""], s["stage_after_op"]
    assert 0 < s["step_before_cancel"] < 9
    assert s["cancel"] == ["FINISHED"] and s["cancelled_state"] == "cancelled" and s["cancelled_job_id"] == ""
    assert s["pending"] == 0 and s["local"] == 0 and s["mesh_kept"] and s["cached_after_cancel"] == 0
    assert s["scenes"][0] == s["scenes"][1]  # the reader's temporary scene is gone
    assert len(set(s["reading_steps"])) >= 2, s["reading_steps"]
    assert s["state"] == "done", s["message"]
    assert "building the DW-mesh" in s["stages"] and s["new_mesh"]
    assert s["frames_max_diff"] == 0  # the same frames Import Video read


def test_cancel_remote_and_local(run):
    s = ok(run, "cancel_remote")
    assert s["state"] == "cancelled" and s["cancel_to_stop_s"] < 30
    s = ok(run, "cancel_local")
    assert s["state"] == "cancelled"


def test_save_reload_keeps_positions_and_reconnect_picks_up_job(run):
    s = ok(run, "reattach_after_reload")
    assert s["job_id_kept"] and s["state_after_load"] == "running"
    assert max(s["pos_err_after_reload"]) < 1e-5
    assert s["state"] == "done", s["message"]


def test_artist_edits_reach_the_guides(run):
    s = ok(run, "artist_deletes_vertices")
    assert s["deleted"] > 0 and max(s["pos_err"]) < 1e-5
    assert s["state"] == "done", s["message"]
    assert s["mask_px_after"] < s["mask_px_before"]


def test_reconnect_follows_a_running_job(run):
    s = ok(run, "reattach_running")
    assert s["result"] == ["FINISHED"] and s["step_after"] > s["step_before"]
    assert s["final_state"] == "cancelled"


def test_frame_range_maps_footage_frames(run):
    s = ok(run, "frame_range_import")
    assert s["state"] == "done" and s["frame_range"] == [1, 5]
    assert s["mask_fraction"] > 0.9  # the source camera sees everything
    assert s["err_right_frames"] < 3 < s["err_frames_0_4"]


def test_backend_death_is_noticed_and_reported(run):
    s = ok(run, "backend_dies")
    assert s["noticed_after_s"] is not None and s["noticed_after_s"] < 10
    assert any("stopped answering" in m[1] for m in s["messages"])
    assert s["generate_result"] == ["CANCELLED"] and s["generate_took_s"] < 15
    assert s["abandoned_state"] == "cancelled"  # Cancel frees the panel when the backend is gone


def test_running_job_fails_when_the_backend_is_declared_dead(run):
    """SIGKILL while a job runs: once the heartbeat is declared lost, the job fails (not 'running'
    forever) with a message that says what happened; other steps work again."""
    j = ok(run, "backend_dies")["job_after"]
    assert j["state"] == "failed" and j["stage"] == "backend lost", j
    assert "stopped (no heartbeat for" in j["message"] and "while running generate" in j["message"], j["message"]
    assert j["guides"][0] == ["FINISHED"] and j["guides"][2] == "done", j["guides"]


def test_connect_after_a_restart_explains_the_lost_job(run):
    s = ok(run, "reattach_unknown_job")
    assert s["state"] == "failed" and "restarted" in s["message"] and "Traceback" not in s["message"], s["message"]


def test_depth_that_does_not_fit_is_refused_like_the_cli(run):
    s = ok(run, "bad_depth_files")
    expect = {"square": "depth is 48x48 (aspect 1.000) but the video is 64x48",
              "transposed": "it looks turned by 90 degrees", "frames_12": "depth has 12 frames but the shot has 5",
              "frames_2": "depth has 2 frames but the shot has 5", "K_2x2": "K must be 3x3",
              "K_zero_focal": "focal lengths", "nan": "NaN or infinite", "zeros": "zero or negative"}
    for name, words in expect.items():
        r = s[name]
        assert r["result"] == ["CANCELLED"] and words in (r["error"] or ""), (name, r)
        assert "\n" not in r["error"].strip() and "Traceback" not in r["error"], (name, r["error"])
        assert r["state"] == "failed" and words in r["message"], (name, r)  # the panel says it too
        assert r["unchanged"], name


def test_unexpected_error_is_one_line_naming_the_step(run):
    r = ok(run, "bad_depth_files")["bug"]
    assert r["result"] == ["CANCELLED"] and "\n" not in r["error"].strip() and "Traceback" not in r["error"], r
    assert r["error"].strip().startswith("Error: generate failed: ValueError: cannot reshape") and "console" in r["error"], r
    assert r["state"] == "failed" and r["message"] in r["error"]


def test_missing_footage_refuses_guides(run):
    s = ok(run, "footage_missing_and_reconstruct_again")
    assert s["result"] == ["CANCELLED"] and "the footage is missing:" in s["error"] and "footage.mp4" in s["error"], s
    assert "relink it or import again" in s["error"] and s["state"] == "failed" and "footage is missing" in s["message"]
    assert s["relinked"] == [["FINISHED"], "done"]


def test_reconstruct_again_leaves_no_orphan_mesh(run):
    s = ok(run, "footage_missing_and_reconstruct_again")
    assert s["meshes"][0] == s["meshes"][1] == s["meshes"][2], s["meshes"]
    assert s["names"] == [["DW-mesh footage", "DW-mesh footage"]] * 3, s["names"]
    assert s["orphans"] == 0


def test_another_clip_keeps_the_previous_shot(run):
    s = ok(run, "another_clip_keeps_the_previous_shot")
    assert s["state"] == "done" and s["mesh_cleared"] and s["previous_kept"], s
    assert s["new_shot"] == s["before"]["shot"] + "_2", s  # same file name, another folder
    assert s["new"] == [f"DW-mesh {s['new_shot']}", f"EX4D Rig {s['new_shot']}", f"EX4D Source {s['new_shot']}"], s
    assert "stay in the scene" in s["import_message"] and s["before"]["mesh"] in s["import_message"], s


def test_relative_output_folder(run):
    s = ok(run, "relative_output_unsaved")
    assert s["blend"] == "" and "'rel_out/' is relative" in (s["error"] or ""), s
    s = ok(run, "relative_output_saved")
    assert s["blend"] and os.path.normpath(s["dir"]) == os.path.join(os.path.dirname(s["blend"]), "rel_out"), s


def test_file_saved_while_a_local_job_ran_opens_with_a_free_panel(run):
    s = ok(run, "local_job_saved_while_running")
    assert s["state"] == "cancelled" and "interrupted" in s["message"] and s["local_jobs"] == 0


def test_budget(run):
    assert run["wall_s"] < 300


def test_guide_parity_with_ex4d_renderer(run):
    """Blender's Workbench guides vs ex4d.render (torch rasterizer) for the same mesh and camera path."""
    ok(run, "render_guides")
    from backend.workers import mesh_from_arrays
    from ex4d.camera import read_transforms
    from ex4d.render import render_guides

    tmp = run["tmp"]
    arrays = dict(np.load(tmp / "mesh.npz"))
    frames = np.load(tmp / "frames_blender.npy")
    path = read_transforms(tmp / "guide_camera.json")
    T, H, W = frames.shape[:3]
    mesh = mesh_from_arrays(arrays, {}, (H, W), arrays["K"])
    ref = render_guides(mesh, frames, path, rasterizer="torch")
    ours = np.load(tmp / "guides_blender.npz")
    moved = [t for t in range(T) if not np.allclose(path.c2w[t], np.eye(4), atol=1e-6)]  # the library
    assert moved  # returns the source frame unchanged for the source camera itself
    agree = (ours["mask"][moved] == ref.mask[moved]).mean()
    both = ours["mask"][moved] & ref.mask[moved]
    color_err = np.abs(ours["color"][moved].astype(int) - ref.color[moved].astype(int))[both].mean()
    assert (ours["color"][moved][~ours["mask"][moved]] == 0).all()  # masked like the library's guides
    (tmp / "parity.json").write_text(json.dumps({"mask_agreement": float(agree), "color_mae": float(color_err)}))
    assert agree >= 0.98, agree
    assert color_err < 12, color_err


def test_anamorphic_clip_is_read_at_its_display_aspect(tmp_path):
    """Blender's reader ignores the pixel aspect; the add-on's frames must match the library's (which
    desqueezes) instead of a squeezed picture."""
    from fractions import Fraction

    from addon_fixtures import build_zip, run_blender
    from conftest import write_clip
    from ex4d.video import read_video

    yy, xx = np.mgrid[0:96, 0:96]
    frames = np.stack([np.stack([(xx * 3 + 7 * t) % 256, (yy * 2) % 256, ((xx // 12 + yy // 12) % 2) * 255], -1)
                       for t in range(3)]).astype(np.uint8)
    clip = write_clip(tmp_path / "anamorphic.mp4", frames, sample_aspect=Fraction(4, 3))  # shown 128x96
    r = run_blender("bench_read_clip.py", build_zip(tmp_path / "dist"), clip, tmp_path / "blender.npy", 3, 96, tmp=tmp_path)
    assert (tmp_path / "blender.npy").exists(), r.stdout[-2000:] + r.stderr[-2000:]
    ours = np.load(tmp_path / "blender.npy").astype(float)
    library = read_video(clip, size=(96, 96), fit="crop").frames.astype(float)
    squeezed = frames  # what a reader ignoring the aspect gives: the stored 96x96 grid as it is
    assert library.shape == ours.shape == (3, 96, 96, 3)
    err = np.abs(ours - library).mean()
    assert err < 3.0, err
    assert np.abs(squeezed.astype(float) - library).mean() > 4 * err  # the test would see a squeezed read
