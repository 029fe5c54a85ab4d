"""Which region of a picture becomes the working image: the one rule for frames, depth, intrinsics and
the Blender add-on's frame reader (pure Python, so ``ex4d addon build`` bundles it)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

FIT_MODES = ("resize", "crop")


@dataclass(frozen=True)
class FitBox:
    """Source region (x0, y0, w, h) in source pixels that is scaled to (width, height).

    ``resize`` uses the whole image (the aspect ratio may change, as EX-4D's stretch to 512x512 does);
    ``crop`` takes the largest centred region with the target's aspect ratio, then scales it.
    """

    x0: int
    y0: int
    w: int
    h: int
    width: int
    height: int

    @property
    def is_identity(self) -> bool:
        return self.x0 == 0 and self.y0 == 0 and (self.w, self.h) == (self.width, self.height)


def fit_box(src_width: int, src_height: int, width: int, height: int, mode: str = "resize") -> FitBox:
    if mode not in FIT_MODES:
        raise InputError(f"unknown fit mode '{mode}' (resize or crop)")
    if width < 1 or height < 1:
        raise InputError(f"working size must be positive, got {width}x{height}")
    if mode == "resize":
        return FitBox(0, 0, src_width, src_height, width, height)
    target = width / height
    if src_width / src_height > target:  # source wider: trim the sides
        w = min(src_width, max(1, round(src_height * target)))
        return FitBox((src_width - w) // 2, 0, w, src_height, width, height)
    h = min(src_height, max(1, round(src_width / target)))
    return FitBox(0, (src_height - h) // 2, src_width, h, width, height)


def box_in_pixels_of(box: FitBox, size: tuple[int, int], other: tuple[int, int]) -> FitBox:
    """``box`` for an image of ``size`` = (w, h), expressed in the pixels of an ``other``-sized image
    of the same picture (depth at another resolution, non-square stored pixels), rounded to whole pixels."""
    if tuple(size) == tuple(other):
        return box
    (vw, vh), (w, h) = size, other
    sx, sy = w / vw, h / vh
    x0, y0 = round(box.x0 * sx), round(box.y0 * sy)
    return FitBox(x0, y0, max(1, min(w - x0, round(box.w * sx))), max(1, min(h - y0, round(box.h * sy))), box.width, box.height)
