"""``ex4d serve --gpus N``: the ex4d generator over N GPUs with sequence parallelism (DeepSpeed-Ulysses, as in
diffsynth's unified sequence parallel), one torchrun process per GPU.

NOT VERIFIED ON GPUs: no multi-GPU machine was available while this was written. The model function and
the Ulysses attention are tested on CPU with 2 gloo processes against the single-process result
(tests/test_backend_parallel.py); the NCCL/xfuser start-up path has not run.

Layout
------
``ex4d serve --gpus N ...`` checks the set-up (:func:`check_parallel_setup`) and re-runs itself as
``python -m torch.distributed.run --standalone --nproc_per_node N -m backend.parallel serve ...``. In each
process (:func:`main`): diffsynth's ``initialize_usp`` (xfuser's model-parallel state, NCCL, one GPU per
rank), then the generator is loaded on that GPU and its model function is swapped for
:func:`usp_ex4d_model_fn`. Rank 0 runs the normal service (socket thread + worker) with a
:class:`ParallelGenerator` in place of the generator; ranks 1..N-1 wait in :func:`follow_rank0`. For every
generation rank 0 broadcasts the job (colour, mask, settings) and all ranks run the same denoising loop in
lock step; cancel is agreed on by all ranks at every check (:class:`SyncedCancel`), so no rank is left
waiting in a collective. Geometry jobs (reconstruct, render) run on rank 0 alone.

The model function (:func:`usp_ex4d_model_fn`)
---------------------------------------------
Same operations as ``ex4d.generate.pipeline.ex4d_model_fn``: patch embedding, then the **EX-4D condition
tokens are added to the full token sequence, before it is split** across ranks; RoPE frequencies are
computed for the full sequence and each rank takes its slice; each rank runs every block on its 1/N of the
tokens. Self-attention is Ulysses: q/k/v of the local tokens -> all-to-all (scatter heads, gather the
sequence) -> PyTorch SDPA over the whole sequence for 1/N of the heads -> all-to-all back. No flash-attn.
Cross-attention needs no communication (text/CLIP context is replicated). The head runs locally, then an
all-gather rebuilds the sequence. Padding tokens (when the token count does not divide by N) are masked
out of attention, so results do not depend on N. N must divide the number of heads (40 for Wan 14B:
N in 1, 2, 4, 5, 8).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import types
from typing import Any

import numpy as np

from ex4d.errors import Cancelled, InputError

# ------------------------------------------------------------------------------------------------------
# Communication: one small interface, two implementations (torch.distributed for any backend incl. gloo;
# xfuser/yunchang's sequence-parallel group when diffsynth's USP is initialised).
# ------------------------------------------------------------------------------------------------------


class TorchSequenceGroup:
    """Ulysses collectives over a torch.distributed group (NCCL on GPUs, gloo in CPU tests)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.key_mask = None  # (S_padded,) bool, set per forward when the sequence was padded

    def all_to_all(self, x, scatter_dim: int, gather_dim: int):
        """Split ``x`` along ``scatter_dim`` into world parts, send part i to rank i, concatenate what
        comes back along ``gather_dim``."""
        import torch

        if self.world == 1:
            return x
        send = torch.stack(x.chunk(self.world, dim=scatter_dim)).contiguous()
        recv = torch.empty_like(send)
        self.dist.all_to_all_single(recv, send, group=self.group)
        return torch.cat(recv.unbind(0), dim=gather_dim)

    def all_gather(self, x, dim: int):
        import torch

        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (used to agree on cancel)."""
        import torch

        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """An object from rank ``src`` to every rank (inside the torchrun group only; never on the wire)."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def _device(self):
        import torch

        if self.dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


class XfuserSequenceGroup(TorchSequenceGroup):
    """The same collectives through xfuser's sequence-parallel group and yunchang's all-to-all (what
    diffsynth's USP uses), after ``diffsynth.utils.xfuser.initialize_usp``."""

    def __init__(self):
        super().__init__(None)
        from diffsynth.utils.xfuser import (
            all_to_all_4d,
            get_sequence_parallel_rank,
            get_sequence_parallel_world_size,
            get_sp_group,
        )

        self._a2a = all_to_all_4d
        self._sp = get_sp_group()
        self.rank = get_sequence_parallel_rank()
        self.world = get_sequence_parallel_world_size()

    def all_to_all(self, x, scatter_dim: int, gather_dim: int):
        return self._a2a(x.contiguous(), scatter_dim, gather_dim)

    def all_gather(self, x, dim: int):
        return self._sp.all_gather(x.contiguous(), dim=dim)


# ------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------


def ulysses_self_attention(self, x, freqs):
    """diffsynth ``SelfAttention.forward`` for a sequence shard: local q/k/v + RoPE, all-to-all to
    (full sequence, heads/N), SDPA, all-to-all back. ``self._ex4d_sp`` is the :class:`TorchSequenceGroup`."""
    import torch.nn.functional as F
    from diffsynth.models.wan_video_dit import rope_apply
    from einops import rearrange

    sp = self._ex4d_sp
    n = self.num_heads
    q = rope_apply(self.norm_q(self.q(x)), freqs, n)
    k = rope_apply(self.norm_k(self.k(x)), freqs, n)
    v = self.v(x)
    q, k, v = (rearrange(t, "b s (n d) -> b s n d", n=n) for t in (q, k, v))
    # (b, s/N, n, d) -> (b, s, n/N, d)
    q, k, v = (sp.all_to_all(t, scatter_dim=2, gather_dim=1) for t in (q, k, v))
    mask = None
    if sp.key_mask is not None:
        mask = sp.key_mask.to(q.device).view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    out = sp.all_to_all(out.transpose(1, 2), scatter_dim=1, gather_dim=2)  # back to (b, s/N, n, d)
    return self.o(out.flatten(2))


def enable_sequence_parallel(dit, sp: TorchSequenceGroup) -> None:
    """Swap every block's self-attention for the Ulysses version (in place)."""
    heads = dit.blocks[0].self_attn.num_heads
    if heads % sp.world:
        raise InputError(f"{sp.world} GPUs do not divide the model's {heads} attention heads; use a divisor of {heads}")
    for block in dit.blocks:
        block.self_attn._ex4d_sp = sp
        block.self_attn.forward = types.MethodType(ulysses_self_attention, block.self_attn)


def usp_ex4d_model_fn(dit, latents, timestep, context, clip_feature, y, video_tokens=None, *, sp: TorchSequenceGroup,
                      **_unused):
    """``ex4d_model_fn`` with the token sequence split over ``sp``'s ranks (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from ex4d.generate.pipeline import embed_dit_inputs

    # EX-4D condition tokens are added to the FULL sequence inside embed_dit_inputs, before the split.
    x, t, t_mod, context, freqs, (f, h, w) = embed_dit_inputs(dit, latents, timestep, context, clip_feature, y,
                                                              video_tokens)
    S = x.shape[1]
    chunk = math.ceil(S / sp.world)
    pad = chunk * sp.world - S
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        freqs = torch.cat([freqs, torch.ones(pad, *freqs.shape[1:], dtype=freqs.dtype, device=freqs.device)])
        sp.key_mask = torch.arange(S + pad, device=x.device) < S
    else:
        sp.key_mask = None
    lo, hi = sp.rank * chunk, (sp.rank + 1) * chunk
    x, freqs = x[:, lo:hi].contiguous(), freqs[lo:hi]
    try:
        for block in dit.blocks:
            # The class's forward: speed levers that replace a block's forward do their own attention.
            x = type(block).forward(block, x, context, t_mod, freqs)
        x = dit.head(x, t)
    finally:
        sp.key_mask = None
    x = sp.all_gather(x, dim=1)[:, :S]
    return dit.unpatchify(x, (f, h, w))


# ------------------------------------------------------------------------------------------------------
# Lock-step generation
# ------------------------------------------------------------------------------------------------------


class SyncedCancel:
    """A cancel flag all ranks agree on at every check (rank 0's event decides)."""

    def __init__(self, sp: TorchSequenceGroup, local: threading.Event | None):
        self.sp, self.local = sp, local

    def is_set(self) -> bool:
        return self.sp.any(bool(self.local is not None and self.local.is_set()))


class ParallelGenerator:
    """Rank 0's stand-in for the generator: broadcasts each request, then generates with everyone."""

    def __init__(self, generator, sp: TorchSequenceGroup):
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

    def stop_followers(self) -> None:
        self.sp.broadcast(("stop", None))


def follow_rank0(generator, sp: TorchSequenceGroup) -> None:
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


def attach(generator, sp: TorchSequenceGroup):
    """Make a loaded ex4d generator sequence parallel: Ulysses attention + the split model function."""
    pipe = generator.pipe
    enable_sequence_parallel(pipe.dit, sp)
    pipe.model_fn = lambda **kw: usp_ex4d_model_fn(sp=sp, **kw)
    return generator


# ------------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------------


def check_parallel_setup(gpus: int, generator: str) -> None:
    """Clear errors before anything starts: generator, xfuser/yunchang, torchrun, enough GPUs."""
    if generator not in ("ex4d", "tiny"):
        raise InputError(f"--gpus {gpus} runs the ex4d generator in parallel; --generator {generator} uses one device")
    missing = []
    for module in ("xfuser", "yunchang"):
        try:
            __import__(module)
        except Exception:
            missing.append(module)
    if missing:
        raise InputError(
            f"--gpus {gpus} needs diffsynth's sequence parallel packages, not installed here: {', '.join(missing)} "
            "(pip install xfuser yunchang; flash-attn is NOT needed) - or run with --gpus 1"
        )
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < gpus:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise InputError(f"--gpus {gpus}: this machine has {have} CUDA GPU(s)")


def launch_parallel(args) -> int:
    """Re-run ``ex4d serve`` under torchrun with one process per GPU (called by ``ex4d serve --gpus N``)."""
    import subprocess

    from backend.server import check_bind

    check_bind(args.bind, args.keys_dir)
    check_parallel_setup(args.gpus, args.generator)
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
    from diffsynth.utils.xfuser import initialize_usp

    from ex4d.cli import build_parser
    from ex4d.generate import load_generator

    args = build_parser().parse_args(argv if argv is not None else sys.argv[1:])
    initialize_usp("cuda")  # NCCL process group + xfuser's sequence-parallel state; sets cuda:rank
    rank = int(os.environ.get("RANK", "0"))
    device = f"cuda:{torch.cuda.current_device()}"
    sp = XfuserSequenceGroup()
    from ex4d.commands.generate import generator_kwargs

    kwargs = {"models_dir": args.models, "device": device, **generator_kwargs(args)}
    kwargs.pop("preview_cache", None)  # the split model function runs every step (no preview cache)
    generator = attach(load_generator(args.generator, **kwargs), sp)
    if rank != 0:
        follow_rank0(generator, sp)
        return 0

    from pathlib import Path

    from backend.server import ServeConfig, serve
    from backend.workers import Engine
    from ex4d.protocol.wire import Limits

    total = int(args.max_message_mb * 2**20)
    config = ServeConfig(bind=args.bind, jobs_dir=Path(args.jobs_dir), max_queue=args.max_queue, ttl_s=args.ttl * 3600.0,
                         keys_dir=Path(args.keys_dir) if args.keys_dir else None, heartbeat_s=args.heartbeat,
                         limits=Limits(max_message_bytes=total, max_array_bytes=max(total // 2, 1)))
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
