"""``ex4d serve --gpus N``: the ex4d generator over N GPUs with sequence parallelism
(:mod:`ex4d.generate.sequence_parallel`: DeepSpeed-Ulysses over NCCL, the scheme of diffsynth's USP), one
torchrun process per GPU.

Layout
------
``ex4d serve --gpus N ...`` checks the set-up (:func:`check_parallel_setup`) and re-runs itself as
``python -m torch.distributed.run --standalone --nproc_per_node N -m backend.parallel serve ...``. In each
process (:func:`main`): NCCL over the N ranks, one GPU each; the generator is loaded on that GPU with the
same memory mode and speed levers as on one GPU, then made sequence parallel. Rank 0 runs the normal
service (socket thread + worker) with a :class:`ParallelGenerator` in place of the generator; ranks
1..N-1 wait in :func:`follow_rank0`. For every generation rank 0 broadcasts the job (colour, mask,
settings) and all ranks run the same denoising loop in lock step; cancel is agreed on by all ranks at
every check (:class:`SyncedCancel`), so no rank is left waiting in a collective. Geometry jobs
(reconstruct, render) run on rank 0 alone.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from ex4d.errors import Cancelled, InputError
from ex4d.generate.sequence_parallel import SequenceGroup, init_sequence_group, make_sequence_parallel

# ------------------------------------------------------------------------------------------------------
# Lock-step generation
# ------------------------------------------------------------------------------------------------------


class SyncedCancel:
    """A cancel flag all ranks agree on at every check (rank 0's event decides)."""

    def __init__(self, sp: SequenceGroup, local: threading.Event | None):
        self.sp, self.local = sp, local

    def is_set(self) -> bool:
        return self.sp.any(bool(self.local is not None and self.local.is_set()))


class ParallelGenerator:
    """Rank 0's stand-in for the generator: broadcasts each request, then generates with everyone."""

    def __init__(self, generator, sp: SequenceGroup):
        self.generator, self.sp = generator, sp
        self.name = getattr(generator, "name", "ex4d")

    def generate(self, color, mask, *, prompt=None, seed=0, steps=None, cfg=None, progress=None, cancel=None):
        request = {"color": np.ascontiguousarray(color), "mask": np.ascontiguousarray(mask),
                   "kwargs": {"prompt": prompt, "seed": seed, "steps": steps, "cfg": cfg}}
        self.sp.broadcast(("generate", request))

        def quiet_progress(stage, step, total, preview=None):
            # The service's progress raises Cancelled on rank 0 alone; cancel goes through SyncedCancel instead.
            if progress is not None:
                try:
                    progress(stage, step, total, preview)
                except Cancelled:
                    pass

        return self.generator.generate(request["color"], request["mask"], **request["kwargs"], progress=quiet_progress,
                                       cancel=SyncedCancel(self.sp, cancel))

    def info(self) -> dict:
        base = self.generator.info() if hasattr(self.generator, "info") else {}
        return {**base, "sequence_parallel_gpus": self.sp.world}

    def stop_followers(self) -> None:
        self.sp.broadcast(("stop", None))


def follow_rank0(generator, sp: SequenceGroup) -> None:
    """Ranks 1..N-1: run every generation rank 0 announces, until it says stop."""
    while True:
        kind, request = sp.broadcast(None)
        if kind == "stop":
            return
        try:
            generator.generate(request["color"], request["mask"], **request["kwargs"], cancel=SyncedCancel(sp, None))
        except Cancelled:
            pass
        except Exception as e:  # rank 0 sees the same failure and reports it; keep following
            print(f"[ex4d-backend rank {sp.rank}] generation failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------------


def check_parallel_setup(gpus: int, generator: str, device: str = "auto") -> None:
    """Clear errors before anything starts: generator, NCCL, enough GPUs. ``--device cpu`` runs the N
    ranks as CPU processes over gloo (slower than one process: it exists to test the service's lock step)."""
    if generator not in ("ex4d", "tiny"):
        raise InputError(f"--gpus {gpus} runs the ex4d generator in parallel; --generator {generator} uses one device")
    import torch
    import torch.distributed as dist

    if device == "cpu":
        if not dist.is_available() or not dist.is_gloo_available():
            raise InputError(f"--gpus {gpus} --device cpu: this torch build has no gloo (torch.distributed)")
        return
    if device not in ("auto", "cuda"):
        raise InputError(f"--gpus {gpus} uses cuda:0..{gpus - 1} (one process each); leave --device out")
    if not dist.is_available() or not dist.is_nccl_available():
        raise InputError(f"--gpus {gpus}: this torch build has no NCCL (torch.distributed); run with --gpus 1")
    if not torch.cuda.is_available() or torch.cuda.device_count() < gpus:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise InputError(f"--gpus {gpus}: this machine has {have} CUDA GPU(s)")


def launch_parallel(args) -> int:
    """Re-run ``ex4d serve`` under torchrun with one process per GPU (called by ``ex4d serve --gpus N``)."""
    import subprocess

    check_parallel_setup(args.gpus, args.generator, args.device)
    argv = [a for a in sys.argv[1:]]
    if argv and argv[0] == "serve":
        argv = argv[1:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
           "-m", "backend.parallel", "serve", *argv]
    print(f"starting {args.gpus} ranks: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    """One rank of ``ex4d serve --gpus N`` (started by torchrun)."""
    import torch

    from ex4d.cli import build_parser
    from ex4d.generate import load_generator

    args = build_parser().parse_args(argv if argv is not None else sys.argv[1:])
    on_cpu = args.device == "cpu"
    sp = init_sequence_group("gloo" if on_cpu else "nccl")
    rank = sp.rank
    device = "cpu" if on_cpu else f"cuda:{torch.cuda.current_device()}"
    from ex4d.commands.generate import generator_kwargs

    kwargs = {"models_dir": args.models, "device": device, **generator_kwargs(args)}
    kwargs.pop("preview_cache", None)  # the split model function runs every step (no preview cache)
    generator = load_generator(args.generator, **kwargs)
    make_sequence_parallel(generator.pipe, sp)
    if rank != 0:
        follow_rank0(generator, sp)
        return 0

    from backend.server import serve
    from backend.workers import Engine
    from ex4d.commands.serve import serve_config

    config = serve_config(args)
    engine = Engine(generator=args.generator, models_dir=args.models, device=device, memory_mode=args.memory_mode,
                    depth_weights=args.depth_weights, renderer=args.renderer, gpus=args.gpus, speed=args.speed,
                    vram_limit_gb=args.vram_limit)
    engine.device = device
    parallel = ParallelGenerator(generator, sp)
    engine.generator = parallel
    try:
        return serve(config, engine, lambda address: print(f"ex4d backend ready on {address}", flush=True))
    finally:
        parallel.stop_followers()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.exit(main(sys.argv[1:]))
    sys.exit(main())
