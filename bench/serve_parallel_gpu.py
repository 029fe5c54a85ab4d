"""``ex4d serve --gpus N`` end to end on a GPU machine: the torchrun launch, NCCL, lock-step generation and
cancel, through a real ZeroMQ client, compared with ``ex4d serve --gpus 1``.

    python bench/serve_parallel_gpu.py --gpus 2 --json-out $OUT/serve_parallel.json
    python bench/serve_parallel_gpu.py --gpus 2 --device cpu   # CPU ranks over gloo (tests/test_backend_parallel.py)

Both backends run the ``tiny`` generator (the same pipeline classes with seeded random weights: the full
model's weights cannot be downloaded here; bench/parallel_gpu.py measures the full-size model). Per
backend: start-up seconds until it answers, one generation (frames compared between the two backends),
and one long generation cancelled after its first denoising step (every rank must stop, and the backend
must then run the next job).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clip(frames=9, size=64):
    import numpy as np

    rng = np.random.default_rng(0)
    color = rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8)
    mask = np.ones((frames, size, size), bool)
    mask[1:, :, size // 2:] = False
    return color, mask


def one_backend(gpus: int, jobs_dir: str, device: str = "cuda") -> dict:
    import numpy as np

    from ex4d.errors import Cancelled
    from ex4d.protocol.client import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "ex4d.cli", "serve", "--generator", "tiny", "--device", device, "--gpus", str(gpus),
           "--bind", address, "--jobs-dir", jobs_dir]
    log = open(jobs_dir + ".log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    entry: dict = {"gpus": gpus}
    try:
        client = Client(address, timeout_s=300)
        entry["capabilities"] = {k: v for k, v in client.hello(timeout_s=300).items() if k in ("generator", "parallel_gpus", "speed")}
        entry["ready_s"] = round(time.perf_counter() - t0, 1)
        color, mask = clip()
        t = time.perf_counter()
        result = client.wait(client.submit("generate", {"seed": 1, "steps": 3}, {"color": color, "mask": mask}))
        entry["generate_s"] = round(time.perf_counter() - t, 2)
        frames = result.arrays["frames"]
        # cancel after the first denoising step of a long job; then the service must still work
        cancel = threading.Event()

        def on_progress(ev):
            if ev.stage == "denoise" and ev.step >= 1:
                cancel.set()

        job = client.submit("generate", {"seed": 2, "steps": 200}, {"color": color, "mask": mask})
        t = time.perf_counter()
        try:
            client.wait(job, on_progress=on_progress, cancel=cancel)
            entry["cancel"] = "not cancelled"
        except Cancelled:
            entry["cancel"] = f"cancelled in {time.perf_counter() - t:.2f} s"
        again = client.wait(client.submit("generate", {"seed": 1, "steps": 3}, {"color": color, "mask": mask}))
        entry["after_cancel_same_frames"] = bool(np.array_equal(again.arrays["frames"], frames))
        client.close()
        return entry, frames
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        with open(jobs_dir + ".log") as f:
            entry["log_tail"] = f.read()[-1500:]


def main(argv=None) -> int:
    import tempfile

    import numpy as np

    from ex4d.camera import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--device", default="cuda", help="cpu: the ranks are CPU processes over gloo (a logic check)")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {}
        for gpus in dict.fromkeys((1, args.gpus)):
            try:
                report[f"{gpus}_gpus"], outputs[gpus] = one_backend(gpus, os.path.join(tmp, f"jobs{gpus}"), args.device)
            except Exception as e:  # noqa: BLE001 - report it
                report[f"{gpus}_gpus"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        if len(outputs) == 2:
            a, b = (outputs[g].astype(np.float32) for g in (1, args.gpus))
            mse = float(((a - b) ** 2).mean())
            report["frames_psnr_db_n_vs_1"] = 100.0 if mse == 0 else round(10 * np.log10(255**2 / mse), 2)
            report["frames_max_abs_diff"] = int(np.abs(a - b).max())
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        atomic_write_text(args.json_out, text)
    ok = all("error" not in v for v in report.values() if isinstance(v, dict))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
