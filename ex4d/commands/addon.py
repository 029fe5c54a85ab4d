"""``ex4d addon build``: package the Blender extension as ``dist/ex4d-<version>.zip``.

The zip holds, at its root, ``blender_manifest.toml`` (version set from ``ex4d.__version__``) and the
add-on package (``addon/``), plus:

* ``_core/``: the pure-Python part of ``ex4d`` the add-on needs (``errors.py``, ``camera.py``,
  ``depth_rules.py``, ``fit.py``, ``protocol/``), copied here at build time so there is one source of truth in git;
* ``wheels/``: the pyzmq wheels the manifest lists (Blender ships numpy, not pyzmq), taken from the
  wheel cache or the checkout's ``.whl/`` folder, and downloaded once with ``pip download`` into the
  cache only when in neither, so builds work offline.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

# What of ex4d/ goes into the zip (relative to the ex4d package), as _core/<same path>.
BUNDLED_CORE = ("errors.py", "camera.py", "depth_rules.py", "fit.py", "protocol")


def register(subparsers) -> None:
    p = subparsers.add_parser("addon", help="Blender extension tools")
    sub = p.add_subparsers(dest="addon_command", metavar="ACTION")
    b = sub.add_parser("build", help="build the Blender extension zip (dist/ex4d-<version>.zip)")
    b.add_argument("--out", default="dist", help="output folder (default: dist/)")
    b.add_argument(
        "--wheel-cache",
        default=None,
        help="folder caching the downloaded pyzmq wheels (default: $EX4D_WHEEL_CACHE or ~/.cache/ex4d/wheels)",
    )
    b.add_argument("--no-wheels", action="store_true", help="leave the wheels out (for Blender builds that have pyzmq)")
    b.set_defaults(func=_cmd_build)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _cmd_build(args: argparse.Namespace) -> int:
    zip_path = build_addon(Path(args.out), wheel_cache=args.wheel_cache, with_wheels=not args.no_wheels, log=print)
    print(f"wrote {zip_path}")
    return 0


def source_root() -> Path:
    """The checkout holding ex4d/, addon/ and blender_manifest.toml."""
    return Path(__file__).resolve().parents[2]


def default_wheel_cache() -> Path:
    env = os.environ.get("EX4D_WHEEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ex4d" / "wheels"


def manifest_text(version: str, root: Path | None = None, with_wheels: bool = True) -> str:
    """The manifest as it goes into the zip: version from ex4d, wheels kept or removed."""
    from ..errors import InputError

    root = root or source_root()
    text = (root / "blender_manifest.toml").read_text()
    text, n = re.subn(r'(?m)^version = "[^"]*"', f'version = "{version}"', text, count=1)
    if n != 1:
        raise InputError("blender_manifest.toml has no top-level 'version = \"...\"' line")
    if not with_wheels:
        text = re.sub(r"(?ms)^wheels = \[.*?\]\n", "", text)
        text = re.sub(r"(?m)^platforms = .*\n", "", text)
    return text


def manifest_wheels(root: Path | None = None) -> list[str]:
    import tomllib

    data = tomllib.loads(((root or source_root()) / "blender_manifest.toml").read_text())
    return [Path(w).name for w in data.get("wheels", [])]


def checkout_wheels() -> Path:
    """The checkout's own wheel folder (``.whl/``, git-ignored; the tests and CI fill it)."""
    return source_root() / ".whl"


def fetch_wheels(names: list[str], cache: Path, log=print, also_in: list[Path] | None = None) -> list[Path]:
    """The path of every wheel file: from ``cache``, else from one of ``also_in`` (default: the checkout's
    ``.whl/``), else ``pip download``-ed into ``cache``."""
    from ..errors import Ex4dError

    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        target = cache / name
        if not target.exists():
            found = [d / name for d in (also_in if also_in is not None else [checkout_wheels()]) if (d / name).is_file()]
            if found:
                out.append(found[0])
                continue
            dist, version, py_tag, abi_tag, plat = name[: -len(".whl")].split("-")
            py_version = f"{py_tag[2]}.{py_tag[3:]}"
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
                   "--python-version", py_version, "--implementation", "cp", "--abi", abi_tag,
                   "--dest", str(cache), f"{dist}=={version}"]
            for p in plat.split("."):
                cmd += ["--platform", p]
            log(f"downloading {name}")
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 or not target.exists():
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise Ex4dError(
                    f"could not download wheel {name} ({last}); on an offline machine copy it into {cache} "
                    "or build with --no-wheels"
                )
        out.append(target)
    return out


def build_addon(out_dir: Path, wheel_cache: str | Path | None = None, with_wheels: bool = True, log=print) -> Path:
    """Write ``out_dir/ex4d-<version>.zip`` atomically and return its path."""
    from .. import __version__
    from ..errors import InputError

    root = source_root()
    addon_dir, core_dir = root / "addon", root / "ex4d"
    if not (addon_dir / "__init__.py").exists():
        raise InputError(f"no add-on sources at {addon_dir} (run from a source checkout)")
    wheels = fetch_wheels(manifest_wheels(root), Path(wheel_cache) if wheel_cache else default_wheel_cache(), log) if with_wheels else []

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_path = out_dir / f"ex4d-{__version__}.zip"
    tmp = zip_path.with_name(f".{zip_path.name}.tmp{os.getpid()}")

    def sources(base: Path):
        for p in sorted(base.rglob("*.py")):
            if "__pycache__" not in p.parts:
                yield p

    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("blender_manifest.toml", manifest_text(__version__, root, with_wheels))
            for p in sources(addon_dir):
                z.write(p, p.relative_to(addon_dir).as_posix())
            z.writestr("_core/__init__.py", f'"""Copied from ex4d {__version__} by `ex4d addon build`; do not edit."""\n\n__version__ = "{__version__}"\n')
            for item in BUNDLED_CORE:
                src = core_dir / item
                for p in [src] if src.is_file() else sources(src):
                    z.write(p, "_core/" + p.relative_to(core_dir).as_posix())
            for w in wheels:
                z.write(w, f"wheels/{w.name}")
        os.replace(tmp, zip_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return zip_path
