"""Block-wise weight offload for the Wan DiT, with prefetch on a side CUDA stream.

The first ``resident`` blocks stay on the GPU. The others live in pinned host memory; while block i runs,
block i+1's weights are copied into one of ``slots`` GPU buffers on a side stream, so the transfer hides
behind compute. Every Wan block has the same parameter shapes, so a slot is a set of tensors shaped like
one block's, re-pointed at whichever block is due (``param.data = slot tensor``). The copy into a slot waits
for the block that last used it (CUDA events), and the compute stream waits for the copy.

Works with FP8 blocks (their buffers move too) and with the regionally compiled block forward (module
hooks run eagerly around it).
"""

from __future__ import annotations

import torch


def _block_tensors(block: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    named = [(f"p:{n}", p) for n, p in block.named_parameters()]
    named += [(f"b:{n}", b) for n, b in block.named_buffers() if b is not None]
    return named


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in _block_tensors(module))


def blocks_that_fit(blocks, budget_bytes: int, slots: int = 2) -> int:
    """How many blocks can stay resident in ``budget_bytes`` once ``slots`` streaming buffers are paid for."""
    per_block = module_bytes(blocks[0])
    if budget_bytes < slots * per_block:
        return 0
    return int(min(len(blocks), (budget_bytes - slots * per_block) // per_block))


class BlockOffloader:
    """Keep ``blocks[:resident]`` on ``device``; stream the rest from pinned memory, one block ahead."""

    def __init__(self, blocks, device, resident: int = 0, slots: int = 2, pin: bool = True):
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.resident = max(0, min(int(resident), len(self.blocks)))
        self.streamed = list(range(self.resident, len(self.blocks)))
        self.on_cuda = self.device.type == "cuda"
        self.slots_n = max(1, min(slots, len(self.streamed))) if self.streamed else 0
        self._handles = []
        self._host: dict[int, list[torch.Tensor]] = {}
        self._names = [n for n, _ in _block_tensors(self.blocks[0])] if self.blocks else []
        for block in self.blocks[: self.resident]:
            block.to(self.device)
        for i in self.streamed:
            tensors = []
            for name, t in _block_tensors(self.blocks[i]):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin and self.on_cuda)
                host.copy_(t.detach())
                t.data = host
                tensors.append(host)
            self._host[i] = tensors
        if self.on_cuda:
            torch.cuda.empty_cache()
        template = self._host[self.streamed[0]] if self.streamed else []
        self._slots = [[torch.empty_like(h, device=self.device) for h in template] for _ in range(self.slots_n)]
        self._stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self._copied: dict[int, object] = {}  # block index -> event when its copy is done
        self._slot_free = [None] * self.slots_n  # event after the last block that used the slot
        self._order = {b: k for k, b in enumerate(self.streamed)}
        for i in self.streamed:
            self._handles.append(self.blocks[i].register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(self.blocks[i].register_forward_hook(self._make_post(i)))

    # -- bookkeeping
    def _slot(self, i: int) -> int:
        return self._order[i] % self.slots_n

    def _next(self, i: int) -> int:
        """The streamed block after ``i``; after the last one, the next forward's first."""
        return self.streamed[(self._order[i] + 1) % len(self.streamed)]

    def _prefetch(self, i: int) -> None:
        if i in self._copied:
            return
        slot = self._slot(i)
        if self.on_cuda:
            with torch.cuda.stream(self._stream):
                if self._slot_free[slot] is not None:
                    self._stream.wait_event(self._slot_free[slot])
                for dst, src in zip(self._slots[slot], self._host[i]):
                    dst.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
            self._copied[i] = done
        else:
            for dst, src in zip(self._slots[slot], self._host[i]):
                dst.copy_(src)
            self._copied[i] = True

    def _bind(self, i: int, tensors) -> None:
        for (_, t), new in zip(_block_tensors(self.blocks[i]), tensors):
            t.data = new

    def _make_pre(self, i: int):
        def pre(module, args):
            self._prefetch(i)
            done = self._copied.pop(i)
            if self.on_cuda:
                torch.cuda.current_stream(self.device).wait_event(done)
            self._bind(i, self._slots[self._slot(i)])
            nxt = self._next(i)
            if nxt != i and self._slot(nxt) != self._slot(i):
                self._prefetch(nxt)  # else it waits for this block to finish (post hook)
            return None

        return pre

    def _make_post(self, i: int):
        def post(module, args, output):
            slot = self._slot(i)
            if self.on_cuda:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self._slot_free[slot] = ev
            self._bind(i, self._host[i])
            nxt = self._next(i)
            if nxt != i:
                self._prefetch(nxt)
            return None

        return post

    # -- lifetime
    def close(self, restore_to=None) -> None:
        """Remove the hooks; with ``restore_to`` move every streamed block there (e.g. back to the GPU)."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._copied.clear()
        for i in self.streamed:
            if restore_to is not None:
                self._bind(i, [h.to(restore_to) for h in self._host[i]])
        self._host.clear()
        self._slots = []
        if self.on_cuda:
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ModuleSwapper:
    """Keep a frozen module's weights in pinned host memory and put them on the GPU only while it is used
    (e.g. the 11 GB umT5 text encoder, needed once per shot). ``with swapper.on_device(): ...``"""

    def __init__(self, module: torch.nn.Module, device):
        self.module = module
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self._tensors = [t for _, t in _block_tensors(module)]
        self._host = []
        for t in self._tensors:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            host.copy_(t.detach())
            t.data = host
            self._host.append(host)
        if pin:
            torch.cuda.empty_cache()

    def onload(self) -> None:
        for t, host in zip(self._tensors, self._host):
            t.data = host.to(self.device, non_blocking=True)

    def offload(self) -> None:
        for t, host in zip(self._tensors, self._host):
            t.data = host  # the GPU copies are freed (weights are frozen: nothing to copy back)

    def on_device(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.onload()
            try:
                yield self.module
            finally:
                self.offload()

        return ctx()
