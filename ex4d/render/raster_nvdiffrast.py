"""nvdiffrast backend (PyPI ``diffrp-nvdiffrast``, CUDA only, NVIDIA Source Code License - optional).

All frames go through ONE instanced ``rasterize`` call (the DW-mesh's topology is shared by every
frame, so pos is (T,V,4) and tri (F,3)). nvdiffrast JIT-builds its CUDA plugin on first use; with
torch >= 2.9 the build succeeds but importing the built module fails (ModuleNotFoundError) because
its build folder is not on sys.path. We put ``torch.utils.cpp_extension._get_build_directory(name,
False)`` on sys.path and retry once (see /work/shared/DEVICE.md).
"""

from __future__ import annotations

import sys

import torch


class NvdiffrastUnavailable(RuntimeError):
    pass


def _import_nvdiffrast():
    try:
        import nvdiffrast.torch as dr
    except Exception as e:  # not installed, or broken install
        raise NvdiffrastUnavailable(f"nvdiffrast is not importable ({type(e).__name__}: {e})") from e
    return dr


def _with_build_dir_retry(fn):
    """Run ``fn``; on the torch>=2.9 plugin import bug, add the plugin's build folder to sys.path and retry."""
    try:
        return fn()
    except ModuleNotFoundError as e:
        name = getattr(e, "name", None) or ""
        if "nvdiffrast" not in name:
            raise
        from torch.utils import cpp_extension

        build_dir = cpp_extension._get_build_directory(name, False)
        if build_dir not in sys.path:
            sys.path.insert(0, build_dir)
        return fn()


class NvdiffrastRasterizer:
    """Same API as :class:`ex4d.render.TorchRasterizer`; construct it to probe CUDA + plugin build."""

    name = "nvdiffrast"

    def __init__(self, device=None):
        if not torch.cuda.is_available():
            raise NvdiffrastUnavailable("nvdiffrast needs CUDA and no CUDA device is available")
        self.dr = _import_nvdiffrast()
        self.device = torch.device(device) if device is not None else torch.device("cuda")
        if self.device.type != "cuda":
            raise NvdiffrastUnavailable(f"nvdiffrast needs a CUDA device, got {self.device}")
        try:
            self.ctx = _with_build_dir_retry(lambda: self.dr.RasterizeCudaContext(device=self.device))
            # Build/load the plugin now (first op), so failures surface here and trigger the fallback.
            pos = torch.tensor([[[-1.0, -1.0, 0.0, 1.0], [1.0, -1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]]], device=self.device)
            tri = torch.tensor([[0, 1, 2]], dtype=torch.int32, device=self.device)
            _with_build_dir_retry(lambda: self.dr.rasterize(self.ctx, pos, tri, (8, 8)))
        except Exception as e:
            raise NvdiffrastUnavailable(f"nvdiffrast failed to start ({type(e).__name__}: {e})") from e

    def rasterize(self, pos_clip: torch.Tensor, tri: torch.Tensor, resolution) -> torch.Tensor:
        pos = pos_clip if pos_clip.ndim == 3 else pos_clip[None]
        pos = pos.to(self.device, torch.float32).contiguous()
        tri = tri.to(self.device, torch.int32).contiguous()
        rast, _ = self.dr.rasterize(self.ctx, pos, tri, (int(resolution[0]), int(resolution[1])), grad_db=False)
        return rast

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
        attr = attr.to(self.device, torch.float32)
        if attr.ndim == 2:  # shared per-vertex data: broadcast along the minibatch axis (instanced mode)
            attr = attr[None]
        attr = attr.contiguous()
        out, _ = self.dr.interpolate(attr, rast, tri.to(self.device, torch.int32).contiguous())
        return out

    def antialias(self, color, rast, pos_clip, tri):
        return self.dr.antialias(color.contiguous(), rast, pos_clip.to(torch.float32).contiguous(),
                                 tri.to(torch.int32).contiguous())
