"""Synthetic scenes with exact ground truth, rendered by ray casting (numpy).

A scene is a textured room (floor, back and side walls, ceiling, a wall behind the camera), some
spheres and boxes, some of them moving over the clip. The source camera is the identity (our world
= the source camera, OpenGL axes) at every frame. For any camera we get, exactly:

* the colour and the z-depth each pixel centre sees (``Scene.render``),
* the source video and its depth (``Scene.source``),
* for a CameraPath: the target views and the ground-truth map "this target pixel's surface point is
  visible from the source camera at that frame" - inside the source frame and unoccluded
  (``Scene.target_views``).

Everything is deterministic from the seed; ``make_scene(seed)`` varies the layout, the focal length
and the textures, so methods are not tuned to one scene. ``make_example`` writes a small example
clip (mp4 + depth.npz with K).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Textures: smooth procedural patterns (periods of several pixels, so resampling error is not the story)
# --------------------------------------------------------------------------------------------------


@dataclass
class Texture:
    base: np.ndarray  # (3,) in [0,1]
    accent: np.ndarray  # (3,)
    periods: tuple[float, float]  # world units along the surface's two axes
    phase: float = 0.0
    kind: int = 0  # 0 = soft checker, 1 = stripes + dots

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        pa, pb = self.periods
        sa, sb = np.sin(2 * np.pi * a / pa + self.phase), np.sin(2 * np.pi * b / pb + 0.5 * self.phase)
        if self.kind == 0:
            m = 0.5 + 0.5 * np.tanh(3.0 * sa * sb)
        else:
            m = 0.5 + 0.25 * np.tanh(3.0 * sa) + 0.25 * np.cos(2 * np.pi * (a / (2.3 * pa) + b / (1.7 * pb)))
        return self.base[None] * (1.0 - m[:, None]) + self.accent[None] * m[:, None]


def _random_texture(rng: np.random.Generator, scale: float) -> Texture:
    base = rng.uniform(0.1, 0.9, 3)
    accent = np.clip(base + rng.uniform(-0.6, 0.6, 3), 0.02, 0.98)
    return Texture(base, accent, (scale * rng.uniform(0.7, 1.4), scale * rng.uniform(0.7, 1.4)),
                   float(rng.uniform(0, 2 * np.pi)), int(rng.integers(0, 2)))


# --------------------------------------------------------------------------------------------------
# Primitives (ray casting; rays o + t d with d's camera-z component -1, so t is the camera's z-depth)
# --------------------------------------------------------------------------------------------------


@dataclass
class Plane:
    normal: np.ndarray  # unit, pointing into the room
    offset: float  # points p with normal . p + offset = 0
    u_axis: np.ndarray
    texture: Texture

    def at(self, tau: float) -> "Plane":
        return self

    def intersect(self, o, d):
        den = d @ self.normal
        num = -(o @ self.normal + self.offset)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = num / den
        return np.where((np.abs(den) > 1e-12) & (t > _EPS), t, np.inf)

    def shade(self, p):
        v_axis = np.cross(self.normal, self.u_axis)
        return self.texture(p @ self.u_axis, p @ v_axis)


@dataclass
class Sphere:
    center: np.ndarray
    radius: float
    texture: Texture
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(3))
    spin: float = 0.0  # radians over the clip, about y

    def at(self, tau: float) -> "Sphere":
        return Sphere(self.center + self.velocity * tau, self.radius, self.texture, np.zeros(3), self.spin * tau)

    def intersect(self, o, d):
        oc = o - self.center
        a = (d * d).sum(-1)
        b = 2.0 * (d @ oc) if oc.ndim == 1 else 2.0 * (d * oc).sum(-1)
        c = oc @ oc - self.radius**2 if oc.ndim == 1 else (oc * oc).sum(-1) - self.radius**2
        disc = b * b - 4 * a * c
        sq = np.sqrt(np.maximum(disc, 0.0))
        t0 = (-b - sq) / (2 * a)
        t1 = (-b + sq) / (2 * a)
        t = np.where(t0 > _EPS, t0, np.where(t1 > _EPS, t1, np.inf))
        return np.where(disc >= 0, t, np.inf)

    def shade(self, p):
        q = (p - self.center) / self.radius
        lon = np.arctan2(q[:, 0], q[:, 2]) + self.spin
        return self.texture(lon * self.radius, q[:, 1] * self.radius)


@dataclass
class Box:
    center: np.ndarray
    half: np.ndarray  # half extents (3,)
    yaw: float  # rotation about y
    texture: Texture
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(3))
    yaw_speed: float = 0.0

    def at(self, tau: float) -> "Box":
        return Box(self.center + self.velocity * tau, self.half, self.yaw + self.yaw_speed * tau, self.texture)

    def _R(self):
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])

    def intersect(self, o, d):
        R = self._R()
        ol = (o - self.center) @ R
        dl = d @ R
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / np.where(np.abs(dl) < 1e-12, 1e-12, dl)
            t1 = (-self.half - ol) * inv
            t2 = (self.half - ol) * inv
        tmin = np.minimum(t1, t2).max(-1)
        tmax = np.maximum(t1, t2).min(-1)
        return np.where((tmax >= tmin) & (tmin > _EPS), tmin, np.inf)

    def shade(self, p):
        R = self._R()
        pl = (p - self.center) @ R
        rel = np.abs(pl) / self.half
        axis = rel.argmax(-1)  # the face's normal axis
        a = np.where(axis == 0, pl[:, 2], pl[:, 0])
        b = np.where(axis == 1, pl[:, 2], pl[:, 1])
        return self.texture(a + 3.1 * axis, b)


# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------


@dataclass
class View:
    color: np.ndarray  # (H,W,3) uint8
    depth: np.ndarray  # (H,W) float32 z-depth in that camera (inf where nothing is hit)
    points: np.ndarray  # (H,W,3) world points
    hit: np.ndarray  # (H,W) bool


def camera_rays(c2w: np.ndarray, K: np.ndarray, width: int, height: int):
    """Origins (3,) and directions (H*W,3) through pixel centres; a direction's camera-z component is -1."""
    xs, ys = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    d_cam = np.stack([(xs - K[0, 2]) / K[0, 0], -(ys - K[1, 2]) / K[1, 1], -np.ones_like(xs)], -1).reshape(-1, 3)
    return c2w[:3, 3].copy(), d_cam @ c2w[:3, :3].T


@dataclass
class Scene:
    primitives: list
    K: np.ndarray  # source intrinsics (3,3)
    width: int
    height: int
    num_frames: int
    seed: int = 0
    name: str = "scene"

    def _tau(self, t: int) -> float:
        return t / max(self.num_frames - 1, 1)

    def cast(self, o, d, t: int):
        """First hit of rays (o, d) at frame t: (distance along d, primitive index)."""
        prims = [p.at(self._tau(t)) for p in self.primitives]
        ts = np.stack([p.intersect(o, d) for p in prims], 0)
        idx = ts.argmin(0)
        return ts[idx, np.arange(ts.shape[1])], idx, prims

    def render(self, c2w: np.ndarray, K: np.ndarray, width: int, height: int, t: int) -> View:
        o, d = camera_rays(np.asarray(c2w, float), np.asarray(K, float), width, height)
        tt, idx, prims = self.cast(o, d, t)
        hit = np.isfinite(tt)
        p = o + d * np.where(hit, tt, 0.0)[:, None]
        col = np.zeros((d.shape[0], 3))
        for i, prim in enumerate(prims):
            sel = hit & (idx == i)
            if sel.any():
                col[sel] = prim.shade(p[sel])
        color = np.clip(np.round(col * 255.0), 0, 255).astype(np.uint8).reshape(height, width, 3)
        return View(color, np.where(hit, tt, np.inf).astype(np.float32).reshape(height, width),
                    p.reshape(height, width, 3), hit.reshape(height, width))

    def source(self):
        """The source video (T,H,W,3) uint8 and its exact z-depth (T,H,W) float32 (identity camera)."""
        views = [self.render(np.eye(4), self.K, self.width, self.height, t) for t in range(self.num_frames)]
        return np.stack([v.color for v in views]), np.stack([v.depth for v in views])

    def visible_from_source(self, points: np.ndarray, t: int, hit: np.ndarray | None = None) -> np.ndarray:
        """Is each world point (...,3) seen by the source camera at frame t (inside its frame, unoccluded)?"""
        shape = points.shape[:-1]
        p = points.reshape(-1, 3)
        z = -p[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            x = self.K[0, 2] + self.K[0, 0] * p[:, 0] / z
            y = self.K[1, 2] - self.K[1, 1] * p[:, 1] / z
        inside = (z > 1e-6) & (x >= 0) & (x < self.width) & (y >= 0) & (y < self.height)
        vis = np.zeros(p.shape[0], bool)
        sel = np.nonzero(inside)[0]
        if sel.size:
            d = p[sel] / z[sel, None]  # camera-z component -1
            tt, _, _ = self.cast(np.zeros(3), d, t)
            vis[sel] = tt >= z[sel] * (1.0 - 1e-5) - 1e-6
        if hit is not None:
            vis &= hit.reshape(-1)
        return vis.reshape(shape)

    def target_views(self, path):
        """Exact target views along ``path`` (camera i at frame i): colour (T,H,W,3), visible (T,H,W), depth."""
        T = min(len(path), self.num_frames)
        cols, vis, deps = [], [], []
        for t in range(T):
            v = self.render(path.c2w[t], path.K[t], path.width, path.height, t)
            cols.append(v.color)
            vis.append(self.visible_from_source(v.points, t, v.hit))
            deps.append(v.depth)
        return np.stack(cols), np.stack(vis), np.stack(deps)


def make_scene(seed: int = 0, width: int = 128, height: int = 96, num_frames: int = 5) -> Scene:
    """A random room with 1-3 spheres and 1-3 boxes (some moving), a random focal length (45-70 deg)."""
    rng = np.random.default_rng(seed)
    fov = math.radians(rng.uniform(45.0, 70.0))
    f = max(width, height) / 2.0 / math.tan(fov / 2.0)
    K = np.array([[f, 0, width / 2.0], [0, f, height / 2.0], [0, 0, 1.0]])
    # A low room: floor, ceiling and objects cover most of the frame, so the median depth (the orbit
    # pivot) lies well in front of the back wall and orbiting cameras stay inside the room.
    back = rng.uniform(8.0, 12.0)
    floor = rng.uniform(0.9, 1.4)
    ceil = rng.uniform(1.4, 2.2)
    side = back * rng.uniform(1.5, 1.8)  # wide enough that orbits around the median depth stay inside
    tex = lambda: _random_texture(rng, rng.uniform(0.35, 0.7))  # noqa: E731
    ex, ey, ez = np.eye(3)
    prims: list = [
        Plane(ez, back, ex, tex()),  # back wall z = -back
        Plane(ey, floor, ex, tex()),  # floor y = -floor
        Plane(-ey, ceil, ex, tex()),  # ceiling
        Plane(ex, side, ez, tex()),  # left wall x = -side
        Plane(-ex, side, ez, tex()),  # right wall
        Plane(-ez, 3.0, ex, tex()),  # wall behind the camera z = +3
    ]
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(0.35, 0.9)
        z = -rng.uniform(3.0, back - 1.5)
        x = rng.uniform(-0.35, 0.35) * z * -1.0
        y = -floor + r + (rng.uniform(0.0, 1.2) if rng.random() < 0.5 else 0.0)
        vel = rng.uniform(-0.4, 0.4, 3) * (rng.random() < 0.6)
        vel[1] = 0.0
        prims.append(Sphere(np.array([x, y, z]), r, _random_texture(rng, r * 0.8), vel, rng.uniform(-1, 1)))
    for _ in range(int(rng.integers(1, 4))):
        half = rng.uniform(0.25, 0.8, 3)
        z = -rng.uniform(2.5, back - 1.0)
        x = rng.uniform(-0.4, 0.4) * -z
        y = -floor + half[1]
        vel = rng.uniform(-0.3, 0.3, 3) * (rng.random() < 0.5)
        vel[1] = 0.0
        prims.append(Box(np.array([x, y, z]), half, rng.uniform(-0.8, 0.8), _random_texture(rng, 0.4), vel,
                         rng.uniform(-0.4, 0.4)))
    return Scene(prims, K, width, height, num_frames, seed, name=f"synthetic-{seed}")


def make_example(out_dir, width: int = 256, height: int = 192, num_frames: int = 24, seed: int = 7,
                 fps: int = 24) -> dict:
    """Write a small example clip: ``input.mp4`` (PyAV, H.264) and ``depth.npz`` (depth (T,H,W), K).

    Returns the paths. Both files are written atomically (temp file + rename).
    """
    import av

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scene = make_scene(seed, width, height, num_frames)
    frames, depth = scene.source()
    video = out / "input.mp4"
    tmp = out / f".input.{os.getpid()}.tmp.mp4"
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "20"}
            for fr in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, video)
    finally:
        tmp.unlink(missing_ok=True)
    dpath = out / "depth.npz"
    tmpd = out / f".depth.{os.getpid()}.tmp"
    try:
        with open(tmpd, "wb") as fh:
            np.savez_compressed(fh, depth=_compressible(depth), K=scene.K)
        os.replace(tmpd, dpath)
    finally:
        tmpd.unlink(missing_ok=True)
    return {"video": video, "depth": dpath, "K": scene.K, "size": (width, height), "frames": num_frames}


def _compressible(depth: np.ndarray) -> np.ndarray:
    """float32 depth with the 8 lowest mantissa bits cleared (relative precision ~3e-5): zips well."""
    bits = np.ascontiguousarray(depth, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFFF00)
    return bits.view(np.float32)
