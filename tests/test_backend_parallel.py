"""``ex4d serve --gpus N``'s sequence-parallel model function, checked on CPU: two real processes (gloo)
split the tiny Wan DiT's tokens and must reproduce the single-process ``ex4d_model_fn`` output, with
diffsynth's block forward (speed ``reference``) and with the speed levers' patched block forward.
(NCCL and GPUs are measured by bench/parallel_gpu.py, docs/benchmarks.md section 6.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import os, sys, numpy as np, torch, torch.distributed as dist
from ex4d.generate.architectures import DIT_TINY
from diffsynth.models.wan_video_dit import WanModel
from ex4d.generate.pipeline import ex4d_model_fn
from ex4d.generate import accel
from ex4d.generate.sequence_parallel import SequenceGroup, enable_sequence_parallel, sequence_parallel_model_fn

F, H, W, B = (int(v) for v in sys.argv[2].split(","))
torch.manual_seed(0)
config = dict(DIT_TINY, num_heads=int(sys.argv[4]), dim=128 * int(sys.argv[4]))  # head size 128, as Wan's
dit = WanModel(**config).eval()
if sys.argv[3] == "patched":
    accel.patch_block_forwards(dit)
elif sys.argv[3] == "patched_self":  # a separate self-attention kernel (as --speed fastest's FP8 one)
    accel.patch_block_forwards(dit, self_attention=lambda q, k, v: accel.sdpa_default(q, k, v))
elif sys.argv[3] == "patched_fp8":  # FP8 linears: a batched CFG pair takes the per-branch block (pair_block)
    accel.convert_blocks_to_fp8(dit)
    accel.patch_block_forwards(dit)
g = torch.Generator().manual_seed(1)
S = F * (H // 2) * (W // 2)
inputs = dict(latents=torch.randn(1, 16, F, H, W, generator=g), timestep=torch.tensor([731.0]),
              context=torch.randn(B, 8, DIT_TINY["text_dim"], generator=g), clip_feature=torch.randn(1, 257, 1280, generator=g),
              y=torch.randn(1, 20, F, H, W, generator=g), video_tokens=torch.randn(1, S, config["dim"], generator=g))
with torch.no_grad():
    rank = int(os.environ["RANK"])
    if rank == 0:  # the single-process reference, before the model is patched
        np.save(sys.argv[1] + ".single.npy", ex4d_model_fn(dit, **inputs).numpy())
    dist.init_process_group("gloo")
    sp = SequenceGroup()
    dropped = enable_sequence_parallel(dit, sp)
    out = sequence_parallel_model_fn(dit, sp=sp, **inputs)
    dist.destroy_process_group()
if rank == 0:
    np.save(sys.argv[1] + ".split.npy", out.numpy())
    open(sys.argv[1] + ".dropped", "w").write(",".join(dropped))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, world: int, shape: str, forward: str, heads: int) -> tuple[np.ndarray, np.ndarray, str]:
    script = tmp_path / "sp.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"out{world}"
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(out), shape, forward, str(heads)], env=env, cwd=str(ROOT),
                                      stderr=subprocess.PIPE, text=True))
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        errs.append(err)
        assert p.returncode == 0, err[-3000:]
    return np.load(f"{out}.single.npy"), np.load(f"{out}.split.npy"), Path(f"{out}.dropped").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("shape, forward, heads", [
    ("3,2,6,2", "diffsynth", 2),  # 9 tokens over 2 ranks: one padding token is masked; batched CFG
    ("3,2,6,2", "patched", 2),
    ("2,4,4,1", "patched", 2),  # 8 tokens: no padding, one CFG branch, 1 head per rank
    ("2,4,4,1", "patched", 4),  # 2 heads per rank: head groups side by side again after the way back
    ("2,4,4,2", "diffsynth", 4),
    ("2,4,4,2", "patched_self", 2),  # the separate self-attention kernel gives way to the bf16 one
    ("3,2,6,2", "patched_fp8", 2),  # the per-branch CFG-pair block, padded shard
])
def test_sequence_parallel_matches_single_process(tmp_path, shape, forward, heads):
    single, split, dropped = _run(tmp_path, 2, shape, forward, heads)
    assert dropped == ("fp8_attention" if forward == "patched_self" else "")
    assert split.shape == single.shape
    if forward == "patched_fp8":  # per-token e4m3 rounding may flip a code where float sums differ by an ulp
        assert np.linalg.norm(split - single) / np.linalg.norm(single) < 1e-2
    else:
        np.testing.assert_allclose(split, single, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("world, shape", [
    (4, "3,2,6,2"),  # 9 tokens over 4 ranks: 3 of 12 are padding
    (4, "2,4,4,2"),  # 8 tokens: 2 per rank
    (5, "2,4,4,2"),  # 8 tokens over 5 ranks (40 heads / 5 on the real model): 2 of 10 are padding
])
def test_more_ranks_match_single_process(tmp_path, world, shape):
    """The code path of ``--gpus 4`` and ``--gpus 5``: one head per rank."""
    single, split, _ = _run(tmp_path, world, shape, "patched", world)
    assert split.shape == single.shape
    np.testing.assert_allclose(split, single, rtol=1e-4, atol=1e-5)


def test_more_gpus_than_installed_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ex4d.cli", "serve", "--gpus", "2", "--generator", "ex4d", "--jobs-dir",
                        str(tmp_path / "j")], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert r.returncode == 2
    assert "CUDA GPU" in r.stderr or "NCCL" in r.stderr, r.stderr


@pytest.mark.slow
def test_service_on_two_ranks_matches_one_and_cancels(tmp_path):
    """``ex4d serve --gpus 2`` end to end (torchrun, lock-step generation, agreed cancel) with CPU ranks over
    gloo, against ``--gpus 1``, through a real ZeroMQ client (the GPU run of the same script: benchmarks.md)."""
    import json

    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_parallel_gpu.py"), "--gpus", "2", "--device", "cpu",
                        "--json-out", str(out)], capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    report = json.loads(out.read_text())
    for ranks in ("1_gpus", "2_gpus"):
        run = report[ranks]
        assert run["capabilities"]["parallel_gpus"] == int(ranks[0])
        assert run["cancel"].startswith("cancelled") and run["after_cancel_same_frames"], run
    assert report["frames_max_abs_diff"] <= 1  # float32 sums in another order: at most one level of 255
