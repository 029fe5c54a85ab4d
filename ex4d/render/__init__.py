"""Rendering: an nvdiffrast-style functional API with two backends, and the guide renderer.

    rast = rasterize(pos_clip, tri, (H, W))   # (T,H,W,4): b0, b1, z/w, triangle_id + 1 (0 = background)
    out = interpolate(attr, rast, tri)        # attr (T,V,C) or (V,C) -> (T,H,W,C), perspective-correct
    out = antialias(color, rast, pos_clip, tri)

Backends: ``torch`` (a real z-buffer rasterizer, CPU or CUDA, :mod:`.raster_torch`) and
``nvdiffrast`` (CUDA, optional, :mod:`.raster_nvdiffrast`). :func:`get_rasterizer` picks one;
``auto`` = nvdiffrast on CUDA when it works, else torch. Raster row 0 is the image's top row when
clip coordinates come from :func:`projection_matrix` (see :mod:`.projection`).
"""

from __future__ import annotations

import functools
import warnings

import torch

from . import raster_torch
from .guides import Guides, render_guides
from .projection import FAR, NEAR, mvp_matrices, projection_matrix

__all__ = [
    "rasterize", "interpolate", "antialias", "get_rasterizer", "TorchRasterizer", "projection_matrix",
    "mvp_matrices", "render_guides", "Guides", "NEAR", "FAR",
]


class TorchRasterizer:
    """The pure-torch backend. ``antialias`` is the identity (documented: guide masks never depend on it)."""

    name = "torch"

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def rasterize(self, pos_clip: torch.Tensor, tri: torch.Tensor, resolution) -> torch.Tensor:
        return raster_torch.rasterize(pos_clip.to(self.device, torch.float32), tri.to(self.device), resolution)

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
        return raster_torch.interpolate(attr.to(rast.device), rast, tri.to(rast.device))

    def antialias(self, color, rast, pos_clip, tri):
        # No analytic edge anti-aliasing in the torch backend: colours are returned unchanged.
        return color


@functools.lru_cache(maxsize=4)
def _nvdiffrast(device: str):
    from .raster_nvdiffrast import NvdiffrastRasterizer

    return NvdiffrastRasterizer(device)


def get_rasterizer(name: str = "auto", device=None):
    """``"torch"``, ``"nvdiffrast"`` or ``"auto"`` (nvdiffrast on CUDA when it works, else torch).

    When nvdiffrast was asked for (or auto found CUDA) and cannot start, a one-line warning says why
    and the torch backend is returned.
    """
    if name not in ("auto", "torch", "nvdiffrast"):
        from ..errors import InputError

        raise InputError(f"unknown rasterizer '{name}' (auto, torch or nvdiffrast)")
    dev = torch.device(device) if device is not None else None
    if name == "torch":
        return TorchRasterizer(dev)
    cuda_ok = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
    if name == "auto" and not cuda_ok:
        return TorchRasterizer(dev)
    try:
        from .raster_nvdiffrast import NvdiffrastUnavailable

        try:
            return _nvdiffrast(str(dev or "cuda"))
        except NvdiffrastUnavailable:
            raise
        except Exception as e:  # anything else while starting the plugin
            raise NvdiffrastUnavailable(f"{type(e).__name__}: {e}") from e
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        warnings.warn(f"nvdiffrast unavailable, using the torch rasterizer instead: {reason}", stacklevel=2)
        fallback = dev if dev is not None and (dev.type != "cuda" or torch.cuda.is_available()) else None
        return TorchRasterizer(fallback)


def _backend_for(t: torch.Tensor):
    return get_rasterizer("auto", t.device)


def rasterize(pos_clip: torch.Tensor, tri: torch.Tensor, resolution, rasterizer=None) -> torch.Tensor:
    """(T,V,4) clip-space positions, (F,3) int32 triangles -> rast (T,H,W,4). Backend: ``rasterizer`` or auto."""
    rz = rasterizer if rasterizer is not None else _backend_for(pos_clip)
    return rz.rasterize(pos_clip, tri, resolution)


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor, rasterizer=None) -> torch.Tensor:
    rz = rasterizer if rasterizer is not None else _backend_for(rast)
    return rz.interpolate(attr, rast, tri)


def antialias(color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, tri: torch.Tensor, rasterizer=None):
    """nvdiffrast's analytic anti-aliasing; the identity on the torch backend."""
    rz = rasterizer if rasterizer is not None else _backend_for(rast)
    return rz.antialias(color, rast, pos_clip, tri)
