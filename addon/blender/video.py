"""Reading the footage inside Blender, headless: the Video Sequencer renders the movie strip.

``Image.pixels`` of a movie only gives one frame and ``Image.gl_load`` needs a GPU context, so the
add-on renders a temporary scene whose sequencer holds the movie strip (FILL fit = scale and centre-
crop to the working size) to PNG files and reads them back. 49 frames of 640x480 -> 512x512 take
about 2.5 s on 2 CPU cores. The footage is never sent as a path: the backend gets the pixels.
"""

import os
import shutil
import tempfile

import bpy
import numpy as np

from ..core import errors, fit
from ..core.pixel_aspect import read_pixel_aspect


def strips(sequence_editor):
    """Blender 5.0 renamed ``sequences`` to ``strips``."""
    return sequence_editor.strips if hasattr(sequence_editor, "strips") else sequence_editor.sequences


def probe(filepath: str) -> dict:
    """Displayed size (square pixels: an anamorphic clip's stored width times its pixel aspect), length
    (frames), frame rate and ``pixel_aspect`` of a movie file."""
    path = bpy.path.abspath(filepath)
    if not os.path.isfile(path):
        raise errors.VideoError(f"video not found: {path}")
    scene = bpy.data.scenes.new("ex4d_probe")
    try:
        se = scene.sequence_editor_create()
        strip = strips(se).new_movie("probe", path, 1, 1)
        if strip.frame_final_duration <= 0:
            raise errors.VideoError(f"{path}: Blender cannot decode this video (no frames)")
        elem = strip.elements[0]
        aspect = read_pixel_aspect(path)  # Blender's reader ignores it (see core/pixel_aspect.py)
        info = {"width": max(1, round(int(elem.orig_width) * aspect)), "height": int(elem.orig_height),
                "frames": int(strip.frame_final_duration), "fps": float(getattr(strip, "fps", 0) or scene.render.fps),
                "pixel_aspect": float(aspect), "stored_width": int(elem.orig_width)}
        if info["width"] <= 0:
            raise errors.VideoError(f"{path}: Blender cannot decode this video")
        return info
    except RuntimeError as e:
        raise errors.VideoError(f"{path}: Blender cannot open this video ({e})") from None
    finally:
        bpy.data.scenes.remove(scene)


def load_png_rgb(path: str, channels: int = 3) -> np.ndarray:
    """A PNG as (H,W,channels) uint8, top row first."""
    img = bpy.data.images.load(path, check_existing=False)
    try:
        w, h = img.size
        buf = np.empty(w * h * 4, dtype=np.float32)
        img.pixels.foreach_get(buf)
        return (buf.reshape(h, w, 4)[::-1, :, :channels] * 255.0 + 0.5).astype(np.uint8)
    finally:
        bpy.data.images.remove(img)


def save_png_rgb(path: str, rgb: np.ndarray) -> None:
    """(H,W,3) uint8 -> PNG (atomic)."""
    h, w = rgb.shape[:2]
    img = bpy.data.images.new("ex4d_png_writer", w, h, alpha=False)
    try:
        rgba = np.ones((h, w, 4), dtype=np.float32)
        rgba[..., :3] = rgb[::-1].astype(np.float32) / 255.0
        img.pixels.foreach_set(rgba.ravel())
        tmp = os.path.join(os.path.dirname(path), f".tmp{os.getpid()}_{os.path.basename(path)}")
        img.filepath_raw = tmp
        img.file_format = "PNG"
        img.save()
        os.replace(tmp, path)
    finally:
        bpy.data.images.remove(img)


class FrameReader:
    """Reads video frames first .. first+count-1 (0-based) at width x height (fill + centre crop) a few
    frames per ``step()`` (so a timer can drive it without freezing the UI); ``frames`` (T,H,W,3) uint8."""

    stage = "reading frames"
    CHUNK = 4

    def __init__(self, filepath: str, first: int, count: int, width: int, height: int):
        self.path = bpy.path.abspath(filepath)
        self.info = probe(self.path)
        if first < 0 or count < 1 or first + count > self.info["frames"]:
            raise errors.VideoError(
                f"frames {first}..{first + count - 1} are outside the video ({self.info['frames']} frames, 0-based)"
            )
        self.first, self.num_frames, self.width, self.height = int(first), int(count), int(width), int(height)
        self.frames = np.empty((count, height, width, 3), dtype=np.uint8)
        self.t = 0
        self._tmp = tempfile.mkdtemp(prefix="ex4d_frames_")
        scene = self._scene = bpy.data.scenes.new("ex4d_reader")
        r = scene.render
        # before adding the strip: its FILL transform is computed from the resolution at creation
        r.resolution_x, r.resolution_y, r.resolution_percentage = self.width, self.height, 100
        se = scene.sequence_editor_create()
        strip = strips(se).new_movie("source", self.path, 1, 1, fit_method="FILL")
        if self.info["pixel_aspect"] != 1.0:
            _show_box(strip, self.info, self.width, self.height)
        r.use_sequencer = True
        r.image_settings.file_format = "PNG"
        r.image_settings.color_mode = "RGB"
        r.image_settings.color_depth = "8"
        r.image_settings.compression = 0
        r.filepath = os.path.join(self._tmp, "f_")
        scene.view_settings.view_transform = "Standard"
        scene.view_settings.look = "None"

    def step(self) -> bool:
        """Read the next few frames; True while frames remain."""
        n = min(self.CHUNK, self.num_frames - self.t)
        if n <= 0:
            return False
        scene = self._scene
        lo = self.first + self.t + 1  # scene frame of video frame first+t (the strip starts at frame 1)
        scene.frame_end = 1_000_000
        scene.frame_start, scene.frame_end = lo, lo + n - 1
        with bpy.context.temp_override(scene=scene):
            bpy.ops.render.render(animation=True, scene=scene.name)
        for i in range(n):
            f = os.path.join(self._tmp, f"f_{lo + i:04d}.png")
            if not os.path.isfile(f):
                raise errors.VideoError(f"{self.path}: Blender could not decode frame {self.first + self.t + i}")
            self.frames[self.t + i] = load_png_rgb(f)
            os.remove(f)
        self.t += n
        return self.t < self.num_frames

    def finish(self) -> None:
        if self._scene is not None:
            bpy.data.scenes.remove(self._scene)
            self._scene = None
        shutil.rmtree(self._tmp, ignore_errors=True)


def _show_box(strip, info: dict, width: int, height: int) -> None:
    """Crop and place the movie strip so the canvas shows exactly the library's crop box (ex4d.fit) of
    the displayed picture, in stored pixels: an anamorphic clip comes in as ``ex4d recon --fit crop``
    reads it (the sequencer's FILL would fill with the squeezed picture). Square-pixel clips keep FILL,
    which gives the same pixels for even sizes; for odd sizes (641x359) Blender leaves a dark first
    column and last row either way."""
    stored_w, h = info["stored_width"], info["height"]
    box = fit.box_in_pixels_of(fit.fit_box(info["width"], h, width, height, "crop"), (info["width"], h), (stored_w, h))
    crop = strip.crop
    crop.min_x, crop.max_x = box.x0, stored_w - box.x0 - box.w
    crop.max_y, crop.min_y = box.y0, h - box.y0 - box.h  # the sequencer's y runs upwards
    t = strip.transform
    t.scale_x, t.scale_y = width / box.w, height / box.h
    t.offset_x = -(box.x0 + box.w / 2 - stored_w / 2) * t.scale_x
    t.offset_y = (box.y0 + box.h / 2 - h / 2) * t.scale_y


def read_frames(filepath: str, first: int, count: int, width: int, height: int) -> np.ndarray:
    """All at once (scripts, and re-reading the shot after a reload)."""
    reader = FrameReader(filepath, first, count, width, height)
    try:
        while reader.step():
            pass
        return reader.frames
    finally:
        reader.finish()


def load_footage_image(filepath: str) -> "bpy.types.Image":
    img = bpy.data.images.load(bpy.path.abspath(filepath), check_existing=True)
    if img.source != "MOVIE":
        img.source = "MOVIE"
    return img
