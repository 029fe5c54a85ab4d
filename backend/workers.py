"""What the backend computes: the job handlers and the warm models they share.

:class:`Engine` loads the generator once (``load()``) and runs one job at a time through the handler
registered for its kind (:data:`HANDLERS`). A handler gets the job's params and arrays (read-only numpy
views of the received frames), a ``progress(stage, step, total, preview=None)`` callback and a
``cancel`` event, and returns ``(result params, result arrays)``. Handlers call the same library
functions as the CLI (ex4d.recon / ex4d.pipeline / ex4d.generate), so a backend result equals the
in-process result for the same inputs.

Job kinds (docs/backend.md has the full table):

* ``reconstruct``: frames (+ depth) -> depth, vertices, faces, uv, face_valid, K
* ``render``: DW-mesh arrays + frames + cameras -> color, mask
* ``generate``: color + mask -> frames
* ``shot``: frames (+ depth) + cameras or a preset -> color, mask, c2w, K (+ frames when generated)
* ``echo``: diagnostics - the arrays come back unchanged (transport benchmarks, health checks)
"""

from __future__ import annotations

import gc
import inspect
import math
import os
import re
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

from ex4d.errors import Cancelled, InputError, OutOfMemoryError

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")  # names from clients select, never locate
Handler = Callable[["Engine", dict, dict, Callable, Any], tuple[dict, dict]]
HANDLERS: dict[str, Handler] = {}


def handler(kind: str):
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn

    return register


# --------------------------------------------------------------------------------------------------
# Input checks (run at submit time too, so a bad job is refused before it queues)
# --------------------------------------------------------------------------------------------------


def need(arrays: Mapping[str, np.ndarray], name: str, dtype, ndim: int, tail: tuple = (), optional: bool = False):
    a = arrays.get(name)
    if a is None:
        if optional:
            return None
        raise InputError(f"missing array '{name}'")
    if a.dtype != np.dtype(dtype):
        raise InputError(f"array '{name}' must be {np.dtype(dtype).name}, got {a.dtype.name}")
    if a.ndim != ndim or (tail and tuple(a.shape[ndim - len(tail):]) != tail):
        want = "(" + ",".join(["N"] * (ndim - len(tail)) + [str(t) for t in tail]) + ")"
        raise InputError(f"array '{name}' must have shape {want}, got {tuple(a.shape)}")
    return a


def _float(arrays, name, ndim, tail=(), optional=False):
    """Float arrays may come as float32 or float64."""
    a = arrays.get(name)
    if a is None:
        if optional:
            return None
        raise InputError(f"missing array '{name}'")
    if a.dtype not in (np.float32, np.float64):
        raise InputError(f"array '{name}' must be float32 or float64, got {a.dtype.name}")
    return need(arrays, name, a.dtype, ndim, tail)


def _frames(arrays, name="frames"):
    f = need(arrays, name, np.uint8, 4, (3,))
    if min(f.shape[:3]) < 1:
        raise InputError(f"array '{name}' is empty")
    return f


def _same_video(frames, other, name):
    if other is not None and tuple(other.shape[:3]) != tuple(frames.shape[:3]):
        raise InputError(f"array '{name}' {tuple(other.shape)} does not match frames {tuple(frames.shape[:3])}")


def _intrinsics(params: dict, width: int, height: int, arrays=None, file_K=None):
    from ex4d.camera import Intrinsics, resolve_intrinsics

    K = params.get("K")
    if K is None and arrays is not None and "K" in arrays and arrays["K"].shape == (3, 3):
        K = arrays["K"]
    if K is not None:
        return Intrinsics.from_K(np.asarray(K, dtype=np.float64), width, height), "client K"
    return resolve_intrinsics(width, height, focal_px=params.get("focal"), fov_deg=params.get("fov"), file_K=file_K)


def check_job(kind: str, params: dict, arrays: Mapping[str, np.ndarray]) -> None:
    """Cheap shape/dtype checks of a submitted job (no compute). Raises InputError."""
    if kind not in HANDLERS:
        raise InputError(f"unknown job kind '{kind}' (one of {', '.join(HANDLERS)})")
    if not isinstance(params, dict):
        raise InputError("params must be a JSON object")
    if kind in ("reconstruct", "shot"):
        f = _frames(arrays)
        d = _float(arrays, "depth", 3, optional=True)
        _same_video(f, d, "depth")
        if d is None and not params.get("depth_model"):
            raise InputError("no depth: send a 'depth' array (T,H,W) or name a 'depth_model' in params")
        if d is None and not _PLAIN_NAME.match(str(params["depth_model"])):
            raise InputError("depth_model must be a model name (letters, digits, '-', '_', '.')")
    if kind == "render":
        f = _frames(arrays)
        v = _float(arrays, "vertices", 3, (3,))
        need(arrays, "faces", np.int32, 2, (3,))
        _float(arrays, "uv", 2, (2,))
        need(arrays, "face_valid", np.bool_, 2)
        c2w = _float(arrays, "c2w", 3, (4, 4))
        if len(c2w) < len(f) or len(v) != len(f):
            raise InputError(f"render needs one mesh frame and one camera per video frame ({len(f)} frames, "
                             f"{len(v)} mesh frames, {len(c2w)} cameras)")
    if kind == "shot" and "c2w" in arrays:
        _float(arrays, "c2w", 3, (4, 4))
    if kind == "generate":
        c = need(arrays, "color", np.uint8, 4, (3,))
        m = need(arrays, "mask", np.bool_, 3)
        _same_video(c, m, "mask")


# --------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------


class Engine:
    """The warm state of the service: device, generator, depth models. One job at a time."""

    def __init__(self, generator: str = "tiny", models_dir: str | os.PathLike | None = None, device: str = "auto",
                 memory_mode: str | None = None, depth_weights: str | os.PathLike | None = None,
                 renderer: str = "auto", gpus: int = 1, speed: str = "fast", vram_limit_gb: float | None = None,
                 preview_cache: float = 0.0):
        self.generator_name = generator
        self.models_dir = models_dir
        self.device_name = device
        self.memory_mode = memory_mode
        self.speed = speed
        self.vram_limit_gb = vram_limit_gb
        self.preview_cache = preview_cache
        self.depth_weights = depth_weights
        self.renderer = renderer
        self.gpus = int(gpus)
        self.generator = None
        self.device = None
        self._depth_models: dict[str, Any] = {}
        self.load_seconds = 0.0

    def load(self) -> None:
        """Pick the device and load the generator once (the service then stays warm).

        torch is imported only when needed here (a CPU service without a generator starts in a second);
        the geometry handlers import it on their first job.
        """
        t0 = time.perf_counter()
        if self.device_name == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = str(self.device_name)
        if self.generator_name and self.generator_name != "none":
            from ex4d.generate import load_generator

            kwargs: dict[str, Any] = {"models_dir": self.models_dir, "device": self.device, "speed": self.speed,
                                      "preview_cache": self.preview_cache or 0.0}
            if self.memory_mode:
                kwargs["memory_mode"] = self.memory_mode
            if self.vram_limit_gb is not None:
                kwargs["vram_limit_gb"] = self.vram_limit_gb
            self.generator = load_generator(self.generator_name, **kwargs)
        self.load_seconds = time.perf_counter() - t0

    def capabilities(self) -> dict:
        gpus = []
        if self.device != "cpu" or "torch" in sys.modules:
            import torch

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
        return {
            "generator": self.generator_name,
            "generators": ["tiny", "draft", "ex4d"],
            "device": str(self.device),
            "devices": ["cpu"] + [f"cuda:{g['index']}" for g in gpus],
            "gpus": gpus,
            "parallel_gpus": self.gpus,
            "kinds": sorted(HANDLERS),
            "memory_mode": self.memory_mode,
            "speed": self.speed,
            "preview_cache": self.preview_cache,
            "generation": self.generator.info() if hasattr(self.generator, "info") else None,
            "renderer": self.renderer,
            "load_seconds": round(self.load_seconds, 2),
        }

    def depth_model(self, name: str):
        if name not in self._depth_models:
            from ex4d.depth.models import load_depth_model

            if self.depth_weights is None:
                raise InputError(f"depth model '{name}' needs the backend to run with --depth-weights DIR")
            self._depth_models[name] = load_depth_model(name, self.depth_weights, self.device)
        return self._depth_models[name]

    def run(self, kind: str, params: dict, arrays: dict, progress: Callable, cancel) -> tuple[dict, dict]:
        check_job(kind, params, arrays)
        try:
            return HANDLERS[kind](self, params, arrays, progress, cancel)
        except Exception as e:
            if _is_oom(e):
                raise OutOfMemoryError(
                    f"GPU out of memory while running {kind}: use fewer or smaller frames, or restart the "
                    "backend with --memory-mode stream (and --vram-limit GB below the card's free memory)"
                ) from None
            raise

    def free_memory(self, full: bool = False) -> None:
        """Return GPU memory between jobs. A full garbage collection (0.5 s with diffsynth loaded) only after
        a failure or cancel, where frames and exceptions may hold tensors in reference cycles."""
        gc.collect() if full else gc.collect(0)
        torch = sys.modules.get("torch")  # never import it just for this
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def preview_option(self, params: dict) -> dict:
        """A job's ``preview_cache`` threshold (0 = off), for generators that take one."""
        if params.get("preview_cache") is None or self.generator is None:
            return {}
        if "preview_cache" not in inspect.signature(self.generator.generate).parameters:
            raise InputError("this backend's generator has no preview cache")
        try:
            value = float(params["preview_cache"])
        except (TypeError, ValueError):
            raise InputError(f"preview_cache must be a number >= 0, got {params['preview_cache']!r}") from None
        return {"preview_cache": value}

    def last_generation(self) -> dict | None:
        """What the latest generation skipped (preview cache), for the job's result."""
        run = getattr(self.generator, "last_run", None) or {}
        return run.get("preview_cache")

    def generate(self, color, mask, params, progress, cancel) -> np.ndarray:
        if self.generator is None:
            raise InputError("this backend runs without a generator (started with --generator none)")
        kwargs = dict(prompt=params.get("prompt"), seed=int(params.get("seed", 0)), steps=params.get("steps"),
                      progress=progress, cancel=cancel)
        if params.get("cfg") is not None and "cfg" in inspect.signature(self.generator.generate).parameters:
            kwargs["cfg"] = float(params["cfg"])
        kwargs.update(self.preview_option(params))
        out = np.asarray(self.generator.generate(np.ascontiguousarray(color), np.ascontiguousarray(mask), **kwargs))
        if out.dtype != np.uint8 or out.ndim != 4 or out.shape[-1] != 3:
            raise InputError(f"generator returned {out.dtype} {out.shape}, expected uint8 (T,H,W,3)")
        return out


def _is_oom(e: BaseException) -> bool:
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(e, (RuntimeError, MemoryError)) and ("out of memory" in str(e).lower() or isinstance(e, MemoryError))


def _np(x) -> np.ndarray:
    """torch tensor or array -> numpy (on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")


# --------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------


def _depth_for(engine: Engine, params: dict, arrays: dict, frames: np.ndarray, progress) -> np.ndarray:
    depth = arrays.get("depth")
    if depth is not None:
        from ex4d.depth.files import check_depth

        return check_depth(np.asarray(depth, dtype=np.float32), len(frames), frames.shape[1:3], source="depth array")
    from ex4d.depth.files import check_depth, fit_depth

    model = engine.depth_model(str(params["depth_model"]))
    progress("depth", 0, 1)
    d = np.asarray(model.predict(frames), dtype=np.float32)
    progress("depth", 1, 1)
    T, H, W = frames.shape[:3]
    if d.ndim == 3 and d.shape[1:] != (H, W):
        d = fit_depth(d, (d.shape[2], d.shape[1]), W, H, "resize")
    return check_depth(d, T, (H, W), source=f"depth model {params['depth_model']}")


def mesh_arrays(mesh) -> dict[str, np.ndarray]:
    """A DW-mesh as the arrays of a ``reconstruct`` result (the four DESIGN.md arrays + the two extras the
    renderer uses, so that a ``render`` job given them back renders exactly what the library renders)."""
    out = {
        "vertices": _np(mesh.vertices).astype(np.float32, copy=False),
        "faces": _np(mesh.faces).astype(np.int32, copy=False),
        "uv": _np(mesh.uv).astype(np.float32, copy=False),
        "face_valid": _np(mesh.face_valid).astype(np.bool_, copy=False),
    }
    for name, dtype in (("vertex_alpha", np.float32), ("vertex_pixel", np.int64)):
        value = getattr(mesh, name, None)
        if value is not None:
            out[name] = _np(value).astype(dtype, copy=False)
    return out


def mesh_from_arrays(arrays: Mapping[str, np.ndarray], params: dict, size: tuple[int, int], source_K: np.ndarray):
    """The DW-mesh object the renderer takes, from ``render`` job arrays.

    Optional arrays: ``vertex_alpha`` (T,V) float or ``vertex_valid`` (T,V)/(V,) bool (default all ones),
    ``vertex_pixel`` (V,) (default: the source pixel under each vertex's uv), ``source_K`` (3,3)/(T,3,3)
    (default: the first camera's K).
    """
    import torch

    from ex4d.dwmesh import DWMesh, DWMeshConfig

    H, W = size
    verts = np.asarray(arrays["vertices"], dtype=np.float32)
    T, V = verts.shape[:2]
    faces = np.asarray(arrays["faces"])
    uv = np.asarray(arrays["uv"], dtype=np.float32)
    face_valid = np.asarray(arrays["face_valid"])
    if uv.shape != (V, 2):
        raise InputError(f"uv must be (V,2) with V={V}, got {uv.shape}")
    if face_valid.shape != (T, len(faces)):
        raise InputError(f"face_valid must be (T,F) = {(T, len(faces))}, got {face_valid.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= V):
        raise InputError(f"faces index vertices outside 0..{V - 1}")
    if not np.isfinite(verts).all():
        raise InputError("vertices contain NaN or infinite values")
    if "vertex_alpha" in arrays:
        alpha = np.asarray(arrays["vertex_alpha"], dtype=np.float32)
    elif "vertex_valid" in arrays:
        alpha = np.broadcast_to(np.asarray(arrays["vertex_valid"], dtype=np.float32), (T, V))
    else:
        alpha = np.ones((T, V), np.float32)
    if alpha.shape != (T, V):
        raise InputError(f"vertex_alpha / vertex_valid must be (T,V) = {(T, V)}, got {alpha.shape}")
    if "vertex_pixel" in arrays:
        vpix = np.asarray(arrays["vertex_pixel"], dtype=np.int64)
        if vpix.shape != (V,) or (vpix.size and (vpix.min() < 0 or vpix.max() >= H * W)):
            raise InputError(f"vertex_pixel must be (V,) indices below {H * W}")
    else:  # the pixel whose centre the uv points at (u = x/W, v = 1 - y/H)
        col = np.clip(np.round(uv[:, 0] * W - 0.5), 0, W - 1).astype(np.int64)
        row = np.clip(np.round((1.0 - uv[:, 1]) * H - 0.5), 0, H - 1).astype(np.int64)
        vpix = row * W + col
    K = np.asarray(arrays["source_K"] if "source_K" in arrays else source_K, dtype=np.float64)
    K = np.broadcast_to(K, (T, 3, 3)).copy() if K.shape == (3, 3) else K
    if K.shape != (T, 3, 3):
        raise InputError(f"source_K must be (3,3) or (T,3,3), got {K.shape}")
    return DWMesh(
        vertices=torch.from_numpy(verts.copy()),
        faces=torch.from_numpy(faces.astype(np.int32)),
        uv=torch.from_numpy(uv.copy()),
        face_valid=torch.from_numpy(face_valid.astype(np.bool_)),
        vertex_alpha=torch.from_numpy(np.ascontiguousarray(alpha)),
        vertex_pixel=torch.from_numpy(vpix),
        size=(H, W),
        K=K,
        config=DWMeshConfig(method=params.get("mesh_method", "ours")),
        **_clip_params(params, verts, (H, W)),
    )


def _clip_params(params: dict, verts: np.ndarray, size: tuple[int, int]) -> dict:
    """``scene_scale`` and ``clip_far`` as a reconstruct result gave them to the client, when it sends
    them back; else read off the vertices (a mesh from elsewhere)."""
    from ex4d.dwmesh import vertex_clip

    given = {}
    for key in ("scene_scale", "clip_far"):
        value = params.get(key)
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{key} must be a number, got {value!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"{key} must be positive and finite, got {value}")
        given[key] = value
    if "scene_scale" not in given:
        given["scene_scale"], far = vertex_clip(verts, size)
        given.setdefault("clip_far", far)
    return given


@handler("reconstruct")
def run_reconstruct(engine: Engine, params: dict, arrays: dict, progress, cancel):
    from ex4d.recon import reconstruct

    frames = np.ascontiguousarray(arrays["frames"])
    T, H, W = frames.shape[:3]
    depth = _depth_for(engine, params, arrays, frames, progress)
    intr, source = _intrinsics(params, W, H)
    mesh = reconstruct(frames, depth, intr, method=params.get("mesh_method", "ours"), device=engine.device,
                       progress=progress, cancel=cancel)
    out = mesh_arrays(mesh)
    out["depth"] = depth
    out["K"] = intr.K
    return {"K": intr.K.tolist(), "intrinsics_source": source, "width": W, "height": H,
            "scene_scale": float(mesh.scene_scale), "clip_far": float(mesh.clip_planes[1])}, out


def _camera_path(params: dict, arrays: dict, frames: np.ndarray, intr, depth0=None):
    from ex4d.camera import CameraPath

    T, H, W = frames.shape[:3]
    if "c2w" in arrays:
        K = arrays.get("K")
        K = intr.K if K is None else np.asarray(K, dtype=np.float64)
        width, height = int(params.get("width", W)), int(params.get("height", H))
        path = CameraPath(np.asarray(arrays["c2w"], dtype=np.float64), K, width, height, name=str(params.get("name", "path")))
        from ex4d.recon import check_path_for_video

        return check_path_for_video(path, T, W, H)
    from ex4d.pipeline import make_camera_path

    return make_camera_path(T, intr, depth0, cam=params.get("cam"), angle=params.get("angle"),
                            pivot=params.get("pivot") or "median", distance=params.get("distance"),
                            easing=params.get("easing", "linear"))


@handler("render")
def run_render(engine: Engine, params: dict, arrays: dict, progress, cancel):
    from ex4d.camera import Intrinsics
    from ex4d.recon import render_path

    frames = np.ascontiguousarray(arrays["frames"])
    T, H, W = frames.shape[:3]
    K = arrays.get("K")
    if K is None:
        if "K" not in params:
            raise InputError("render needs the cameras' intrinsics: a 'K' array (T,3,3) or (3,3)")
        K = np.asarray(params["K"], dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    intr = Intrinsics.from_K(K if K.ndim == 2 else K[0], int(params.get("width", W)), int(params.get("height", H)))
    path = _camera_path(params, arrays, frames, intr)
    mesh = mesh_from_arrays(arrays, params, (H, W), path.K[0])
    guides = render_path(mesh, frames, path, rasterizer=params.get("renderer", engine.renderer), device=engine.device,
                         progress=progress, cancel=cancel)
    return {"width": W, "height": H}, {"color": _np(guides.color), "mask": _np(guides.mask)}


@handler("generate")
def run_generate(engine: Engine, params: dict, arrays: dict, progress, cancel):
    out = engine.generate(arrays["color"], arrays["mask"], params, progress, cancel)
    info = {"generator": engine.generator_name, "seed": int(params.get("seed", 0))}
    if engine.last_generation():
        info["preview_cache"] = engine.last_generation()
    return info, {"frames": out}


@handler("echo")
def run_echo(engine: Engine, params: dict, arrays: dict, progress, cancel):
    """Diagnostics: returns the arrays unchanged after ``steps`` steps of ``step_seconds`` (bench, health checks)."""
    steps = max(0, min(int(params.get("steps", 0)), 10_000))
    pause = max(0.0, min(float(params.get("step_seconds", 0.0)), 10.0))
    for i in range(steps):
        progress("echo", i, steps)
        if cancel is not None and cancel.wait(pause):
            raise Cancelled("cancelled")
    progress("echo", steps, steps)
    return {"steps": steps}, {k: np.asarray(v) for k, v in arrays.items()}


@handler("shot")
def run_shot_job(engine: Engine, params: dict, arrays: dict, progress, cancel):
    from ex4d.pipeline import run_shot

    frames = np.ascontiguousarray(arrays["frames"])
    T, H, W = frames.shape[:3]
    depth = _depth_for(engine, params, arrays, frames, progress)
    intr, source = _intrinsics(params, W, H)
    path = _camera_path(params, arrays, frames, intr, depth0=depth[0])
    want_video = bool(params.get("generate", True))
    if want_video and engine.generator is None:
        raise InputError("this backend runs without a generator; send generate=false for guides only")
    result = run_shot(frames, depth, intr, path, mesh_method=params.get("mesh_method", "ours"),
                      renderer=params.get("renderer", engine.renderer), device=engine.device,
                      generator=engine.generator if want_video else None, prompt=params.get("prompt"),
                      seed=int(params.get("seed", 0)), steps=params.get("steps"), progress=progress, cancel=cancel,
                      **(engine.preview_option(params) if want_video else {}))
    out = {"color": _np(result.guides.color), "mask": _np(result.guides.mask), "c2w": result.path.c2w, "K": result.path.K}
    if result.video is not None:
        out["frames"] = result.video
    info = {"name": result.path.name, "width": W, "height": H, "intrinsics_source": source,
            "generated": result.video is not None, "generator": engine.generator_name if want_video else None,
            "path_meta": dict(result.path.meta)}
    if result.video is not None and engine.last_generation():
        info["preview_cache"] = engine.last_generation()
    return info, out
