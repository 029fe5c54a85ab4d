"""Send to Timeline: the generated shot (a PNG sequence) as a strip in the Video Sequencer."""

import os

import bpy

from .video import strips


def free_channel(se, frame_start: int, frame_end: int, lowest: int = 1) -> int:
    """The lowest channel with no strip overlapping [frame_start, frame_end]."""
    used = {s.channel for s in strips(se) if s.frame_final_start <= frame_end and s.frame_final_end > frame_start}
    ch = lowest
    while ch in used:
        ch += 1
    return ch


def add_image_sequence(scene, name: str, folder: str, prefix: str, num_frames: int, frame_start: int, channel: int | None = None):
    se = scene.sequence_editor or scene.sequence_editor_create()
    files = [f"{prefix}{t + 1:04d}.png" for t in range(num_frames)]
    for f in files:
        if not os.path.isfile(os.path.join(folder, f)):
            from ..core import errors

            raise errors.InputError(f"{os.path.join(folder, f)} is missing: generate the shot again")
    ch = channel or free_channel(se, frame_start, frame_start + num_frames - 1)
    strip = strips(se).new_image(name, os.path.join(folder, files[0]), ch, frame_start, fit_method="FIT")
    for f in files[1:]:
        strip.elements.append(f)
    strip.frame_final_duration = num_frames
    return strip


def add_movie(scene, name: str, filepath: str, first_frame: int, num_frames: int, frame_start: int, channel: int | None = None):
    """The source clip, trimmed to the shot (video frame first at scene frame start)."""
    se = scene.sequence_editor or scene.sequence_editor_create()
    ch = channel or free_channel(se, frame_start, frame_start + num_frames - 1)
    strip = strips(se).new_movie(name, bpy.path.abspath(filepath), ch, frame_start - first_frame, fit_method="FIT")
    strip.frame_offset_start = first_frame
    strip.frame_final_duration = num_frames
    return strip
