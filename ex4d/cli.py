"""The ``ex4d`` command. Each sub-command area lives in ``ex4d/commands/<area>.py`` with ``register(sub)``.

Commands are imported lazily so ``ex4d --help`` and light commands never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .errors import Ex4dError


def _command_modules() -> list[str]:
    """Every module in ex4d/commands (each registers one or more sub-commands), in name order."""
    import pkgutil

    from . import commands

    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ex4d", description="EX-4D for Blender: new camera moves from a monocular video.")
    parser.add_argument("--version", action="version", version=f"ex4d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return rc
    except Ex4dError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout was closed early (`ex4d client ping | head`): not an error worth a traceback. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it


if __name__ == "__main__":
    sys.exit(main())
