"""Backend transport and queue benchmark on loopback (starts its own `ex4d serve` processes).

1. Round trip of a guide set (colour (T,H,W,3) uint8 + mask (T,H,W) bool; EX-4D's 49 x 512x512 by default)
   through an ``echo`` job: client encode + send, server decode + queue, result stored atomically under
   --jobs-dir (npz + json, fsync), result sent back and decoded. Reported as median / min / max over
   repeats, with the server-side store time separated.
2. Queue throughput with the tiny generator: N ``generate`` jobs submitted at once by one client, timed
   from the first submit to the last result, compared with the same generation in the service
   (per-job handler time reported by the backend).

    .venv/bin/python bench/backend_loopback.py [--frames 49 --size 512 --repeats 5 --jobs 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.launch import ServiceProcess  # noqa: E402
from ex4d.protocol import wire  # noqa: E402
from ex4d.protocol.client import Client  # noqa: E402


def guide_set(T: int, S: int):
    rng = np.random.default_rng(0)
    color = rng.integers(0, 256, (T, S, S, 3), dtype=np.uint8)
    mask = rng.random((T, S, S)) > 0.3
    return color, mask


def bench_wire(color, mask, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        frames = wire.encode("result", wire.new_job_id(), {"color": color, "mask": mask})
        msg = wire.decode(frames)
        assert msg.arrays["color"].shape == color.shape
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_round_trip(address, color, mask, repeats):
    rows = []
    with Client(address, timeout_s=60) as c:
        c.hello()
        for _ in range(repeats + 1):  # first one warms up
            t0 = time.perf_counter()
            job = c.submit("echo", {}, {"color": color, "mask": mask})
            t_acc = time.perf_counter()
            r = c.wait(job, timeout_s=120)
            t1 = time.perf_counter()
            assert np.array_equal(r.arrays["mask"], mask) and np.array_equal(r.arrays["color"][-1], color[-1])
            rows.append({"total": t1 - t0, "submit_to_accepted": t_acc - t0, "server_job_s": r.params.get("seconds", 0.0)})
    return rows[1:]


def bench_queue(address, jobs, T, S, steps):
    rng = np.random.default_rng(1)
    color = rng.integers(0, 256, (T, S, S, 3), dtype=np.uint8)
    mask = np.ones((T, S, S), bool)
    mask[:, :, S // 2:] = False
    with Client(address, timeout_s=60) as c:
        caps = c.hello()
        warm = c.submit("generate", {"steps": steps, "seed": 0}, {"color": color, "mask": mask})
        c.wait(warm, timeout_s=600)
        t0 = time.perf_counter()
        ids = [c.submit("generate", {"steps": steps, "seed": i}, {"color": color, "mask": mask}) for i in range(jobs)]
        handler = [c.wait(j, timeout_s=600).params["seconds"] for j in ids]
        wall = time.perf_counter() - t0
    return {"generator": caps["generator"], "jobs": jobs, "wall_s": wall, "jobs_per_s": jobs / wall,
            "handler_s_median": statistics.median(handler), "overhead_per_job_s": (wall - sum(handler)) / jobs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=6, help="generate jobs for the queue test (0 = skip)")
    ap.add_argument("--gen-frames", type=int, default=5)
    ap.add_argument("--gen-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()

    color, mask = guide_set(args.frames, args.size)
    mb = (color.nbytes + mask.nbytes) / 2**20
    out = {"payload_mib": round(mb, 1), "frames": args.frames, "size": args.size}
    out["wire_encode_decode_s"] = bench_wire(color, mask, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        with ServiceProcess(["--generator", "none"], jobs_dir=Path(tmp) / "jobs", log_path=Path(tmp) / "a.log") as svc:
            rows = bench_round_trip(svc.address, color, mask, args.repeats)
        out["round_trip_s"] = {k: {"median": statistics.median(r[k] for r in rows), "min": min(r[k] for r in rows),
                                   "max": max(r[k] for r in rows)} for k in rows[0]}
        print(f"guide set {args.frames}x{args.size}x{args.size} colour + mask = {mb:.1f} MiB")
        print(f"  wire encode+decode in process: {out['wire_encode_decode_s'] * 1e3:.2f} ms")
        for k, v in out["round_trip_s"].items():
            print(f"  {k:>20}: median {v['median']:.3f} s (min {v['min']:.3f}, max {v['max']:.3f})")
        if args.jobs:
            with ServiceProcess(["--generator", "tiny", "--max-queue", str(args.jobs + 1)], jobs_dir=Path(tmp) / "jobs2",
                                log_path=Path(tmp) / "b.log") as svc:
                q = bench_queue(svc.address, args.jobs, args.gen_frames, args.gen_size, args.steps)
            out["queue"] = q
            print(f"queue: {q['jobs']} tiny generate jobs ({args.gen_frames}x{args.gen_size}x{args.gen_size}, {args.steps} steps) "
                  f"in {q['wall_s']:.2f} s = {q['jobs_per_s']:.2f} jobs/s; handler median {q['handler_s_median']:.3f} s; "
                  f"service overhead per job {q['overhead_per_job_s'] * 1e3:.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
