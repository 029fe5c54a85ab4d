"""Argument checks shared by the commands: cheap, and run before any video is read or model loaded.

Each ``check_*`` function raises :class:`ex4d.errors.InputError` (``error: ...``, exit 2). Nothing here imports torch unless a
``--device`` is given.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

from ..errors import InputError


def check_numbers(args, **rules: str) -> None:
    """Check numeric options by rule before anything else runs, naming the option: ``finite``,
    ``positive``, ``non_negative``, ``unit`` (0..1), ``count`` (an int >= 1). ``None`` (not given) passes.

    (Done here rather than as argparse types: argparse would print its usage block and exit, where
    every other bad input gets the CLI's one ``error:`` line.)"""
    for attr, rule in rules.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        option = "--" + attr.replace("_", "-")
        if rule == "count":
            if value < 1:
                raise InputError(f"{option} must be at least 1, got {value}")
            continue
        if not math.isfinite(value):
            raise InputError(f"{option} must be a finite number, got {value}")
        if rule == "positive" and value <= 0:
            raise InputError(f"{option} must be greater than 0, got {value:g}")
        if rule == "non_negative" and value < 0:
            raise InputError(f"{option} must be 0 or more, got {value:g}")
        if rule == "unit" and not 0.0 <= value <= 1.0:
            raise InputError(f"{option} must be between 0 and 1, got {value:g}")


def check_path_given(value: str | None, option: str = "--out") -> None:
    # An unset shell variable ($OUT) arrives as "": that must not mean "the current folder".
    if value is not None and not str(value).strip():
        raise InputError(f"{option} is empty (an unset shell variable?); give a path")


def check_device(name: str | None) -> str:
    """The torch device to use: ``name`` checked against this machine, or cuda when there is one, else cpu."""
    import torch

    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"--device {name}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
        return name
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {name}: Apple's MPS is not available here; use --device cpu")
        return name
    raise InputError(f"--device {name}: only cpu, cuda[:N] and mps are supported")


def check_output_folder(out: str | os.PathLike) -> None:
    """``--out DIR`` can be made and written: an existing file, a read-only folder or a folder under a
    file fails here, not after the shot was computed."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"--out {out}: the folder is not writable")
        failed = _write_probe(out)
        if failed:
            raise InputError(f"--out {out}: cannot write files there ({failed})")
        return
    parent = _nearest_existing(out)
    if not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: cannot create it, {parent} is not writable")
    failed = _write_probe(parent)  # without making the folder: a failed run must not leave it behind
    if failed:
        raise InputError(f"--out {out}: cannot create it in {parent} ({failed})")


def check_output_file(path: str | os.PathLike, option: str = "--out") -> None:
    """An output file can be written: not a folder, in an existing writable folder."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{option} {path}: not writable")
    failed = _write_probe(folder)
    if failed:
        raise InputError(f"{option} {path}: cannot write files in {folder} ({failed})")


def _write_probe(folder: Path) -> str | None:
    """Create and remove a small file in ``folder``: None when that works, else why not. os.access
    answers yes for root everywhere, also on read-only mounts and pseudo file systems such as /proc,
    where the real write would fail only after the whole shot was computed."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".ex4d-probe-", dir=folder)
    except OSError as e:
        return e.strerror or str(e)
    try:
        os.write(fd, b"x")  # some file systems accept the create and refuse the data
    except OSError as e:
        return e.strerror or str(e)
    finally:
        os.close(fd)
        try:
            os.unlink(name)
        except OSError:
            pass
    return None


VIDEO_SUFFIXES = (".mp4",)  # what write_video writes: H.264 in an MP4 container, whatever the name says


def check_video_file_name(path: str | os.PathLike, option: str = "--out") -> None:
    """An output video's name: a file (no trailing separator, which means a folder) ending in .mp4, so
    the name says what write_video puts in it (an 'x.gif' or 'x.npz' would hold MP4 data)."""
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or (os.altsep and text.endswith(os.altsep)):
        raise InputError(f"{option} {text} ends in a separator (a folder); give a video file name such as {text}shot.mp4")
    if Path(text).suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(f"{option} {text}: the shot is written as MP4 (H.264); give a file name ending in .mp4")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def input_files(*paths: str | os.PathLike | None) -> list[Path]:
    """Every file behind the given input arguments: files, the files of a folder, a glob's matches."""
    files: list[Path] = []
    for p in paths:
        if not p:
            continue
        p = Path(p)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += [f for f in p.iterdir() if f.is_file()]
        elif glob.has_magic(str(p)):
            files += [Path(f) for f in glob.glob(str(p)) if os.path.isfile(f)]
    return files


def check_not_overwriting_inputs(outputs, inputs: list[Path], what: str = "--out",
                                 fix: str = "choose another output folder or --name") -> None:
    """Refuse when an output (written or replaced) is one of the input files: it would destroy them."""
    for out in outputs:
        out = Path(out)
        if not out.exists():
            continue
        for src in inputs:
            try:
                same = os.path.samefile(out, src)
            except OSError:
                continue
            if same:
                raise InputError(
                    f"{what}: {out} is the input {src}; writing there would destroy it "
                    f"({fix})"
                )
