"""Camera moves on real Blender cameras: presets keyed as keyframes, transforms.json in and out."""

import bpy
import numpy as np
from mathutils import Matrix

from ..core import camera, errors
from ..core.cameras import K_from_lens, c2w_from_world, check_single_focal, world_from_c2w
from .dwmesh import set_lens


def _matrix(m) -> Matrix:
    return Matrix([list(map(float, row)) for row in np.asarray(m)])


def rig_world(props) -> np.ndarray:
    return np.array(props.rig.matrix_world) if props.rig is not None else camera.EX4D_TO_BLENDER


def shot_K(props) -> np.ndarray:
    return camera.Intrinsics(props.fx, props.fy, props.cx, props.cy, props.width, props.height).K


def camera_K(cam_obj, width: int, height: int) -> np.ndarray:
    d = cam_obj.data
    if d.type != "PERSP":
        raise errors.CameraFileError(f"camera '{cam_obj.name}' is not a perspective camera")
    return K_from_lens(d.lens, d.sensor_width, d.shift_x, d.shift_y, width, height, d.sensor_fit, d.sensor_height)


# Blender's near plane: 10x the library's (its viewport depth buffer is coarser), still far nearer
# than anything a move reaches. Both follow the shot's scene scale (depth in millimetres, say).
CLIP_START = 0.01


def clip_range(props) -> tuple[float, float]:
    """(clip_start, clip_end) of the shot's cameras: the library's far plane (scene_scale, clip_far from
    the backend), Blender's own near plane."""
    scale = props.scene_scale if props is not None else 1.0
    far = props.clip_far if props is not None and props.clip_far > 0 else camera.CLIP_FAR * scale
    return CLIP_START * scale, far


def set_clip(cam_data, props=None) -> None:
    """The shot's clip range on a camera: the whole DW-mesh, skirt included, stays in view."""
    cam_data.clip_start, cam_data.clip_end = clip_range(props)


def new_camera(scene, name: str, rig=None, props=None):
    """A camera for a move; parented to the shot's rig so moving the rig moves the whole shot."""
    data = bpy.data.cameras.new(name)
    set_clip(data, props)
    obj = bpy.data.objects.new(name, data)
    scene.collection.objects.link(obj)
    if rig is not None:
        obj.parent = rig
        obj.matrix_parent_inverse = Matrix.Identity(4)
    return obj


def key_path(cam_obj, path: camera.CameraPath, frame_start: int, rig: np.ndarray) -> None:
    """Keyframe location + rotation of ``cam_obj`` so it follows ``path`` from ``frame_start`` on; lens from K."""
    set_lens(cam_obj.data, check_single_focal(path), path.width, path.height)
    worlds = world_from_c2w(path.c2w, rig)
    cam_obj.rotation_mode = "XYZ"
    parent_inv = Matrix.Identity(4)
    if cam_obj.parent is not None:
        parent_inv = (cam_obj.parent.matrix_world @ cam_obj.matrix_parent_inverse).inverted()
    prev = None
    for t, M in enumerate(worlds):
        local = parent_inv @ _matrix(M)
        loc, rot, _scale = local.decompose()
        eul = rot.to_euler("XYZ", prev) if prev is not None else rot.to_euler("XYZ")
        prev = eul
        cam_obj.location = loc
        cam_obj.rotation_euler = eul
        cam_obj.keyframe_insert("location", frame=frame_start + t)
        cam_obj.keyframe_insert("rotation_euler", frame=frame_start + t)


def read_path(scene, cam_obj, frame_start: int, num_frames: int, width: int, height: int, rig: np.ndarray,
              name: str | None = None) -> camera.CameraPath:
    """Evaluate any camera (keyframed, constrained, parented, ...) at each shot frame."""
    current = scene.frame_current
    mats, Ks = [], []
    try:
        for t in range(num_frames):
            scene.frame_set(frame_start + t)
            mats.append(np.array(cam_obj.matrix_world))
            Ks.append(camera_K(cam_obj, width, height))
    finally:
        scene.frame_set(current)
    return camera.CameraPath(c2w_from_world(np.stack(mats), rig), np.stack(Ks), width, height, name=name or cam_obj.name)


def preset(props, name: str, angle_deg: float, distance_factor: float) -> camera.CameraPath:
    """``ex4d.camera.preset_path`` for the shot: pivot from the reconstructed depth (EX-4D's rule for arcs)."""
    if props.depth_median <= 0:
        raise errors.InputError("reconstruct the shot first: camera moves are sized by the scene depth")
    intr = camera.Intrinsics(props.fx, props.fy, props.cx, props.cy, props.width, props.height)
    is_arc = name == "180" or name.lstrip("-").isdigit()
    pivot = props.depth_min + camera.EX4D_PIVOT_OFFSET if is_arc else props.depth_median
    distance = distance_factor * pivot if distance_factor > 0 else None
    return camera.preset_path(name, props.num_frames, intr, pivot=pivot, angle_deg=angle_deg, distance=distance)


def export_transforms(scene, props, cam_obj, filepath: str) -> camera.CameraPath:
    path = read_path(scene, cam_obj, props.frame_start, props.num_frames, props.width, props.height, rig_world(props))
    camera.write_transforms(path, bpy.path.abspath(filepath))
    return path


def import_transforms(scene, props, filepath: str, cam_obj=None):
    path = camera.read_transforms(bpy.path.abspath(filepath))
    if props.has_shot and (path.width, path.height) != (props.width, props.height):
        path = path.resized(props.width, props.height)
    if cam_obj is None:
        cam_obj = new_camera(scene, path.name if path.name.startswith("EX4D") else f"EX4D {path.name}", props.rig,
                             props)
    key_path(cam_obj, path, props.frame_start, rig_world(props))
    return cam_obj, path

