"""The DW-mesh as an ordinary Blender mesh object.

* Vertex positions per frame: relative shape keys, one per shot frame (the basis is frame 0), keyed
  0 -> 1 -> 0 with linear interpolation, so frame t shows exactly the backend's vertices of frame t (and
  sub-frames blend neighbours). They live in the .blend (save + reload keeps them) and stay valid when
  the artist deletes vertices or edits the basis (Blender carries the edit into every key).
* UVs (``ex4d_uv``) into the source video; the material shows the footage through an Image Texture
  whose image user follows the scene frame (video frame first + t at scene frame start + t).
* ``ex4d_valid`` (colour attribute, per vertex, white = keep): the artist paints black in Vertex Paint
  to force regeneration. ``ex4d_auto_valid_<k>`` (INT face attributes): the backend's per-frame face
  validity, bit-packed 32 frames per attribute (core/validity.py). ``ex4d_mask`` (colour, per corner):
  the current frame's combined mask, refreshed for the guide render and on frame change.
"""

import bpy
import numpy as np
from mathutils import Matrix

from . import jobs
from ..core import camera, validity
from ..core.cameras import lens_from_K

PROP_SHOT = "ex4d_shot"
PROP_FRAME_START = "ex4d_frame_start"
PROP_FRAMES = "ex4d_num_frames"


def _matrix(m) -> Matrix:
    return Matrix([list(map(float, row)) for row in np.asarray(m)])


def ensure_rig(scene, name: str):
    """An empty whose world matrix maps the shot's world (y up) into Blender's (z up)."""
    rig = bpy.data.objects.get(name)
    if rig is None:
        rig = bpy.data.objects.new(name, None)
        rig.empty_display_type = "ARROWS"
        rig.empty_display_size = 0.25
        scene.collection.objects.link(rig)
        rig.matrix_world = _matrix(camera.EX4D_TO_BLENDER)
    return rig


def build_mesh(name: str, vertices0: np.ndarray, faces: np.ndarray, uv_source: np.ndarray) -> "bpy.types.Mesh":
    V, F = len(vertices0), len(faces)
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(V)
    mesh.vertices.foreach_set("co", np.ascontiguousarray(vertices0, dtype=np.float32).ravel())
    mesh.loops.add(3 * F)
    mesh.loops.foreach_set("vertex_index", np.ascontiguousarray(faces, dtype=np.int32).ravel())
    mesh.polygons.add(F)
    mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * F, 3, dtype=np.int32))
    uv_layer = mesh.uv_layers.new(name="ex4d_uv")
    uv_layer.data.foreach_set("uv", np.ascontiguousarray(uv_source[faces.ravel()], dtype=np.float32).ravel())
    mesh.update(calc_edges=True)
    return mesh


def set_auto_validity(mesh, face_valid: np.ndarray) -> None:
    words = validity.pack(face_valid)
    for k, w in enumerate(words):
        name = f"{validity.AUTO_PREFIX}{k}"
        attr = mesh.attributes.get(name) or mesh.attributes.new(name, "INT", "FACE")
        attr.data.foreach_set("value", np.ascontiguousarray(w, dtype=np.int32))


def auto_words(mesh) -> np.ndarray:
    out = []
    k = 0
    while (attr := mesh.attributes.get(f"{validity.AUTO_PREFIX}{k}")) is not None:
        w = np.empty(len(mesh.polygons), dtype=np.int32)
        attr.data.foreach_get("value", w)
        out.append(w)
        k += 1
    return np.stack(out) if out else np.zeros((0, len(mesh.polygons)), dtype=np.int32)


def painted_valid(mesh) -> np.ndarray:
    """Per-vertex painted value (min of R, G, B, so any dark paint counts), 1 where never painted."""
    attr = mesh.color_attributes.get(validity.PAINT_ATTR)
    if attr is None:
        return np.ones(len(mesh.vertices), dtype=np.float32)
    col = np.empty(len(attr.data) * 4, dtype=np.float32)
    attr.data.foreach_get("color", col)
    col = col.reshape(-1, 4)[:, :3].min(axis=1)
    if attr.domain == "POINT":
        return col
    per_vertex = np.ones(len(mesh.vertices), dtype=np.float32)
    vi = np.empty(len(mesh.loops), dtype=np.int32)
    mesh.loops.foreach_get("vertex_index", vi)
    np.minimum.at(per_vertex, vi, col)
    return per_vertex


def frame_face_mask(mesh, t: int) -> np.ndarray:
    """Guide mask of shot frame t per face: the backend's validity AND the artist's paint."""
    words = auto_words(mesh)
    F = len(mesh.polygons)
    auto = validity.unpack_frame(words, t) if len(words) and t < validity.BITS * len(words) else np.ones(F, bool)
    corner_vertex = np.empty(len(mesh.loops), dtype=np.int32)
    mesh.loops.foreach_get("vertex_index", corner_vertex)
    corner_start = np.empty(F, dtype=np.int32)
    mesh.polygons.foreach_get("loop_start", corner_start)
    order = np.argsort(corner_start, kind="stable")  # reduceat needs increasing starts
    mask = np.empty(F, dtype=bool)
    mask[order] = validity.face_mask(auto[order], painted_valid(mesh), corner_vertex, corner_start[order])
    return mask


def update_mask_attribute(mesh, t: int) -> np.ndarray:
    """Write frame t's mask into the ``ex4d_mask`` corner colour attribute (white = valid)."""
    mask = frame_face_mask(mesh, t)
    totals = np.empty(len(mesh.polygons), dtype=np.int32)
    mesh.polygons.foreach_get("loop_total", totals)
    per_corner = np.repeat(mask, totals)
    starts = np.empty(len(mesh.polygons), dtype=np.int32)
    mesh.polygons.foreach_get("loop_start", starts)
    corner_index = np.repeat(starts, totals) + (np.arange(totals.sum()) - np.repeat(np.cumsum(totals) - totals, totals))
    values = np.zeros(len(mesh.loops), dtype=np.float32)
    values[corner_index] = per_corner
    attr = mesh.color_attributes.get(validity.MASK_ATTR) or mesh.color_attributes.new(validity.MASK_ATTR, "BYTE_COLOR", "CORNER")
    rgba = np.repeat(values[:, None], 4, axis=1)
    rgba[:, 3] = 1.0
    attr.data.foreach_set("color", rgba.ravel())
    mesh.update()
    return mask


def footage_material(name: str, image, frame_start: int, first_frame: int, num_frames: int):
    """Unlit material showing the footage; its image user plays video frame first+t at scene frame start+t."""
    mat = bpy.data.materials.new(name)
    if hasattr(mat, "use_nodes") and not mat.use_nodes:
        mat.use_nodes = True
    nt = mat.node_tree
    for n in list(nt.nodes):
        nt.nodes.remove(n)
    tex = nt.nodes.new("ShaderNodeTexImage")
    tex.name = tex.label = "ex4d_footage"
    tex.image = image
    tex.interpolation = "Linear"
    tex.extension = "EXTEND"
    iu = tex.image_user
    iu.frame_start = int(frame_start)
    iu.frame_offset = int(first_frame)
    iu.frame_duration = int(num_frames)  # Blender: movie frame = (scene frame - start + 1, clamped to this) + offset
    iu.use_auto_refresh = True
    emit = nt.nodes.new("ShaderNodeEmission")
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    nt.links.new(tex.outputs["Color"], emit.inputs["Color"])
    nt.links.new(emit.outputs["Emission"], out.inputs["Surface"])
    tex.location, emit.location, out.location = (-400, 0), (-100, 0), (150, 0)
    nt.nodes.active = tex  # Workbench's Texture colour shows the active image node
    return mat


KEYS_PER_STEP = 8  # shape keys per timer step while building (about 0.35 s at 512x512)


def key_frames(obj, vertices: np.ndarray, frame_start: int) -> None:
    """One relative shape key per frame after the first, keyed 0 / 1 / 0 around its frame (linear)."""
    for _ in key_frames_steps(obj, vertices, frame_start, chunk=len(vertices)):
        pass


def key_frames_steps(obj, vertices: np.ndarray, frame_start: int, chunk: int = KEYS_PER_STEP):
    """key_frames a ``chunk`` of frames at a time; yields the last frame keyed."""
    T = len(vertices)
    obj.shape_key_add(name="frame_0000", from_mix=False)  # basis = frame 0
    obj.data.shape_keys.name = f"{obj.name} frames"
    for lo in range(1, T, chunk):
        prefs = bpy.context.preferences.edit  # the artist's setting, put back before anything else runs
        old_interp = prefs.keyframe_new_interpolation_type
        prefs.keyframe_new_interpolation_type = "LINEAR"
        try:
            for t in range(lo, min(lo + chunk, T)):
                kb = obj.shape_key_add(name=f"frame_{t:04d}", from_mix=False)
                kb.data.foreach_set("co", np.ascontiguousarray(vertices[t], dtype=np.float32).ravel())
                f = frame_start + t
                for frame, value in ((f - 1, 0.0), (f, 1.0), (f + 1, 0.0)):
                    if frame == frame_start + T:  # past the shot: nothing to fade out to
                        continue
                    kb.value = value
                    kb.keyframe_insert("value", frame=frame)
                kb.value = 0.0
        finally:
            prefs.keyframe_new_interpolation_type = old_interp
        yield min(lo + chunk, T) - 1


def create_dwmesh_object(scene, shot: str, rig, vertices, faces, uv_source, face_valid, image, frame_start: int,
                         first_frame: int):
    """Build the DW-mesh object (parented to the rig) in one go and return it."""
    build = DWMeshBuild(scene, shot, rig, vertices, faces, uv_source, face_valid, image, frame_start, first_frame,
                        keys_per_step=len(vertices))
    while build.step():
        pass
    build.finish()
    return build.obj


class DWMeshBuild(jobs.LocalSteps):
    """Builds the DW-mesh object a piece per ``step()`` (mesh and attributes, then KEYS_PER_STEP shape
    keys, then the first mask), so applying a 512x512x49 reconstruction (4.6-7.7 s in one go) leaves the
    UI responsive. The object joins the scene in the last step; ``finish()`` before that (cancel, error)
    removes what was made. ``obj`` is the object once done."""

    stage = "building the DW-mesh"

    def __init__(self, scene, shot: str, rig, vertices, faces, uv_source, face_valid, image, frame_start: int,
                 first_frame: int, keys_per_step: int = KEYS_PER_STEP):
        self.vertices = np.asarray(vertices, dtype=np.float32)
        self.num_frames, self.t, self.obj = len(self.vertices), 0, None
        self._made = []  # (collection, datablock) to remove if never finished
        self._steps = self._build(scene, shot, rig, np.asarray(faces, dtype=np.int32), np.asarray(uv_source),
                                  face_valid, image, frame_start, first_frame, keys_per_step)

    def _build(self, scene, shot, rig, faces, uv_source, face_valid, image, frame_start, first_frame, chunk):
        vertices = self.vertices
        name = f"DW-mesh {shot}"
        mesh = build_mesh(name, vertices[0], faces, uv_source)
        self._made.append((bpy.data.meshes, mesh))
        set_auto_validity(mesh, face_valid)
        paint = mesh.color_attributes.new(validity.PAINT_ATTR, "BYTE_COLOR", "POINT")
        paint.data.foreach_set("color", np.ones(len(mesh.vertices) * 4, dtype=np.float32))
        mesh.color_attributes.active_color = paint
        mat = footage_material(f"EX4D footage {shot}", image, frame_start, first_frame, len(vertices))
        self._made.append((bpy.data.materials, mat))
        mesh.materials.append(mat)
        obj = bpy.data.objects.new(name, mesh)
        self._made.insert(0, (bpy.data.objects, obj))
        obj[PROP_SHOT] = shot
        obj[PROP_FRAME_START] = int(frame_start)
        obj[PROP_FRAMES] = int(len(vertices))
        yield 0
        if len(vertices) > 1:
            yield from key_frames_steps(obj, vertices, frame_start, chunk)
        update_mask_attribute(mesh, 0)
        mesh.color_attributes.active_color = paint
        scene.collection.objects.link(obj)
        obj.parent = rig
        obj.matrix_parent_inverse = Matrix.Identity(4)
        self.obj, self._made = obj, []

    def finish(self) -> None:
        super().finish()
        for collection, block in self._made:  # not finished: leave nothing half-built behind
            try:
                collection.remove(block)
            except (ReferenceError, RuntimeError):
                pass
        self._made = []


def create_source_camera(scene, shot: str, rig, K, width: int, height: int, props=None):
    """The camera that filmed the shot: identity pose in the shot's world, matching intrinsics."""
    from .cameras import set_clip

    data = bpy.data.cameras.new(f"EX4D Source {shot}")
    set_lens(data, K, width, height)
    set_clip(data, props)
    cam = bpy.data.objects.new(f"EX4D Source {shot}", data)
    scene.collection.objects.link(cam)
    cam.parent = rig
    cam.matrix_parent_inverse = Matrix.Identity(4)
    cam.matrix_basis = Matrix.Identity(4)
    return cam


def set_lens(cam_data, K, width: int, height: int) -> None:
    lens = lens_from_K(K, width, height)
    cam_data.type = "PERSP"
    cam_data.sensor_fit = "HORIZONTAL"
    cam_data.sensor_width = lens.sensor_width
    cam_data.lens = lens.lens
    cam_data.shift_x = lens.shift_x
    cam_data.shift_y = lens.shift_y


def evaluated_positions(obj, depsgraph) -> np.ndarray:
    """Vertex positions of the evaluated mesh (shape keys, modifiers applied) in the object's space."""
    ev = obj.evaluated_get(depsgraph)
    me = ev.to_mesh()
    try:
        co = np.empty(len(me.vertices) * 3, dtype=np.float32)
        me.vertices.foreach_get("co", co)
        return co.reshape(-1, 3)
    finally:
        ev.to_mesh_clear()
