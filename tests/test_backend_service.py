"""A real ``ex4d serve --generator tiny`` process on 127.0.0.1 (free port), driven through the client library.

Covers: the reconstruct -> render -> generate round trip against the in-process result (exact), progress
order, cancel within one denoising step, busy, four clients at once, a client killed mid-job, failing
jobs, a fuzz loop of bad messages, and `ex4d client ping/run`. Small frames (5 x 64x48) throughout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from backend.launch import ServiceProcess
from ex4d.errors import Cancelled, InputError
from ex4d.protocol import wire
from ex4d.protocol.client import Client

ROOT = Path(__file__).resolve().parents[1]
T, H, W = 5, 48, 64
FOCAL = 60.0


def make_inputs():
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    depth = np.where((xx > W // 3) & (xx < 2 * W // 3) & (yy > H // 4), 1.5, 3.0).astype(np.float32)
    return frames, np.broadcast_to(depth, (T, H, W)).copy()


def in_process_reference(frames, depth, seed=3, steps=2):
    """reconstruct -> render -> generate with the library in this process (the round trip's reference)."""
    from ex4d.camera import Intrinsics, preset_path
    from ex4d.generate import load_generator
    from ex4d.recon import reconstruct, render_path

    intr = Intrinsics.from_focal(FOCAL, W, H)
    path = preset_path("orbit_right", T, intr, depth0=depth[0])
    mesh = reconstruct(frames, depth, intr)
    guides = render_path(mesh, frames, path)
    video = load_generator("tiny").generate(guides.color, guides.mask, seed=seed, steps=steps)
    return {"path": path, "mesh": mesh, "guides": guides, "video": video}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ex4d-serve")
    svc = ServiceProcess(["--generator", "tiny", "--device", "cpu", "--max-queue", "4", "--max-message-mb", "8"],
                         jobs_dir=tmp / "jobs", log_path=tmp / "serve.log")
    # The in-process reference loads its own tiny generator: do it while the service starts.
    reference = {}
    worker = threading.Thread(target=lambda: reference.update(in_process_reference(*make_inputs())), daemon=True)
    worker.start()
    svc.reference = (worker, reference)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
        assert svc.proc.returncode == 0, svc.log()[-2000:]


@pytest.fixture
def client(service):
    c = Client(service.address, timeout_s=20)
    yield c
    c.close()


def test_ping_prints_capabilities(service):
    out = subprocess.run([sys.executable, "-m", "ex4d.cli", "client", "ping", "--address", service.address],
                         capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    caps = json.loads(out.stdout)
    assert caps["protocol"] == wire.PROTOCOL_VERSION and caps["generator"] == "tiny"
    assert {"reconstruct", "render", "generate", "shot"} <= set(caps["kinds"])
    assert caps["limits"]["max_message_bytes"] == 8 * 2**20


def test_round_trip_matches_in_process(client, service):
    from ex4d.camera import Intrinsics, preset_path

    frames, depth = make_inputs()
    # --- through the service ---
    job = client.submit("reconstruct", {"focal": FOCAL}, {"frames": frames, "depth": depth})
    rec = client.wait(job)
    intr = Intrinsics.from_K(rec.arrays["K"], W, H)
    path = preset_path("orbit_right", T, intr, depth0=depth[0])
    mesh_arrays = {k: rec.arrays[k] for k in ("vertices", "faces", "uv", "face_valid", "vertex_alpha", "vertex_pixel")}
    job = client.submit("render", {"width": W, "height": H}, {**mesh_arrays, "frames": frames, "c2w": path.c2w, "K": path.K})
    guides = client.wait(job)
    events = []
    job = client.submit("generate", {"seed": 3, "steps": 2}, {"color": guides.arrays["color"], "mask": guides.arrays["mask"]})
    gen = client.wait(job, on_progress=events.append)

    # --- the same in this process (computed while the service started) ---
    worker, ref = service.reference
    worker.join(300)
    assert ref, "in-process reference failed"
    mesh, local, video = ref["mesh"], ref["guides"], ref["video"]
    assert np.allclose(ref["path"].c2w, path.c2w)

    assert np.array_equal(rec.arrays["vertices"], mesh.vertices.numpy())
    assert np.array_equal(rec.arrays["face_valid"], mesh.face_valid.numpy())
    assert np.array_equal(rec.arrays["depth"], depth)
    assert np.array_equal(guides.arrays["color"], local.color) and np.array_equal(guides.arrays["mask"], local.mask)
    assert 0.2 < guides.arrays["mask"].mean() < 1.0
    assert gen.arrays["frames"].dtype == np.uint8 and np.array_equal(gen.arrays["frames"], video)

    # progress: stages in order, steps never go back within a stage, the denoising stage reaches its total
    assert events and all(e.type == "progress" and e.job_id == job for e in events)
    stages = [e.stage for e in events]
    assert "denoise" in stages
    order = list(dict.fromkeys(stages))
    assert [s for s in stages] == sorted(stages, key=order.index)
    for s in order:
        steps = [e.step for e in events if e.stage == s]
        assert steps == sorted(steps)
    assert max(e.step for e in events if e.stage == "denoise") == 2


def test_cancel_stops_within_one_denoising_step(client, service):
    frames = np.full((T, H, W, 3), 128, np.uint8)
    mask = np.ones((T, H, W), bool)
    mask[:, :, W // 2:] = False
    job = client.submit("generate", {"steps": 40, "seed": 0}, {"color": frames, "mask": mask})
    cancel = threading.Event()
    seen = []

    def on_progress(ev):
        seen.append((ev.stage, ev.step, time.monotonic()))
        if ev.stage == "denoise" and ev.step >= 1 and not cancel.is_set():
            cancel.set()

    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        client.wait(job, on_progress=on_progress, cancel=cancel, timeout_s=120)
    at_cancel = next(i for i, s in enumerate(seen) if s[0] == "denoise" and s[1] >= 1)
    later = [s[1] for s in seen[at_cancel + 1:] if s[0] == "denoise"]
    assert len(later) <= 1, f"ran {len(later)} more denoising steps after cancel"
    st = client.status(job)
    assert st["state"] == "cancelled" and st["error"]["code"] == "cancelled"
    assert time.monotonic() - t0 < 100
    assert client.hello()["busy"] is False


def test_busy_when_the_queue_is_full_then_cancel_queued(client):
    blob = {"x": np.arange(10, dtype=np.int32)}
    jobs = [client.submit("echo", {"steps": 50, "step_seconds": 0.1}, blob)]
    deadline = time.monotonic() + 20
    while client.status(jobs[0])["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    jobs += [client.submit("echo", {"steps": 1}, blob) for _ in range(4)]  # --max-queue 4
    with pytest.raises(wire.BackendBusy):
        client.submit("echo", {}, blob)
    for j in reversed(jobs):
        client.cancel(j)
    for j in jobs:
        with pytest.raises(Cancelled):
            client.wait(j, timeout_s=20)
    assert client.status()["queue"] == 0


def test_four_clients_at_once_are_served_in_order(service):
    start = threading.Barrier(4)
    results: dict[int, dict] = {}
    errors = []

    def one(i):
        try:
            with Client(service.address, timeout_s=20) as c:
                x = np.full((T, H, W, 3), i, np.uint8)
                start.wait()
                job = c.submit("echo", {"steps": 3, "step_seconds": 0.05}, {"frames": x})
                pos = c.status(job).get("position")
                r = c.wait(job, timeout_s=60)
                results[i] = {"pos": pos, "done": time.monotonic(), "ok": np.array_equal(r.arrays["frames"], x)}
        except Exception as e:  # surfaced below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors and len(results) == 4
    assert all(r["ok"] for r in results.values())
    by_finish = sorted(results, key=lambda i: results[i]["done"])
    positions = [results[i]["pos"] for i in by_finish if results[i]["pos"] is not None]
    assert positions == sorted(positions)  # first come, first served


CLIENT_SCRIPT = r"""
import sys, time, numpy as np
from ex4d.protocol.client import Client
c = Client(sys.argv[1], timeout_s=20)
x = np.arange(T_H_W, dtype=np.float32).reshape(-1, 4)
job = c.submit("echo", {"steps": 10, "step_seconds": 0.1}, {"x": x})
print(job, flush=True)
time.sleep(60)
""".replace("T_H_W", str(4 * 1000))


def test_client_killed_mid_job_then_a_new_client_fetches(service):
    # The submitting client runs in Blender's environment when there is one (the artist's set-up).
    py = ROOT / ".venv-blender/bin/python"
    python = str(py) if py.exists() else sys.executable
    proc = subprocess.Popen([python, "-c", CLIENT_SCRIPT, service.address], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=str(ROOT))
    try:
        job = proc.stdout.readline().strip()
        assert wire.is_job_id(job), job
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with Client(service.address, timeout_s=20) as c:
        first = c.fetch(job, release=False)
        result = first or c.wait(job, timeout_s=60, release=False)
        assert np.array_equal(result.arrays["x"], np.arange(4000, dtype=np.float32).reshape(-1, 4))
        assert c.fetch(job) is not None  # still stored (not released above); released now
        with pytest.raises(wire.RemoteError) as e:
            c.fetch(job)
        assert e.value.code == "unknown_job"


def test_failing_jobs_become_error_replies(client):
    frames, depth = make_inputs()
    with pytest.raises(InputError, match="depth"):  # refused at submit: no depth, no model
        client.submit("reconstruct", {}, {"frames": frames})
    bad_depth = np.full_like(depth, np.nan)
    job = client.submit("reconstruct", {"focal": FOCAL}, {"frames": frames, "depth": bad_depth})
    with pytest.raises(Exception) as e:
        client.wait(job, timeout_s=60)
    assert getattr(e.value, "code", None) in ("bad_depth", "bad_input") and "\n" not in str(e.value)
    faces = np.array([[0, 1, 10**6]], np.int32)
    arrays = {"vertices": np.zeros((T, 4, 3), np.float32), "faces": faces, "uv": np.zeros((4, 2), np.float32),
              "face_valid": np.ones((T, 1), bool), "frames": frames, "c2w": np.broadcast_to(np.eye(4), (T, 4, 4)).copy(),
              "K": np.array([[FOCAL, 0, W / 2], [0, FOCAL, H / 2], [0, 0, 1.0]])}
    job = client.submit("render", {}, arrays)
    with pytest.raises(InputError, match="faces"):
        client.wait(job, timeout_s=60)
    assert client.hello()["protocol"] == wire.PROTOCOL_VERSION


def _fuzz_message(rng, i):
    good = wire.encode("submit", wire.new_job_id(), {"frames": np.zeros((2, 4, 4, 3), np.uint8)}, kind="echo", params={})
    kind = i % 10
    if kind == 0:
        return [rng.bytes(int(rng.integers(0, 200)))]
    if kind == 1:
        return [bytes(good[0]), bytes(good[1])[: int(rng.integers(0, 95))]]  # truncated array frame
    if kind == 2:
        h = json.loads(good[0]); h["v"] = int(rng.integers(2, 1000))
        return [json.dumps(h).encode(), bytes(good[1])]
    if kind == 3:
        h = json.loads(good[0]); h["arrays"][0]["shape"] = [10**6, 10**6, 3]
        return [json.dumps(h).encode(), bytes(good[1])]
    if kind == 4:
        h = json.loads(good[0]); h["arrays"][0]["dtype"] = rng.choice(["object", "S10", "complex128", "", "V8"])
        return [json.dumps(h).encode(), bytes(good[1])]
    if kind == 5:
        h = json.loads(good[0]); h["kind"] = "rm -rf /"
        return [json.dumps(h).encode(), bytes(good[1])]
    if kind == 6:
        h = json.loads(good[0]); h["params"] = [1, 2]
        return [json.dumps(h).encode(), bytes(good[1])]
    if kind == 7:
        h = json.loads(good[0]); h["job"] = "../../../etc/passwd"
        return [json.dumps(h).encode(), bytes(good[1])]
    if kind == 8:
        return [json.dumps({"v": 1, "type": rng.choice(["result", "progress", "capabilities", "nope"]), "arrays": []}).encode()]
    return [bytes(good[0])] + [b"x"] * int(rng.integers(2, 5))  # extra frames


def test_fuzz_bad_messages_get_errors_and_the_service_stays_up(service, client):
    rng = np.random.default_rng(0)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(service.address)
    try:
        n = 200
        for i in range(n):
            s.send_multipart(_fuzz_message(rng, i))
        errors = 0
        deadline = time.monotonic() + 30
        while errors < n and time.monotonic() < deadline:
            if s.poll(500):
                msg = wire.decode(s.recv_multipart())
                if msg.type == "error":
                    assert msg.header["code"] in ("protocol", "version", "too_large", "bad_input") and msg.header["message"]
                    errors += 1
        assert errors == n
        # A frame over the service's --max-message-mb: ZeroMQ drops that connection; the service lives on.
        big = wire.encode("submit", wire.new_job_id(), {"x": np.zeros(9 * 2**20, np.uint8)}, kind="echo", params={})
        s.send_multipart(big)
    finally:
        s.close(0)
    assert client.hello()["protocol"] == wire.PROTOCOL_VERSION
    assert service.alive()


def test_client_run_writes_guides_and_shot(service, tmp_path):
    from ex4d.video import write_video

    frames, depth = make_inputs()
    video = tmp_path / "clip.mp4"
    write_video(video, frames, 8.0)
    np.savez(tmp_path / "depth.npz", depth=depth)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ex4d.cli", "client", "run", str(video), "--depth", str(tmp_path / "depth.npz"),
           "--cam", "orbit_left", "--focal", str(FOCAL), "--steps", "1", "--address", service.address, "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cameras_orbit_left.json", "color_orbit_left.mp4", "mask_orbit_left.mp4", "render_orbit_left.npz",
                     "shot_orbit_left.mp4"]
    assert "denoise" in r.stderr  # the progress bar
    with np.load(out / "render_orbit_left.npz") as z:
        assert z["color"].shape == (T, H, W, 3) and z["mask"].dtype == bool


def test_nowait_calls_answer_through_poll(service):
    """hello/submit/fetch without waiting (the Blender add-on's way): every answer comes through poll()."""
    frames, depth = make_inputs()

    def until(c, match, timeout_s=60.0):
        seen, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for ev in c.poll(100):
                seen.append(ev)
                if match(ev):
                    return ev, seen
        raise AssertionError(f"no matching event; saw {[e.type for e in seen]}")

    with Client(service.address, timeout_s=20) as c:
        t = time.monotonic()
        c.hello_nowait()
        assert time.monotonic() - t < 0.5 and c.capabilities is None
        ev, _ = until(c, lambda e: e.type == "capabilities")
        assert c.capabilities and c.capabilities["generator"] == ev.header["generator"]
        job = c.submit_nowait("reconstruct", {"K": [[FOCAL, 0, W / 2], [0, FOCAL, H / 2], [0, 0, 1]]},
                              {"frames": frames, "depth": depth})
        assert c.submit_timeout_s({"frames": frames}) > c.timeout_s
        ev, seen = until(c, lambda e: e.job_id == job and e.type in ("result", "error"))
        assert [e.type for e in seen if e.job_id == job][0] == "accepted" and ev.type == "result"
        c.fetch_nowait(job)  # a finished job: its result again, nothing released
        ev, _ = until(c, lambda e: e.job_id == job and e.type in ("result", "error"))
        assert ev.type == "result" and ev.arrays["vertices"].shape[0] == T
        bad = c.submit_nowait("generate", {}, {"color": np.zeros((T, H, W, 3), np.uint8)})  # no mask
        ev, _ = until(c, lambda e: e.job_id == bad and e.type in ("accepted", "busy", "error"))
        assert ev.type == "error" and isinstance(Client.submit_error(ev), InputError)
        c.fetch_nowait("0" * 32)
        ev, _ = until(c, lambda e: e.job_id == "0" * 32)
        assert ev.type == "error" and ev.header["code"] == "unknown_job"


def _client_run(service, capsys, video, depth, out, *extra):
    from ex4d.cli import main

    code = main(["client", "run", str(video), "--depth", str(depth), "--focal", str(FOCAL), "--steps", "1", "--quiet",
                 "--address", service.address, "--out", str(out), *map(str, extra)])
    stdout, err = capsys.readouterr()
    return code, stdout, err


@pytest.mark.parametrize("input_name, extra", [
    ("color_orbit_right.mp4", ["--guides-only"]),  # the colour guide over the input video
    ("shot_orbit_right.mp4", []),  # the shot over the input video
    ("cameras_orbit_right.json", []),  # the camera file over the --trajectory that was read
])
def test_client_run_refuses_an_output_that_is_an_input(service, tmp_path, capsys, input_name, extra):
    """As `ex4d run`: refused before the backend is contacted (no job), the input untouched."""
    from ex4d.camera import CameraPath, Intrinsics, orbit_poses, write_transforms
    from ex4d.video import write_video

    frames, depth = make_inputs()
    out = tmp_path / "out"
    out.mkdir()
    video, trajectory = tmp_path / "clip.mp4", []
    if input_name.endswith(".mp4"):
        video = out / input_name
    write_video(video, frames, 8.0)
    np.savez(tmp_path / "depth.npz", depth=depth)
    if input_name.endswith(".json"):
        path = CameraPath(orbit_poses(T, 2.0, yaw_deg=20), Intrinsics.from_focal(FOCAL, W, H).K, W, H, name="orbit_right")
        write_transforms(path, out / input_name)
        trajectory = ["--trajectory", out / input_name]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = _client_run(service, capsys, video, tmp_path / "depth.npz", out, *trajectory, *extra)
    assert code == 2 and "Traceback" not in err and "submitted" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: --out:") and "would destroy it" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_client_run_again_says_it_replaced_the_earlier_set(service, tmp_path, capsys):
    from ex4d.camera import read_transforms
    from ex4d.video import write_video

    frames, depth = make_inputs()
    write_video(tmp_path / "clip.mp4", frames, 8.0)
    np.savez(tmp_path / "depth.npz", depth=depth)
    out = tmp_path / "out"
    args = (service, capsys, tmp_path / "clip.mp4", tmp_path / "depth.npz", out)
    code, stdout, err = _client_run(*args, "--angle", "20")
    assert code == 0 and "replaced" not in stdout, err
    code, stdout, err = _client_run(*args, "--angle", "40", "--guides-only")
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == (f"replaced the earlier 'orbit_right' shot in {out}; removed shot_orbit_right.mp4 "
                                               "(not made by this run); pass --name to keep both")
    assert not (out / "shot_orbit_right.mp4").exists()
    code, stdout, err = _client_run(*args, "--angle", "30", "--guides-only", "--name", "or30")
    assert code == 0 and "replaced" not in stdout, err
    assert read_transforms(out / "cameras_or30.json").name == "or30"  # the camera file names its own set


def test_client_ping_into_a_closed_pipe_exits_quietly(service):
    """`ex4d client ping | head -0`: the reader is gone before the JSON is printed; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "ex4d.cli", "client", "ping", "--address", service.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
    proc.stdout.close()  # long before the client has connected and printed
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
