"""torch.compile with a way back: a function that runs compiled, or eagerly where this machine cannot compile.

A missing C++ compiler, a Triton that does not match the GPU, or a graph the compiler cannot build should
cost speed, not the shot. :class:`CompiledOrEager` tries the compiled function; if it fails before it has
ever succeeded, it says so once and runs the plain function from then on. Once it has worked, a failure
is a real error and is raised.
"""

from __future__ import annotations

import warnings
from typing import Callable


class CompiledOrEager:
    def __init__(self, fn: Callable, *, what: str, fallback: str = "running eagerly", notice=warnings.warn,
                 **compile_kwargs):
        import torch

        self.fn = fn
        self.compiled = torch.compile(fn, **compile_kwargs)
        self.what, self.fallback, self.notice = what, fallback, notice
        self.eager = False
        self.worked = False

    def __call__(self, *args, **kwargs):
        import torch

        if self.eager:
            return self.fn(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - only before the first success: the compiler, not the maths
            if self.worked:
                raise
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            self.notice(f"{self.what} failed here ({type(e).__name__}: {first}); {self.fallback}")
            self.eager = True
            return self.fn(*args, **kwargs)
        self.worked = True
        return out
