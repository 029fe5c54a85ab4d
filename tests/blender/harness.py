"""Shared by the scripts run inside the bpy environment (.venv-blender/bin/python SCRIPT -- ARGS).

install(zip): the real extension install path (bpy.ops.extensions.package_install_files), then the
add-on module is bl_ext.user_default.ex4d. Scripts write their findings as JSON for the pytest side.
"""

import importlib
import json
import os
import sys
import time

import bpy

MODULE = "bl_ext.user_default.ex4d"


def args() -> list:
    return sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []


def install(zip_path: str):
    """Install + enable the built extension; returns the add-on's top module. When the zip bundles
    pyzmq wheels, ``zmq`` is then imported only from what Blender installed from them (as in a real
    Blender, which has no pyzmq of its own), not from the test environment."""
    import zipfile

    assert os.environ.get("BLENDER_USER_RESOURCES"), "tests must set BLENDER_USER_RESOURCES"
    assert "zmq" not in sys.modules
    t0 = time.perf_counter()
    res = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    assert res == {"FINISHED"}, res
    if any(n.startswith("wheels/") for n in zipfile.ZipFile(zip_path).namelist()):
        site = bpy.utils.user_resource(
            "EXTENSIONS", path=f".local/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages")
        sys.meta_path.insert(0, _OnlyFrom("zmq", site))
    mod = importlib.import_module(MODULE)
    assert hasattr(bpy.types.Scene, "ex4d"), "add-on did not register"
    return mod, time.perf_counter() - t0


class _OnlyFrom:
    """Meta path finder: the top-level package ``name`` comes from ``folder`` or not at all."""

    def __init__(self, name: str, folder: str):
        self.name, self.folder = name, folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, [self.folder])
        if spec is None:
            raise ModuleNotFoundError(f"{fullname} is not in {self.folder} (the extension's wheels)")
        return spec


def sub(name: str):
    return importlib.import_module(f"{MODULE}.{name}")


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=float)
    os.replace(tmp, path)


def pump(scene, until, timeout_s: float = 60.0, sleep_s: float = 0.05):
    """Call the add-on's timer step (bpy runs no event loop) until ``until()`` or the timeout."""
    jobs = sub("blender.jobs")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        jobs.poll_once(scene)
        if until():
            return time.perf_counter() - t0
        time.sleep(sleep_s)
    raise TimeoutError(f"gave up after {timeout_s} s (job state {scene.ex4d.job_state!r}, {scene.ex4d.job_message!r})")


class FakeLayout:
    """Stands in for bpy.types.UILayout (the bpy module draws no UI) to run panel and menu ``draw``
    functions: records every button and checks that each operator, property and icon exists."""

    def __init__(self, log=None, problems=None):
        self.log = [] if log is None else log
        self.problems = [] if problems is None else problems
        self.enabled = self.active = True
        self.alert = False

    def _icon(self, icon):
        icons = bpy.types.UILayout.bl_rna.functions["operator"].parameters["icon"].enum_items.keys()
        if icon and icon not in icons:
            self.problems.append(f"unknown icon {icon}")

    def _child(self, *a, **k):
        return FakeLayout(self.log, self.problems)

    row = column = box = split = _child

    def operator(self, idname, text=None, icon="NONE", **k):
        self._icon(icon)
        cat, name = idname.split(".")
        if name not in dir(getattr(bpy.ops, cat)):
            self.problems.append(f"unknown operator {idname}")
        self.log.append(("operator", idname, text))
        return type("OpProps", (), {})()

    def operator_menu_enum(self, idname, prop, text=None, icon="NONE", **k):
        self._icon(icon)
        op = getattr(getattr(bpy.ops, idname.split(".")[0]), idname.split(".")[1])
        if prop not in op.get_rna_type().properties:
            self.problems.append(f"{idname} has no property {prop}")
        self.log.append(("operator_menu_enum", idname, prop))

    def prop(self, data, name, text=None, icon="NONE", **k):
        self._icon(icon)
        if name not in data.bl_rna.properties:
            self.problems.append(f"{type(data).__name__} has no property {name}")
        self.log.append(("prop", name, text))

    def label(self, text="", icon="NONE", **k):
        self._icon(icon)
        self.log.append(("label", text, icon))

    def menu(self, idname, text=None, icon="NONE", **k):
        self._icon(icon)
        if not hasattr(bpy.types, idname):
            self.problems.append(f"unknown menu {idname}")
        self.log.append(("menu", idname, text))

    def progress(self, factor=0.0, type="BAR", text=""):
        self.log.append(("progress", factor, text))

    def separator(self, *a, **k):
        pass


if "progress" not in bpy.types.UILayout.bl_rna.functions:  # as the real one (Blender 4.0+ has it)
    del FakeLayout.progress


def draw_ui(cls, context=None):
    """Run ``cls.draw`` (a Panel or Menu class, or a draw function) on a FakeLayout; (log, problems)."""
    fake = FakeLayout()
    owner = type("Owner", (), {"layout": fake})()
    fn = cls.draw if isinstance(cls, type) else cls
    fn(owner, context or bpy.context)
    return fake.log, fake.problems
