"""The steps of the workflow, callable from operators, scripts and tests (operators stay thin)."""

import os
import time

import bpy
import numpy as np

from . import cameras, dwmesh, guides, jobs, timeline, video
from ..core import camera, depth_rules, errors, shot as shotlib

# Frames read at import, kept for Reconstruct (re-read from the movie after a reload).
_FRAMES_CACHE = {}


def _cache_key(props) -> tuple:
    return (bpy.path.abspath(props.video_path), props.first_frame, props.num_frames, props.width, props.height)


def output_dir(props) -> str:
    raw = props.output_dir or "//ex4d/"
    if not raw.startswith("//") and not os.path.isabs(os.path.expanduser(raw)):  # "out/": relative to the .blend
        if not bpy.data.filepath:
            raise errors.InputError(f"the output folder '{raw}' is relative and the .blend is not saved: save it "
                                    "first, or give an absolute folder (or '//folder/' for next to the .blend)")
        raw = "//" + raw
    d = bpy.path.abspath(os.path.expanduser(raw))
    if d.startswith("//") or not os.path.isabs(d):  # unsaved .blend: "//" has no folder yet
        import tempfile

        # The whole '//a/x/' under the temp folder ('//a/x/' and '//b/x/' must not share one); the
        # steps' messages name the folder they wrote.
        rel = os.path.normpath(d[2:] if d.startswith("//") else d).lstrip(os.sep)
        d = os.path.join(tempfile.gettempdir(), "ex4d", "unsaved", rel if rel not in ("", ".") else "ex4d")
    d = os.path.normpath(d)
    os.makedirs(d, exist_ok=True)
    return d


# --------------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------------


def start_import(scene, filepath: str, first: int = 0, count: int = 0, width: int = 512, height: int = 512,
                 focal_px: float = 0.0, fov_deg: float = 0.0, frame_start: int | None = None):
    """Check the settings, then read the frames a few per timer tick (a local job); apply_import finishes."""
    if width <= 0 or height <= 0:
        raise errors.InputError(f"working size must be positive, got {width}x{height}")
    info = video.probe(filepath)
    if count <= 0:
        count = info["frames"] - first
    intr, source = shotlib.working_intrinsics(width, height, focal_px, fov_deg)
    reader = video.FrameReader(filepath, first, count, width, height)
    reader.settings = {"filepath": filepath, "intrinsics": intr, "source": source, "frame_start": frame_start,
                       "started": time.perf_counter()}
    try:
        jobs.start_local(scene, "import", reader)
    except errors.Ex4dError:
        reader.finish()
        raise
    return reader


def apply_import(scene, reader) -> str:
    """Store the shot on the scene; set the scene's frame range, resolution and frame rate."""
    props = scene.ex4d
    s, info = reader.settings, reader.info
    intr, count, width, height = s["intrinsics"], reader.num_frames, reader.width, reader.height
    same_video, kept = _keep_previous_shot(props, s["filepath"])
    if not (same_video and props.shot_name):
        props.shot_name = _unused_shot_name(shotlib.shot_name(s["filepath"]))
    props.video_path = s["filepath"]
    props.image = video.load_footage_image(s["filepath"])
    props.src_width, props.src_height = info["width"], info["height"]
    props.first_frame, props.num_frames, props.video_frames = reader.first, count, info["frames"]
    props.width, props.height, props.fps = width, height, info["fps"]
    props.fx, props.fy, props.cx, props.cy = intr.fx, intr.fy, intr.cx, intr.cy
    props.intrinsics_source = s["source"]
    props.frame_start = scene.frame_start if s["frame_start"] is None else s["frame_start"]
    scene.frame_start, scene.frame_end = props.frame_start, props.frame_start + count - 1
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = width, height, 100
    if info["fps"] > 0:
        scene.render.fps, scene.render.fps_base = max(1, round(info["fps"])), max(1, round(info["fps"])) / info["fps"]
    _FRAMES_CACHE.clear()
    _FRAMES_CACHE[_cache_key(props)] = reader.frames
    took = time.perf_counter() - s["started"]
    message = f"imported {count} frames at {width}x{height} in {took:.1f} s (intrinsics: {s['source']})"
    if kept:
        message += f"; the previous shot's objects stay in the scene ({kept})"
    return message


def _keep_previous_shot(props, filepath: str) -> tuple[bool, str]:
    """Importing another video starts a new shot: the previous shot's DW-mesh (with the artist's paint
    and edits), rig and source camera stay in the scene as they are, no longer the active shot; the
    new shot makes its own. Re-importing the same video keeps the shot (Reconstruct then replaces its
    mesh). Returns (same video, the names of the objects kept)."""
    same = bool(props.video_path) and os.path.normcase(bpy.path.abspath(props.video_path)) == \
        os.path.normcase(bpy.path.abspath(filepath))
    if same or not props.video_path:
        return same, ""
    kept = [obj.name for obj in (props.mesh, props.source_camera, props.rig) if obj is not None]
    props.mesh = props.source_camera = props.rig = None
    return False, ", ".join(f"'{name}'" for name in kept)


def _unused_shot_name(name: str) -> str:
    """``name``, or ``name_2``, ``name_3``... when objects of another shot already carry it (two clips
    called shot.mp4 from different folders must not share a rig)."""
    taken = {o.name for o in bpy.data.objects}

    def used(candidate: str) -> bool:
        return any(f"{prefix} {candidate}" in taken for prefix in ("EX4D Rig", "DW-mesh", "EX4D Source"))

    candidate, k = name, 2
    while used(candidate):
        candidate, k = f"{name}_{k}", k + 1
    return candidate


def import_video(scene, filepath: str, **kwargs) -> str:
    """Synchronous import for scripts: start_import, then drive it to the end."""
    start_import(scene, filepath, **kwargs)
    while jobs.busy(scene.ex4d):
        jobs.poll_once(scene)
    if scene.ex4d.job_state != "done":
        raise errors.VideoError(scene.ex4d.job_message)
    return scene.ex4d.job_message


def shot_frames(props) -> np.ndarray:
    """The shot's frames, from the cache or re-read in one go (scripts; Reconstruct reads them stepwise)."""
    key = _cache_key(props)
    if key not in _FRAMES_CACHE:
        _keep_frames(props, video.read_frames(props.video_path, props.first_frame, props.num_frames, props.width,
                                              props.height))
    return _FRAMES_CACHE[key]


def _keep_frames(props, frames) -> None:
    _FRAMES_CACHE.clear()
    _FRAMES_CACHE[_cache_key(props)] = frames


def _shot_reader(props):
    """A FrameReader for the shot's frames (after a reload they are not cached): a local job's worker."""
    return video.FrameReader(props.video_path, props.first_frame, props.num_frames, props.width, props.height)


def send_after(scene, kind: str, worker, then) -> str:
    """Run ``worker`` (reading a job's input) a few frames per timer step, then ``then(scene, worker)``
    sends the job: the operator returns at once, the panel shows the reading's progress, and Cancel
    before the end sends nothing. Returns "" (the job id comes with the submit)."""
    worker.then = then
    try:
        jobs.start_local(scene, kind, worker)
    except BaseException:
        worker.finish()
        raise
    return ""


def require_shot(props) -> None:
    if not props.has_shot:
        raise errors.InputError("import a video first (EX-4D tab > Import Video)")


# --------------------------------------------------------------------------------------------------
# reconstruct
# --------------------------------------------------------------------------------------------------


def read_depth_file(path: str, props) -> dict:
    """The depth file's content (the add-on reads it; the backend never gets a path): depth (+ K)."""
    p = bpy.path.abspath(path)
    if not os.path.isfile(p):
        raise errors.DepthError(f"depth file not found: {p}")
    if not p.lower().endswith((".npz", ".npy")):
        raise errors.DepthError(f"{p}: the add-on reads .npz/.npy depth (depth float32 (T,H,W)); convert other formats with the CLI")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.ndarray):
            depth, K = data, None
        else:
            if "depth" not in data:
                raise errors.DepthError(f"{p}: no 'depth' array in the file")
            depth, K = data["depth"], data["K"] if "K" in data else None
    except (OSError, ValueError) as e:
        raise errors.DepthError(f"{p}: not a readable numpy file ({e})") from None
    try:
        depth = np.asarray(depth, dtype=np.float32)
    except (TypeError, ValueError):
        raise errors.DepthError(f"{p}: depth must be numbers, got {depth.dtype}") from None
    if depth.ndim == 2:
        depth = depth[None]
    if depth.ndim != 3:
        raise errors.DepthError(f"{p}: depth must be (T,H,W), got shape {depth.shape}")
    # the CLI's rules (ex4d/depth_rules.py): one map per frame, the video's picture (aspect), a usable K
    T, dh, dw = depth.shape
    video_frames = props.video_frames or props.num_frames  # 0: a .blend from before it was stored
    if T != props.num_frames:
        if T == video_frames and props.first_frame + props.num_frames <= T:  # depth for the whole video
            depth = depth[props.first_frame: props.first_frame + props.num_frames]
        elif video_frames != props.num_frames:
            raise errors.DepthError(
                f"{p}: depth has {T} frame{'s' * (T != 1)} but the shot has {props.num_frames} (video frames "
                f"{props.first_frame}-{props.first_frame + props.num_frames - 1} of {video_frames}); give one depth "
                "map per shot frame or per video frame")
        else:
            depth_rules.check_frame_count(T, props.num_frames, p)
    depth_rules.check_aspect(dw, dh, (props.src_height or props.height, props.src_width or props.width), p)
    if K is not None:
        K = depth_rules.check_K(K, T, p)
    depth_rules.check_values(depth, p)  # refused here, not after the backend got the job
    crop = shotlib.FillCrop(dw, dh, props.width, props.height)  # the same fill + centre crop as the frames
    out = {"depth": np.ascontiguousarray(crop.sample_nearest(depth))}
    if K is not None:
        out["depth_K"] = crop.intrinsics(K.reshape(-1, 3, 3)[0])
    return out


def submit_reconstruct(scene, depth_path: str = "", depth_model: str = "") -> str:
    """Send the shot (its frames, and the depth file's content). Frames not in memory (a reopened .blend)
    are read from the movie first, a few per timer step (``send_after``): then it returns ""."""
    props = scene.ex4d
    require_shot(props)
    jobs.check_can_submit(props)
    arrays = {}
    if depth_path:
        depth = read_depth_file(depth_path, props)
        arrays["depth"] = depth["depth"]
        if "depth_K" in depth and props.intrinsics_source.startswith("EX-4D default"):
            K = depth["depth_K"]  # already at the working size
            props.fx, props.fy, props.cx, props.cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
            props.intrinsics_source = "depth file"
    params = {"K": cameras.shot_K(props).tolist(), "name": props.shot_name}
    if depth_model:
        params["depth_model"] = depth_model
    frames = _FRAMES_CACHE.get(_cache_key(props))
    if frames is not None:
        return jobs.submit(scene, "reconstruct", params, {"frames": frames, **arrays})

    def then(sc, reader):
        _keep_frames(sc.ex4d, reader.frames)
        jobs.submit(sc, "reconstruct", params, {"frames": reader.frames, **arrays})

    return send_after(scene, "reconstruct", _shot_reader(props), then)


def apply_reconstruct(scene, result):
    """The backend's result -> a DWMeshBuild that jobs.py steps on the timer; called again with that
    build once it is done (finish_reconstruct)."""
    if isinstance(result, dwmesh.DWMeshBuild):
        return finish_reconstruct(scene, result)
    props = scene.ex4d
    a = result.arrays
    missing = [k for k in ("vertices", "faces", "uv") if k not in a]
    if missing:
        raise errors.ProtocolError(f"the backend's reconstruct result lacks {', '.join(missing)}")
    vertices, faces, uv = a["vertices"], a["faces"], a["uv"]
    T = len(vertices)
    face_valid = a.get("face_valid")
    if face_valid is None:
        face_valid = np.ones((T, len(faces)), dtype=bool)
    lens = {}
    if "K" in a or "K" in result.params:
        K = np.asarray(a.get("K", result.params.get("K")), dtype=np.float64).reshape(-1, 3, 3)[0]
        lens = {"fx": K[0, 0], "fy": K[1, 1], "cx": K[0, 2], "cy": K[1, 2]}
    depth0 = a["depth"][0] if "depth" in a else -np.asarray(vertices[0])[:, 2]
    d = depth0[np.isfinite(depth0) & (depth0 > 0)]
    crop = shotlib.FillCrop(props.src_width, props.src_height, props.width, props.height)
    rig = dwmesh.ensure_rig(scene, f"EX4D Rig {props.shot_name}")
    build = dwmesh.DWMeshBuild(scene, props.shot_name, rig, vertices, faces, crop.uv_to_source(uv), face_valid,
                               props.image, props.frame_start, props.first_frame)
    build.job_id = result.job_id  # released once the .blend holding the mesh is saved
    scale, far = result.params.get("scene_scale"), result.params.get("clip_far")
    if scale is None:  # an older backend: the same rule on the depth it returned
        scale = camera.scene_scale(a["depth"][:, ::4, ::4] if "depth" in a else depth0)
    build.settings = {"rig": rig, "depth_min": float(d.min()),
                      "depth_median": camera.pivot_depth(depth0, "median"),  # the sky left out
                      "scene_scale": float(scale), "clip_far": float(far or 0.0), **lens}
    return build


def _remove_replaced(old) -> None:
    """The previous DW-mesh object, and its mesh (+ shape keys) and footage material once nothing else
    uses them: a replaced full-size mesh left as an orphan would weigh hundreds of MB in the .blend."""
    mesh = old.data
    mats = [m for m in getattr(mesh, "materials", []) if m is not None]
    bpy.data.objects.remove(old)
    if mesh is not None and mesh.users == 0:
        bpy.data.meshes.remove(mesh)
    for mat in mats:
        if mat.users == 0:
            bpy.data.materials.remove(mat)


def finish_reconstruct(scene, build) -> str:
    """The DW-mesh is built: it replaces the shot's previous one; the source camera follows the lens."""
    props = scene.ex4d
    s = build.settings
    for key in ("fx", "fy", "cx", "cy", "depth_min", "depth_median", "scene_scale", "clip_far"):
        if key in s:
            setattr(props, key, s[key])
    obj, old = build.obj, props.mesh
    if old is not None and old != obj and old.name in bpy.data.objects:
        _remove_replaced(old)
        obj.name = obj.data.name = f"DW-mesh {props.shot_name}"  # the old one's name is free again: stable
        for mat in obj.data.materials:
            if mat is not None:
                mat.name = f"EX4D footage {props.shot_name}"
    props.rig, props.mesh = s["rig"], obj
    if props.source_camera is None or props.source_camera.name not in bpy.data.objects:
        props.source_camera = dwmesh.create_source_camera(scene, props.shot_name, s["rig"], cameras.shot_K(props),
                                                          props.width, props.height, props)
    else:  # a re-import may have changed the lens and the depth's scale
        dwmesh.set_lens(props.source_camera.data, cameras.shot_K(props), props.width, props.height)
        cameras.set_clip(props.source_camera.data, props)
    if scene.camera is None:
        scene.camera = props.source_camera
    me = obj.data
    return f"DW-mesh '{obj.name}': {len(me.vertices)} vertices, {len(me.polygons)} faces, {build.num_frames} frames"


# --------------------------------------------------------------------------------------------------
# camera moves
# --------------------------------------------------------------------------------------------------


def key_preset(scene, preset: str, cam_obj=None, angle_deg: float = 30.0, distance_factor: float = 0.0):
    props = scene.ex4d
    require_shot(props)
    path = cameras.preset(props, preset, angle_deg, distance_factor)
    if cam_obj is None:
        cam_obj = cameras.new_camera(scene, f"EX4D {preset} {props.shot_name}", props.rig, props)
    cameras.key_path(cam_obj, path, props.frame_start, cameras.rig_world(props))
    scene.camera = cam_obj
    return cam_obj, path


# --------------------------------------------------------------------------------------------------
# guides, generation
# --------------------------------------------------------------------------------------------------


def shot_dir(props, cam_name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cam_name)
    return os.path.join(output_dir(props), f"{props.shot_name}_{safe}")


def check_footage(props) -> None:
    """The DW-mesh's texture is the shot's movie image: refuse to render guides from a movie Blender
    cannot read (deleted, moved, broken), which would paint every guide Blender's missing-texture magenta."""
    img = props.image
    path = bpy.path.abspath(img.filepath if img is not None else props.video_path,
                            library=img.library if img is not None else None)
    hint = "(relink it or import again)"
    if not os.path.isfile(path):
        raise errors.InputError(f"the footage is missing: {path} {hint}")
    if img is None:
        raise errors.InputError(f"the footage image is missing from the .blend: {path} (import again)")
    if tuple(img.size) == (0, 0):  # a failed load is remembered: try the file as it is now
        img.reload()
    last = props.first_frame + props.num_frames
    if tuple(img.size) == (0, 0) or img.frame_duration < last:
        raise errors.InputError(f"the footage cannot be read (or has fewer than {last} frames): {path} {hint}")


def start_guides(scene, cam_obj=None):
    props = scene.ex4d
    require_shot(props)
    cam_obj = cam_obj or scene.camera
    if props.mesh is None or props.mesh.name not in scene.objects:
        raise errors.InputError("no DW-mesh in the scene: reconstruct the shot first")
    check_footage(props)
    out = os.path.join(shot_dir(props, cam_obj.name if cam_obj else "camera"), "guides")
    worker = guides.GuideRender(scene, [props.mesh], cam_obj, out, props.frame_start, props.num_frames, props.width,
                                props.height, clip=cameras.clip_range(props))
    # the camera path beside the guides, for the CLI (ex4d ... --camera cameras.json)
    cameras.export_transforms(scene, props, cam_obj, os.path.join(os.path.dirname(out), f"cameras_{props.shot_name}.json"))
    props.guides_dir, props.guides_camera = out, cam_obj.name
    jobs.start_local(scene, "guides", worker)
    return worker


def apply_guides(scene, worker) -> str:
    return f"guides rendered: {worker.num_frames} frames from '{worker.camera.name}' in {worker.out_dir}"


def submit_generate(scene) -> str:
    props = scene.ex4d
    require_shot(props)
    if not props.guides_dir:
        raise errors.InputError("render the guides first (EX-4D tab > Render Guides)")
    jobs.check_can_submit(props)
    params = {"prompt": props.prompt, "seed": props.seed, "fps": props.fps, "name": f"{props.shot_name}_{props.guides_camera}"}

    def then(sc, reader):  # the guide PNGs are read a few frames per timer step, then sent
        jobs.submit(sc, "generate", params, {"color": reader.color, "mask": reader.mask})

    return send_after(scene, "generate", guides.GuideReader(props.guides_dir, props.num_frames), then)


def _sync_to_disk(paths, folder: str) -> None:
    """fsync the files and their folder (the backend deletes its copy once told)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShotWriter(jobs.LocalSteps):
    """Writes the generated frames as ``out/shot_####.png``, FRAMES_PER_STEP per ``step()`` (a local job,
    so the UI stays responsive), then fsyncs them: only then may the backend drop its copy."""

    stage = "writing the shot"
    FRAMES_PER_STEP = 8

    def __init__(self, frames, out: str, job_id):
        self.frames, self.out, self.job_id = np.asarray(frames, dtype=np.uint8), out, job_id
        self.num_frames, self.t = len(self.frames), 0
        self.paths = [os.path.join(out, f"shot_{t + 1:04d}.png") for t in range(self.num_frames)]
        self._steps = self._write()

    def _write(self):
        try:
            for t in range(self.num_frames):
                video.save_png_rgb(self.paths[t], self.frames[t])
                if (t + 1) % self.FRAMES_PER_STEP == 0 and t + 1 < self.num_frames:
                    yield t + 1
            _sync_to_disk(self.paths, self.out)
        except (OSError, RuntimeError) as e:  # RuntimeError: Blender's image save
            raise errors.Ex4dError(f"could not write the generated frames to {self.out}: {e}") from None


def apply_generate(scene, result):
    """The backend's frames -> a ShotWriter (a PNG sequence: lossless; Blender plays it as an image
    strip) that jobs.py steps on the timer; called again with the writer once the files are on disk."""
    props = scene.ex4d
    if isinstance(result, ShotWriter):
        props.result_dir = result.out
        return f"generated {result.num_frames} frames into {result.out}"
    frames = result.arrays.get("frames")
    if frames is None:
        raise errors.ProtocolError("the backend's generate result has no 'frames'")
    out = os.path.join(os.path.dirname(props.guides_dir.rstrip(os.sep)) or shot_dir(props, props.guides_camera), "shot")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise errors.Ex4dError(f"could not write the generated frames to {out}: {e}") from None
    return ShotWriter(frames, out, result.job_id)


def send_to_timeline(scene, with_guides: bool = False, with_source: bool = False) -> list:
    props = scene.ex4d
    require_shot(props)
    if not props.result_dir:
        raise errors.InputError("generate the shot first (EX-4D tab > Generate)")
    n, fs = props.num_frames, props.frame_start
    move = f"{props.shot_name} {props.guides_camera}"
    made = [timeline.add_image_sequence(scene, shotlib.fitted_name(move), props.result_dir, "shot_", n, fs)]
    if with_guides and props.guides_dir:
        made.append(timeline.add_image_sequence(scene, shotlib.fitted_name(move, " guide"), props.guides_dir, "color_", n, fs))
    if with_source:
        made.append(timeline.add_movie(scene, shotlib.fitted_name(props.shot_name, " source"), props.video_path,
                                       props.first_frame, n, fs))
    return made


jobs.RT.result_handlers.update(
    {"import": apply_import, "reconstruct": apply_reconstruct, "guides": apply_guides, "generate": apply_generate}
)
