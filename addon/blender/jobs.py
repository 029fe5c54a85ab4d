"""Long work without blocking the UI: backend jobs and the local guide render, driven by a timer.

``poll_once(scene)`` is the whole step: it advances the guide render by one frame, drains the client
socket (capabilities, accepted, progress, result, error), applies finished results to the scene and
watches the heartbeat. Nothing waits on the backend: Connect, Generate and Reconstruct only send (the
client's ``*_nowait`` calls) and their answers, or their time-outs, are handled here.
``bpy.app.timers`` calls it in Blender; the ``ex4d.watch_job`` modal operator calls it too (so Esc
cancels and errors become reports); tests call it directly (the bpy module runs no event loop).
The job id, kind and state live in ``scene.ex4d`` and are saved with the .blend, so connecting again
after a restart picks up a job that is still running or already finished.

The backend keeps a finished job's result until the add-on releases it (or its TTL, 24 h by default,
runs out). The add-on releases it only once the result is on disk: a generated shot when its PNG
files are written, a reconstruction (which lives in the scene) when the .blend is next saved. A result
that could not be applied (say, the output folder is not writable) is kept there: fix the problem and
press Connect to fetch it again.
"""


import time

import bpy

from ..core import errors, protocol_client

REMOTE_KINDS = ("reconstruct", "generate")
KEEP_UNTIL_SAVED = ("reconstruct",)  # results that live in the scene: on disk once the .blend is saved
NOT_APPLIED = "result not applied"  # job_stage of a finished job whose result could not be applied
BACKEND_LOST = "backend lost"  # job_stage of a remote job failed because the backend stopped answering
HELLO_TIMEOUT_S = 3.0
TIMER_BUSY_S = 0.2
TIMER_IDLE_S = 1.0


class Runtime:
    """What cannot be saved: the socket, the guide render in progress, messages for the next report."""

    def __init__(self):
        self.client = None
        self.local = {}  # scene name -> the job run inside Blender (FrameReader, GuideRender, DWMeshBuild, ...)
        self.messages = []  # (level, text) not yet shown
        self.watchers = 0  # running ex4d.watch_job modal operators
        self.lost_reported = False
        self.result_handlers = {}  # kind -> fn(scene, Result) -> message
        self.inbox = []  # events received but not yet taken by their scene
        self.unsaved = set()  # job ids applied to the scene, released at the next save of the .blend
        self.connecting = None  # (scene name, deadline) while the hello is unanswered
        self.connect_error = ""
        self.pending_submit = {}  # job id -> (deadline, seconds) for the backend's "accepted"
        self.to_release = set()  # job ids on disk whose release could not be sent yet


RT = Runtime()


def post(level: str, text: str) -> None:
    RT.messages.append((level, text))
    print(f"EX-4D {level.lower()}: {text}")


def take_messages() -> list:
    out, RT.messages = RT.messages, []
    return out


# --------------------------------------------------------------------------------------------------
# connection
# --------------------------------------------------------------------------------------------------


def capabilities_text(caps: dict) -> str:
    """One line per fact, joined with '; ' (the panel splits them)."""
    parts = [str(caps.get("server", f"protocol {caps.get('protocol', '?')}"))]
    if caps.get("generator"):
        parts.append(f"generator: {caps['generator']}")
    gpus = caps.get("gpus") or []
    dev = caps.get("device") or ", ".join(map(str, caps.get("devices") or []))
    if gpus:
        dev += " (" + ", ".join(str(g.get("name", g)) if isinstance(g, dict) else str(g) for g in gpus) + ")"
    if dev:
        parts.append(f"device: {dev}")
    if "max_queue" in caps:
        parts.append(f"queue: {caps.get('queue', 0)}/{caps['max_queue']}")
    return "; ".join(parts)


def connect(scene, wait: bool = False) -> None:
    """Open a client and send hello; the answer (or, after HELLO_TIMEOUT_S, the report that none came)
    is handled by poll_once, so the UI never waits. ``wait``: for scripts, return once it is settled
    (raises ConnectionLost when the backend did not answer)."""
    props = scene.ex4d
    disconnect(scene)
    Client = protocol_client().Client
    keys = bpy.path.abspath(props.keys_dir) if props.keys_dir else None
    client = Client(props.address, timeout_s=HELLO_TIMEOUT_S, server_key=keys, client_keys=keys)
    try:
        client.hello_nowait()
    except BaseException:
        client.close()
        props.backend_state = "not connected"
        raise
    RT.client = client
    RT.lost_reported = False
    RT.connecting, RT.connect_error = (scene.name, time.monotonic() + HELLO_TIMEOUT_S), ""
    props.backend_state = f"connecting to {props.address}"
    ensure_timer()
    if wait:
        while RT.connecting is not None:
            poll_once(scene)
            time.sleep(0.01)
        if RT.client is None:
            raise errors.ConnectionLost(RT.connect_error)


def _connected(scene, caps: dict) -> None:
    """The backend answered hello: show what it runs, send pending releases, pick up the scene's job."""
    props = scene.ex4d
    RT.connecting = None
    props.capabilities = capabilities_text(caps)
    props.backend_state = "connected"
    post("INFO", f"connected: {props.capabilities}")
    send_releases()
    if props.job_id and props.job_kind in REMOTE_KINDS and (
            props.job_state == "running" or (props.job_state == "failed" and props.job_stage in (NOT_APPLIED, BACKEND_LOST))):
        reattach(scene)


def _connect_failed(scene, text: str) -> None:
    RT.connecting, RT.connect_error = None, text
    RT.inbox = []
    disconnect(scene)
    post("ERROR", text)


def disconnect(scene=None) -> None:
    if RT.pending_submit:
        post("WARNING", "disconnected before the backend confirmed the job it was sent: it may not have arrived; "
                        "press Connect to check on it")
    if RT.client is not None:
        RT.client.close()
        RT.client = None
    RT.connecting = None
    RT.pending_submit.clear()
    if scene is not None:
        scene.ex4d.backend_state = "not connected"
        scene.ex4d.capabilities = ""


def require_client():
    if RT.client is None:
        raise errors.ConnectionLost("not connected to a backend: press Connect in the EX-4D tab")
    return RT.client


def reattach(scene) -> None:
    """Ask the backend for the scene's job (nothing released): its result, status (still running: its
    progress comes here from now on) or error arrives through poll_once."""
    props = scene.ex4d
    try:
        RT.client.fetch_nowait(props.job_id)
    except errors.Ex4dError as e:
        post("WARNING", f"could not ask the backend about the {props.job_kind} job ({e}); press Connect again")
        return
    props.job_state, props.job_stage = "running", "asking the backend"


# --------------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------------


def busy(props) -> bool:
    return props.job_state == "running"


def _start(props, kind: str, job_id: str) -> None:
    props.job_id, props.job_kind, props.job_state = job_id, kind, "running"
    props.job_stage, props.job_step, props.job_total, props.job_message = "queued", 0, 0, ""


def check_can_submit(props):
    """Raise the one-line error that stops a submit now (busy, no connection yet, no heartbeat); the client."""
    if busy(props):
        raise errors.InputError(f"a {props.job_kind} job is still running: wait or cancel it first")
    client = require_client()
    if RT.connecting is not None:
        raise errors.ConnectionLost(f"still connecting to {props.address}: try again in a moment")
    if RT.lost_reported:
        raise errors.ConnectionLost(f"the backend at {props.address} is not answering (no heartbeat): restart "
                                    "`ex4d serve` and press Connect")
    return client


def submit(scene, kind: str, params: dict, arrays: dict) -> str:
    """Send the job and return at once; the backend's answer (accepted, busy, error) comes to poll_once,
    which reports a missing one after the client's submit time-out (3 s + upload time)."""
    props = scene.ex4d
    client = check_can_submit(props)
    job_id = client.submit_nowait(kind, params, arrays)
    limit = client.submit_timeout_s(arrays)
    RT.pending_submit[job_id] = (time.monotonic() + limit, limit)
    _start(props, kind, job_id)
    props.job_stage = "sending"
    ensure_timer()
    return job_id


def start_local(scene, kind: str, worker) -> None:
    """A job run inside Blender (the guide render): ``worker.step()`` per tick, ``worker.finish()`` at the end.
    A worker with a ``then(scene, worker)`` prepares a remote job of ``kind`` (reads its input): once it
    is done, ``then`` sends that job (``submit``) and the job goes on as any remote one; cancelled
    before, nothing was sent."""
    props = scene.ex4d
    if busy(props):
        raise errors.InputError(f"a {props.job_kind} job is still running: wait or cancel it first")
    if getattr(worker, "then", None) is not None:
        check_can_submit(props)  # refused now, not after reading
    RT.local[scene.name] = worker
    _start(props, kind, "")
    props.job_stage, props.job_total = getattr(worker, "stage", "working"), worker.num_frames
    ensure_timer()


def cancel(scene) -> None:
    props = scene.ex4d
    if not busy(props):
        return
    worker = RT.local.pop(scene.name, None)
    if worker is not None:
        worker.finish()
        props.job_state, props.job_message = "cancelled", f"{props.job_kind} cancelled"
        post("WARNING", props.job_message)
    elif props.job_id:
        if RT.client is None or not RT.client.alive():
            # nobody to tell: free the panel (the backend, if it comes back, may still finish the job)
            props.job_state = "cancelled"
            props.job_message = f"{props.job_kind} abandoned: the backend is not reachable"
            post("WARNING", props.job_message)
            return
        RT.client.cancel(props.job_id)
        props.job_stage = "cancelling"


def _job_done(scene, result) -> None:
    props = scene.ex4d
    handler = RT.result_handlers.get(props.job_kind)
    remote = props.job_kind in REMOTE_KINDS and bool(getattr(result, "job_id", None))
    try:
        msg = handler(scene, result) if handler else f"{props.job_kind} finished"
    except Exception as e:
        _apply_failed(props, e, remote)
        return
    if hasattr(msg, "step"):  # the result is applied a piece per timer step (a local job; then _job_done again)
        RT.local[scene.name] = msg
        props.job_stage, props.job_step, props.job_total = msg.stage, 0, msg.num_frames
        return
    props.job_state, props.job_stage, props.job_message = "done", "done", msg
    props.job_step = props.job_total
    if remote:
        if props.job_kind in KEEP_UNTIL_SAVED:
            RT.unsaved.add(result.job_id)
        else:
            release(result.job_id)
    post("INFO", msg)


def _apply_failed(props, e, remote: bool) -> None:
    """Applying a result (or running a local job) failed: a one-line report; a remote result is kept."""
    if not isinstance(e, errors.Ex4dError):  # a bug: the console gets the traceback, the artist a one-line report
        import traceback

        traceback.print_exc()
        e = f"{type(e).__name__}: {e} (a bug in the add-on; the console has details)"
    _job_failed(props, e)
    if remote:  # not released: the backend still has it
        props.job_stage = NOT_APPLIED
        props.job_message += "; the result stays on the backend: fix this and press Connect to fetch it again"


def release(job_id: str) -> None:
    """Let the backend delete a result the add-on has on disk (sent now, or at the next Connect)."""
    RT.to_release.add(job_id)
    send_releases()


def send_releases() -> None:
    if RT.client is None:
        return
    for job_id in sorted(RT.to_release):
        try:
            RT.client.release(job_id)
        except errors.Ex4dError:  # no connection right now: try again at the next Connect
            return
        RT.to_release.discard(job_id)


@bpy.app.handlers.persistent
def on_save_post(*_args) -> None:
    """The .blend holds the reconstructions applied since the last save: the backend may drop them."""
    for job_id in sorted(RT.unsaved):
        RT.to_release.add(job_id)
    RT.unsaved.clear()
    send_releases()


@bpy.app.handlers.persistent
def on_load_post(*_args) -> None:
    """Another file: the reconstructions of the one left unsaved are not on disk (the backend keeps
    them); jobs run inside Blender went with the old file, and one the new file says is running (it was
    saved meanwhile) cannot go on: it is marked interrupted, so the panel is free again."""
    RT.unsaved.clear()
    for worker in RT.local.values():  # their scenes and data are gone: only their temporary files remain
        tmp = getattr(worker, "_tmp", None)
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    RT.local.clear()
    for scene in bpy.data.scenes:
        props = getattr(scene, "ex4d", None)
        if props is not None and busy(props) and (props.job_kind not in REMOTE_KINDS or not props.job_id):
            # (a remote job without an id was still reading its input: it was never sent)
            props.job_state = props.job_stage = "cancelled"
            props.job_message = f"{props.job_kind} interrupted (the file was saved while it ran): run it again"


def _job_failed(props, e) -> None:
    cancelled = isinstance(e, errors.Cancelled) or getattr(e, "code", "") == "cancelled"
    props.job_state = props.job_stage = "cancelled" if cancelled else "failed"
    props.job_message = f"{props.job_kind} cancelled" if cancelled else f"{props.job_kind} failed: {e}"
    post("WARNING" if cancelled else "ERROR", props.job_message)


def poll_once(scene) -> None:
    """One step of everything in flight for ``scene``; messages go to ``take_messages()``."""
    props = scene.ex4d
    worker = RT.local.get(scene.name)
    if worker is not None:
        try:
            more = worker.step()
            props.job_stage, props.job_step = getattr(worker, "stage", "working"), worker.t
            if not more:
                RT.local.pop(scene.name, None)
                worker.finish()
                if getattr(worker, "then", None) is not None:
                    _send_prepared(scene, worker)
                else:
                    _job_done(scene, worker)
        except Exception as e:  # a failed render must never leave the job "running" (UI stuck)
            RT.local.pop(scene.name, None)
            worker.finish()
            if props.job_kind in REMOTE_KINDS and getattr(worker, "job_id", None):  # applying a backend result
                _apply_failed(props, e, True)
            else:
                _job_failed(props, e)
    client = RT.client
    if client is None:
        return
    try:
        RT.inbox.extend(client.poll())
    except errors.Ex4dError as e:
        post("ERROR", str(e))
        return
    pc = protocol_client()
    keep = []
    for ev in RT.inbox:
        if ev.type == "capabilities":
            target = bpy.data.scenes.get(RT.connecting[0]) if RT.connecting else None
            if target is not None and target != scene:
                keep.append(ev)
            else:
                _connected(target or scene, client.capabilities or {})
            continue
        if ev.type == "error" and ev.job_id is None:
            if RT.connecting is not None:  # e.g. a refused protocol version
                _connect_failed(scene, f"the backend at {props.address} refused the connection: "
                                       f"{ev.header.get('message', 'error')}")
                return
            post("ERROR", ev.header.get("message", "backend error"))
            continue
        if not ev.job_id or ev.job_id != props.job_id or not busy(props):
            if ev.job_id and ev.type in ("result", "error") and _owned_elsewhere(ev.job_id, scene):
                keep.append(ev)  # another scene's job: its own poll takes it
            continue
        RT.pending_submit.pop(ev.job_id, None)  # any answer: the backend has the job
        if ev.type == "accepted":
            props.job_stage = "queued" if ev.header.get("position") else "starting"
        elif ev.type == "progress":
            props.job_stage = str(ev.stage or "")
            props.job_step, props.job_total = int(ev.step or 0), int(ev.total or 0)
        elif ev.type == "status" and ev.header.get("state") in ("queued", "running"):  # the answer to reattach
            if props.job_stage == "asking the backend":
                post("INFO", f"following the {ev.header['state']} {props.job_kind} job")
            props.job_stage = str(ev.header.get("stage") or ev.header["state"])
            props.job_step, props.job_total = int(ev.header.get("step") or 0), int(ev.header.get("total") or 0)
        elif ev.type == "result":
            _job_done(scene, pc.Result(dict(ev.header.get("params") or {}), ev.arrays, ev.job_id))
        elif ev.type == "busy":
            _job_failed(props, pc.Client.submit_error(ev))
        elif ev.type == "error" and ev.header.get("code") == "unknown_job":
            _job_failed(props, f"the backend no longer has this {props.job_kind} job (it was restarted since, or the "
                               f"result expired): press {props.job_kind.capitalize()} again")
        elif ev.type == "error":
            _job_failed(props, pc.error_for(ev.header.get("code", "error"), ev.header.get("message", ""), ev.job_id))
    RT.inbox = keep
    now = time.monotonic()
    if RT.connecting is not None:
        if now > RT.connecting[1] and bpy.data.scenes.get(RT.connecting[0]) in (None, scene):
            _connect_failed(scene, f"no answer from the backend at {props.address} within {HELLO_TIMEOUT_S:.0f} s: "
                                   "is `ex4d serve` running there (and do the keys match)?")
        return  # no heartbeat to judge yet
    for job_id, (deadline, limit) in list(RT.pending_submit.items()):
        if job_id != props.job_id or not busy(props):
            continue
        if now > deadline:
            del RT.pending_submit[job_id]
            try:  # should it arrive after all, it is not wanted any more
                client.cancel(job_id)
            except errors.Ex4dError:
                pass
            _job_failed(props, errors.ConnectionLost(
                f"no answer from the backend at {props.address} to the {props.job_kind} job within {limit:.0f} s: "
                "is `ex4d serve` running there?"))
    alive = client.alive()
    if not alive:
        props.backend_state = f"no heartbeat from {props.address}"
        if not RT.lost_reported:
            RT.lost_reported = True
            post("ERROR", f"the backend at {props.address} stopped answering (no heartbeat); "
                          "restart `ex4d serve` and press Connect: running jobs are picked up again")
        _fail_lost_job(scene, client)
    elif props.backend_state != "connected":
        props.backend_state = "connected"
        RT.lost_reported = False
        if props.job_state == "failed" and props.job_stage == BACKEND_LOST and props.job_id:
            reattach(scene)  # it came back (stalled, not restarted): the job may still be there


def _fail_lost_job(scene, client) -> None:
    """The backend is declared dead (no heartbeat): the scene's remote job cannot progress, so it fails
    now (the panel is free again) instead of saying "running" forever. Its stage says why: when the
    heartbeat comes back, or at the next Connect, the backend is asked for it again. A job still
    waiting for "accepted" has its own, more precise time-out (pending_submit)."""
    props = scene.ex4d
    if not (busy(props) and props.job_kind in REMOTE_KINDS and props.job_id) or scene.name in RT.local \
            or props.job_id in RT.pending_submit:
        return
    last = getattr(client, "_last_rx", 0.0)
    silent = time.monotonic() - last if last else client.heartbeat_timeout_s
    _job_failed(props, f"the backend at {props.address} stopped (no heartbeat for {silent:.0f} s) while running "
                       f"{props.job_kind}; restart `ex4d serve` and press Connect (a job it still has is picked up "
                       f"again), or press {props.job_kind.capitalize()} again")
    props.job_stage = BACKEND_LOST


def _send_prepared(scene, worker) -> None:
    """The input of a remote job is read (a local job with ``then``): send the job."""
    props = scene.ex4d
    props.job_state = "sending"  # not "running": submit refuses a busy scene, and starts the job itself
    try:
        worker.then(scene, worker)
    except Exception as e:
        props.job_state = "running"
        _apply_failed(props, e, False)


def _owned_elsewhere(job_id: str, scene) -> bool:
    return any(sc.ex4d.job_id == job_id and sc != scene for sc in bpy.data.scenes)


def progress_text(props) -> str:
    if not props.job_state:
        return ""
    if props.job_state == "running":
        if props.job_total:
            return f"{props.job_kind}: {props.job_stage} {props.job_step}/{props.job_total}"
        return f"{props.job_kind}: {props.job_stage}"
    return props.job_message


class LocalSteps:
    """A local job written as a generator: ``step()`` runs ``self._steps`` to its next ``yield t`` (frames
    done so far, for the panel) and says True until it is exhausted; ``finish()`` closes it, so its
    ``finally`` blocks clean up when it is cancelled or fails halfway. Subclasses set ``stage``,
    ``num_frames`` and ``_steps`` (dwmesh.DWMeshBuild, workflow.ShotWriter, guides.GuideReader)."""

    stage = "working"
    num_frames = 0
    t = 0
    _steps = iter(())

    def step(self) -> bool:
        """Do the next piece; True while pieces remain."""
        try:
            self.t = next(self._steps)
        except StopIteration:
            self.t = self.num_frames
            return False
        return True

    def finish(self) -> None:
        close = getattr(self._steps, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------------------------------
# timer
# --------------------------------------------------------------------------------------------------


def _redraw() -> None:
    wm = bpy.context.window_manager
    for window in getattr(wm, "windows", []):
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "SEQUENCE_EDITOR"):
                area.tag_redraw()


def _status_bar(text: str) -> None:
    ws = getattr(bpy.context, "workspace", None)
    if ws is not None:
        try:
            ws.status_text_set(text or None)
        except (AttributeError, RuntimeError, TypeError):
            pass


def timer_step():
    """bpy.app.timers callback: poll every scene with work in flight; None unregisters when idle."""
    active = False
    for scene in bpy.data.scenes:
        props = scene.ex4d
        if busy(props) or RT.client is not None:
            try:
                poll_once(scene)
            except Exception as e:  # keep the timer alive whatever happens
                import traceback

                traceback.print_exc()
                post("ERROR", f"EX-4D polling failed: {type(e).__name__}: {e}")
            active = active or busy(props)
            if busy(props):
                _status_bar("EX-4D " + progress_text(props))
    if RT.watchers == 0:
        take_messages()  # already printed; the panel shows the last job message
    if not active:
        _status_bar("")
    _redraw()
    if RT.client is None and not RT.local:
        return None
    return TIMER_BUSY_S if active else TIMER_IDLE_S


def ensure_timer() -> None:
    if not bpy.app.timers.is_registered(timer_step):
        bpy.app.timers.register(timer_step, first_interval=TIMER_BUSY_S, persistent=True)


def register():
    if on_save_post not in bpy.app.handlers.save_post:
        bpy.app.handlers.save_post.append(on_save_post)
    if on_load_post not in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.append(on_load_post)


def unregister():
    if on_save_post in bpy.app.handlers.save_post:
        bpy.app.handlers.save_post.remove(on_save_post)
    if on_load_post in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(on_load_post)
    if bpy.app.timers.is_registered(timer_step):
        bpy.app.timers.unregister(timer_step)
    for worker in RT.local.values():
        worker.finish()
    RT.local.clear()
    disconnect()
