"""The denoising stage on one GPU and on N GPUs with sequence parallelism, in one torchrun job.

    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/parallel_gpu.py --json-out $OUT/parallel.json
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/parallel_gpu.py --tiny --device cpu --steps 2

Every rank builds the full Wan2.1-I2V-14B + EX-4D adapter with the same seeded random weights through
``assemble_pipeline`` (the product's load path; memory mode resident, speed per ``--speeds``) and encodes
the same synthetic guide clip. Then, per speed:

1. **one GPU**: rank 0 alone runs the whole denoising stage (512x512x49, 25 steps, CFG 5) with the
   ordinary model function, after one untimed warm-up step (compilation); the other ranks wait.
2. **N GPUs**: every rank makes the pipeline sequence parallel
   (:func:`ex4d.generate.sequence_parallel.make_sequence_parallel`) and the same stage runs split over all
   ranks, again after one untimed warm-up step.
3. **all-to-all alone**: one step's all-to-alls (q, k, v, output per block and CFG branch) through NCCL
   on ready buffers of the real size, without compute.

Reported: seconds per step (median) and for the stage, the speed-up, per-step cosine similarity of the
N-GPU noise prediction against the one-GPU one (same weights, same inputs), peak memory per rank, and the
expected step time for 4 and 8 GPUs (:func:`derive`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GiB = 1024**3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speeds", default="fast", help="comma list of reference, fast, fastest")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--tiny", action="store_true", help="tiny random model (CPU logic check with --device cpu)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--profile-steps", type=int, default=0, help="profile this many N-GPU steps (torch.profiler, rank 0)")
    p.add_argument("--json-out")
    return p.parse_args(argv)


class Clock:
    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()


def timed_denoise(pipe, cond, noise, steps: int, clock) -> tuple[dict, list]:
    """One warm-up step, then the whole stage; per-step seconds and the noise predictions (on CPU)."""
    import torch

    pipe.scheduler.set_timesteps(steps, denoising_strength=1.0, shift=5.0)
    with torch.no_grad():
        pipe.predict_noise(noise.float(), pipe.scheduler.timesteps[:1], cond)
    inner = pipe.predict_noise
    had_override = "predict_noise" in pipe.__dict__
    marks, preds = [], []

    def predict(latents, timestep, c):
        out = inner(latents, timestep, c)
        marks.append(clock())
        preds.append(out.float().cpu())
        return out

    pipe.predict_noise = predict
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = clock()
        latents = pipe.denoise(cond, noise, steps=steps)
        total = clock() - t0
    finally:
        if had_override:
            pipe.predict_noise = inner
        else:
            del pipe.predict_noise
    per_step = [b - a for a, b in zip([t0] + marks, marks)]  # includes the scheduler step and the copy to CPU
    entry = {"denoise_s": round(total, 3), "median_step_s": round(statistics.median(per_step), 4),
             "per_step_s": [round(s, 4) for s in per_step],
             "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if clock.cuda else None}
    return entry, preds + [latents.float().cpu()]


def all_to_all_seconds(sp, pipe, tokens: int, batch: int, clock, repeats: int = 3) -> float:
    """Seconds of one step's Ulysses traffic through NCCL alone, on ready buffers: per block and CFG
    branch, the q, k, v and output all-to-alls of this rank's (N, S/N, n/N, d) blocks."""
    import torch

    attn = pipe.dit.blocks[0].self_attn
    local = -(-tokens // sp.world)
    device = next(pipe.dit.parameters()).device
    send = torch.empty(local * attn.dim, device=device, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    best = float("inf")
    for _ in range(repeats):
        sp.barrier()
        t = clock()
        for _ in range(len(pipe.dit.blocks) * batch * 4):
            sp.dist.all_to_all_single(recv, send, group=sp.group)
        best = min(best, clock() - t)
    return best


def derive(entry: dict, n: int) -> None:
    """Speed-ups and the expected step on M GPUs from the measured one- and N-GPU steps.

    The N-GPU step is t1/N (the work split N ways: every op of a block is per token or, for attention,
    per head) plus what the split costs beyond that (all-to-all not hidden by compute, NCCL kernels taking
    SMs from compute, the unsplit embedding and head). That excess is assumed to scale with the data each
    GPU sends per step, (M-1)/M^2 of a whole q/k/v/output set, at the per-GPU link speed measured here
    (NVSwitch gives every GPU of an 8-GPU H100/H200 board the same NVLink bandwidth)."""
    one, split = entry["one_gpu"], entry[f"{n}_gpus"]
    t1, tn = one["median_step_s"], split["median_step_s"]
    entry["speedup_denoise_stage"] = round(one["denoise_s"] / split["denoise_s"], 3)
    entry["speedup_median_step"] = round(t1 / tn, 3)
    excess = max(tn - t1 / n, 0.0)
    traffic = lambda m: (m - 1) / m**2  # noqa: E731 - per-GPU share of one step's q/k/v/output data
    entry["step_breakdown_s"] = {"even_split": round(t1 / n, 4), "beyond_even_split": round(excess, 4)}
    entry["expected_step_s"] = {str(m): round(t1 / m + excess * traffic(m) / traffic(n), 3) for m in (2, 4, 8)}
    entry["expected_speedup"] = {m: round(t1 / s, 2) for m, s in entry["expected_step_s"].items()}


def profile_steps(pipe, cond, noise, args, sp) -> list[str]:
    """The busiest CUDA kernels of a few steps (rank 0's view), as text rows."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    pipe.scheduler.set_timesteps(args.steps, denoising_strength=1.0, shift=5.0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        for timestep in pipe.scheduler.timesteps[: args.profile_steps]:
            pipe.predict_noise(noise.float(), timestep[None], cond)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if sp.rank != 0:
        return []
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total", row_limit=25, max_name_column_width=60)
    return table.splitlines()


def cosine(a, b) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def run_speed(args, speed: str, sp, device, clock) -> dict:
    import numpy as np
    import torch

    from ex4d.commands.bench import synthetic_guides
    from ex4d.generate.architectures import build_random_components, tiny_tokenizer
    from ex4d.generate.pipeline import assemble_pipeline
    from ex4d.generate.sequence_parallel import make_sequence_parallel

    entry: dict = {"speed": speed}
    notes: list = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    arch = "tiny" if args.tiny else "i2v-14b"
    components = build_random_components(arch, seed=0, device=device, dtype=dtype,
                                         tokenizer=tiny_tokenizer(seq_len=32 if args.tiny else 512))
    pipe = assemble_pipeline(components, device=device, dtype=dtype, adapter_state="random", memory_mode="resident",
                             speed=speed, notice=notes.append)
    del components
    entry["levers"] = pipe.speed_report
    color, mask = synthetic_guides(np, args.frames, args.size)
    prompt, negative = "4K ultra HD, surround motion, cinematic quality", "blurred details, worst quality, static"
    cond = pipe.prepare(color, mask, prompt=prompt, negative_prompt=negative, cfg=args.cfg)
    noise = pipe.initial_noise(args.frames, args.size, args.size, 0)
    tokens = cond.video_tokens.shape[1]
    batch = 2 if pipe.batch_cfg else 1

    one = None
    if sp.rank == 0:
        t = clock()
        entry["one_gpu"], one = timed_denoise(pipe, cond, noise, args.steps, clock)
        entry["one_gpu"]["wall_with_warmup_s"] = round(clock() - t, 1)
        print(json.dumps({speed: {"one_gpu": entry["one_gpu"]["median_step_s"]}}), file=sys.stderr, flush=True)
    sp.barrier()

    make_sequence_parallel(pipe, sp, notice=notes.append)
    t = clock()
    split, many = timed_denoise(pipe, cond, noise, args.steps, clock)
    split["wall_with_warmup_s"] = round(clock() - t, 1)
    peaks = sp.all_gather(torch.tensor([split["peak_gib"] or 0.0], device=sp._device()), dim=0)
    split["peak_gib_per_rank"] = [round(float(v), 2) for v in peaks]
    nccl = all_to_all_seconds(sp, pipe, tokens, batch, clock)
    if args.profile_steps:
        entry["profile"] = profile_steps(pipe, cond, noise, args, sp)
    entry[f"{sp.world}_gpus"] = split
    entry["nccl_all_to_all_s_per_step"] = round(nccl, 4)
    entry["tokens"], entry["cfg_batch"] = tokens, batch
    entry["notices"] = notes
    if sp.rank == 0:
        derive(entry, sp.world)
        cos = [cosine(a, b) for a, b in zip(one[:-1], many[:-1])]
        entry["noise_pred_cosine_vs_one_gpu"] = {"min": round(min(cos), 6), "per_step": [round(c, 6) for c in cos]}
        entry["final_latents_cosine_vs_one_gpu"] = round(cosine(one[-1], many[-1]), 6)
    del pipe, cond, noise
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from ex4d.camera import atomic_write_text
    from ex4d.generate.sequence_parallel import init_sequence_group

    sp = init_sequence_group("nccl" if args.device == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    clock = Clock(torch, device)
    report: dict = {"gpus": sp.world, "steps": args.steps, "frames": args.frames, "size": args.size, "cfg": args.cfg,
                    "arch": "tiny" if args.tiny else "i2v-14b", "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "speeds": {}}
    ok = True
    for speed in [s.strip() for s in args.speeds.split(",") if s.strip()]:
        try:
            report["speeds"][speed] = run_speed(args, speed, sp, device, clock)
        except Exception as e:  # noqa: BLE001 - keep the other speeds' numbers
            ok = False
            report["speeds"][speed] = {"error": f"{type(e).__name__}: {e}"[:1500], "traceback": traceback.format_exc()[-2000:]}
            print(report["speeds"][speed]["traceback"], file=sys.stderr, flush=True)
            break  # a failed collective leaves the group unusable
    if sp.rank == 0:
        text = json.dumps(report, indent=1)
        print(text)
        if args.json_out:
            atomic_write_text(args.json_out, text)
    sp.dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
