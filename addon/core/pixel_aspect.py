"""The pixel aspect of a movie file's video track, read from its container (pure Python, no bpy).

Blender's movie reader ignores the sample aspect ratio: an anamorphic clip (stored 1440x1080 with
4:3 pixels, shown 1920x1080) would come in squeezed, unlike in players and in the ex4d library. MP4
and QuickTime files record it in the video sample entry's ``pasp`` box (ISO/IEC 14496-12 12.1.4), so
the add-on reads that box and stretches the frames itself. Other containers give 1 (square pixels).
"""

from __future__ import annotations

import os
import struct
from fractions import Fraction

_SAMPLE_ENTRY_HEADER = 8 + 70  # SampleEntry (reserved, data_reference_index) + VisualSampleEntry fields


def _boxes(f, start: int, end: int):
    """(type, payload start, box end) of each box in [start, end) of the open file ``f``."""
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        size, kind = struct.unpack(">I4s", f.read(8))
        header = 8
        if size == 1:  # 64-bit size follows
            size = struct.unpack(">Q", f.read(8))[0]
            header = 16
        elif size == 0:  # to the end of the enclosing box
            size = end - pos
        if size < header or pos + size > end:
            return  # damaged: stop rather than guess
        yield kind, pos + header, pos + size
        pos += size


def _child(f, start: int, end: int, kind: bytes):
    return next(((s, e) for k, s, e in _boxes(f, start, end) if k == kind), None)


def _video_track_aspect(f, trak: tuple[int, int]) -> Fraction | None:
    mdia = _child(f, *trak, b"mdia")
    if mdia is None:
        return None
    hdlr = _child(f, *mdia, b"hdlr")
    if hdlr is None:
        return None
    f.seek(hdlr[0] + 8)  # version/flags, pre_defined
    if f.read(4) != b"vide":
        return None
    box = mdia
    for kind in (b"minf", b"stbl", b"stsd"):
        box = _child(f, *box, kind)
        if box is None:
            return None
    f.seek(box[0] + 4)  # version/flags
    if struct.unpack(">I", f.read(4))[0] < 1:
        return None
    entry = next(iter(_boxes(f, box[0] + 8, box[1])), None)
    if entry is None:
        return None
    pasp = _child(f, entry[1] + _SAMPLE_ENTRY_HEADER, entry[2], b"pasp")
    if pasp is None or pasp[1] - pasp[0] < 8:
        return Fraction(1)
    f.seek(pasp[0])
    h, v = struct.unpack(">II", f.read(8))
    return Fraction(h, v) if h > 0 and v > 0 else Fraction(1)


def read_pixel_aspect(path: str | os.PathLike) -> Fraction:
    """Width / height of one stored pixel of the first video track (1 when the file does not say,
    is not MP4/QuickTime, or cannot be read)."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            moov = _child(f, 0, end, b"moov")
            if moov is None:
                return Fraction(1)
            for kind, start, stop in _boxes(f, *moov):
                if kind == b"trak":
                    aspect = _video_track_aspect(f, (start, stop))
                    if aspect is not None:
                        return aspect
    except (OSError, struct.error):
        pass
    return Fraction(1)
