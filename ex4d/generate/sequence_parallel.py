"""Sequence parallelism for the Wan DiT (DeepSpeed-Ulysses, the scheme of diffsynth's USP): each of N
processes (one per GPU) runs every block on 1/N of the video tokens; self-attention trades the token split
for a head split with one all-to-all before and one after.

* :class:`SequenceGroup` - the collectives Ulysses and the lock-step service need, over any
  ``torch.distributed`` group (NCCL on GPUs; gloo in the CPU tests).
* :func:`enable_sequence_parallel` - makes a DiT's self-attention Ulysses. It follows the block forward in
  use: diffsynth's own (the ``reference`` speed: the attention module's forward is swapped) or the speed
  levers' patched forward (:func:`ex4d.generate.accel.patch_block_forwards`; the chosen kernel runs
  between the all-to-alls, which are traced into the compiled block as functional collectives).
* :func:`sequence_parallel_model_fn` - ``ex4d_model_fn`` with the split: patch embedding and the EX-4D
  condition tokens on the FULL sequence, then each rank takes its slice of tokens and RoPE frequencies, runs
  the blocks and the head, and an all-gather rebuilds the sequence. Padding tokens (when N does not divide
  the token count) are masked out of attention, so results do not depend on N. N must divide the number of
  heads (40 for Wan 14B: N in 1, 2, 4, 5, 8). Cross-attention needs no communication (the text and CLIP
  context is replicated).

Per step and block the traffic is 4 all-to-alls of the local q/k/v/output, ``2 * S/N * dim`` values each
with batched CFG: 1/N of it stays on the GPU, the rest crosses NVLink.
"""

from __future__ import annotations

import math
import os
import types
import warnings

import torch
import torch.nn.functional as F

from ..errors import InputError


class SequenceGroup:
    """Ulysses collectives over a torch.distributed group."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.key_mask = None  # (S_padded,) bool, set per forward when the sequence was padded

    def exchange(self, send: torch.Tensor) -> torch.Tensor:
        """All-to-all of a contiguous tensor's leading dimension: block i goes to rank i, block j of the
        result came from rank j. A functional collective: it returns at once and the result is waited
        for where it is first used, and torch.compile keeps it inside the compiled graph."""
        if self.world == 1:
            return send
        import torch.distributed._functional_collectives as funcol

        return funcol.all_to_all_single(send, None, None, self.group or self.dist.group.WORLD)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (used to agree on cancel)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def broadcast(self, obj, src: int = 0):
        """An object from rank ``src`` to every rank (inside the torchrun group only; never on the wire)."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)

    def _device(self):
        if self.dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def init_sequence_group(backend: str = "nccl") -> SequenceGroup:
    """One rank started by torchrun: NCCL over all ranks, one GPU each (LOCAL_RANK); ``gloo`` on CPU."""
    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise InputError(f"sequence parallel runs under torchrun ({key} is not set)")
    if backend == "nccl":
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group(backend)
    return SequenceGroup()


# ------------------------------------------------------------------------------------------- attention


def ulysses_attention(sp: SequenceGroup, kernel):
    """Self-attention on a token shard, in the sharded form ``accel.block_forward`` calls (attributes
    ``head_groups`` and ``send``). ``send`` takes q, k or v as contiguous (b, N, S/N, n/N, d) from
    :func:`~ex4d.generate.accel.head_groups` - block j holds head group j, so the all-to-all sends it to
    rank j with no copy - and returns per CFG branch (N, S/N, n/N, d): this rank's heads over the whole
    sequence, which ``kernel`` reads in place as (1, n/N, S, d). The output goes back the same way and
    the head groups are put side by side again: (b, S/N, n*d).

    Every transfer is started where its data is ready and waited for where it is used: the q/k/v of a
    branch travel while the next projection or the other branch's attention runs, and a branch's output
    travels while the next branch attends (the collectives are traced into a compiled block)."""

    def attend(q, k, v):
        q, k, v = (t.flatten(0, 1).unsqueeze(0).transpose(1, 2) for t in (q, k, v))  # (1, n/N, S, d) views
        if sp.key_mask is None:
            return kernel(q, k, v)
        # padded tokens: the masked default kernel (the fused kernels here take no mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sp.key_mask.to(q.device).view(1, 1, 1, -1))

    def send(t):
        return [sp.exchange(t[i]) for i in range(t.shape[0])]

    def attention(q, k, v):
        back = []
        for qi, ki, vi in zip(q, k, v):
            out = attend(qi, ki, vi).transpose(1, 2)  # (1, S, n/N, d)
            back.append(sp.exchange(out.reshape(qi.shape)))
        merged = torch.stack([o.transpose(0, 1) for o in back])  # (b, S/N, N, n/N, d): groups side by side
        return merged.flatten(2)

    attention.head_groups = sp.world
    attention.send = send
    return attention


def _ulysses_module_forward(self, x, freqs):
    """diffsynth ``SelfAttention.forward`` for a token shard (the unpatched block forward)."""
    from diffsynth.models.wan_video_dit import rope_apply

    from .accel import head_groups

    n = self.num_heads
    q = rope_apply(self.norm_q(self.q(x)), freqs, n)
    k = rope_apply(self.norm_k(self.k(x)), freqs, n)
    v = self.v(x)
    ulysses = self._ex4d_ulysses
    return self.o(ulysses(*(ulysses.send(head_groups(t, n, ulysses.head_groups)) for t in (q, k, v))))


# Measured on 2 H200s (docs/benchmarks.md section 6): cuDNN's FP8 attention on the gathered heads made the
# step slower than one GPU's (1.26 s vs 1.15 s), so under Ulysses the bf16 kernel attends instead.
FP8_ATTENTION_UNDER_ULYSSES = "FP8 self-attention is slower under sequence parallel here; bf16 cuDNN attention is used"


def enable_sequence_parallel(dit, sp: SequenceGroup) -> dict:
    """Make every block's self-attention Ulysses over ``sp`` (in place), for the block forward in use.
    Returns the speed levers it had to drop, with why."""
    from . import accel

    heads = dit.blocks[0].self_attn.num_heads
    if heads % sp.world:
        raise InputError(f"{sp.world} GPUs do not divide the model's {heads} attention heads; use a divisor of {heads}")
    patched = getattr(dit, "_ex4d_block_levers", None)
    if patched is not None and all("forward" in block.__dict__ for block in dit.blocks):
        dropped = {"fp8_attention": FP8_ATTENTION_UNDER_ULYSSES} if patched["self_attention"] and sp.world > 1 else {}
        kernel = patched["attention"] if dropped else patched["self_attention"] or patched["attention"]
        accel.patch_block_forwards(dit, **{**patched, "self_attention": ulysses_attention(sp, kernel)})
        dit._ex4d_block_levers = patched  # the single-GPU choice stays the record (enabling twice does not nest)
        return dropped
    for block in dit.blocks:
        attn = block.self_attn
        attn._ex4d_ulysses = ulysses_attention(sp, accel.sdpa_default)
        attn.forward = types.MethodType(_ulysses_module_forward, attn)
    return {}


def sequence_parallel_model_fn(dit, latents, timestep, context, clip_feature, y, video_tokens=None, *,
                               sp: SequenceGroup, **_unused):
    """``ex4d_model_fn`` with the token sequence split over ``sp``'s ranks (see the module docstring)."""
    from .pipeline import embed_dit_inputs

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
            x = block(x, context, t_mod, freqs)
        x = dit.head(x, t)
    finally:
        sp.key_mask = None
    x = sp.all_gather(x, dim=1)[:, :S]
    return dit.unpatchify(x, (f, h, w))


def make_sequence_parallel(pipe, sp: SequenceGroup, notice=warnings.warn):
    """An assembled :class:`~ex4d.generate.pipeline.Ex4dPipeline` runs its DiT split over ``sp`` (in place)."""
    if getattr(pipe, "step_cache", None) is not None:
        raise InputError("the preview cache needs one GPU (the split model function runs every step)")
    dropped = enable_sequence_parallel(pipe.dit, sp)
    report = getattr(pipe, "speed_report", None)
    for lever, why in dropped.items():
        notice(f"speed {pipe.speed}: {lever} not used on {sp.world} GPUs ({why})")
        if report is not None:
            report["levers"] = [lv for lv in report["levers"] if lv != lever]
            report["skipped"][lever] = why
    pipe.model_fn = lambda **kw: sequence_parallel_model_fn(sp=sp, **kw)
    return pipe
