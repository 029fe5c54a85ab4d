"""The backend's job store and queue without a service: atomic files, restart, TTL, bounded FIFO."""

from __future__ import annotations

import time

import numpy as np
import pytest

from backend.jobs import CANCELLED, DONE, QUEUED, RUNNING, Job, JobTable, QueueFull
from backend.server import is_loopback
from backend.store import JobStore
from ex4d.errors import ProtocolError
from ex4d.protocol.wire import new_job_id


def test_store_round_trip_restart_and_ttl(tmp_path):
    store = JobStore(tmp_path, ttl_s=3600)
    a, b = new_job_id(), new_job_id()
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.save(a, {"state": DONE, "kind": "echo", "params": {"k": 1}}, {"x": x, "m": x > 3})
    store.save(b, {"state": CANCELLED, "kind": "generate", "error": {"code": "cancelled", "message": "cancelled"}})
    (tmp_path / f".{new_job_id()}.npz.tmp").write_bytes(b"half")  # a crash mid-write
    (tmp_path / f"{new_job_id()}.npz").write_bytes(b"no json")  # arrays without their record
    again = JobStore(tmp_path, ttl_s=3600)
    again.cleanup()
    assert sorted(r["job"] for r in again.finished()) == sorted([a, b])
    assert again.record(a)["params"] == {"k": 1} and again.record(b)["error"]["code"] == "cancelled"
    arrays = again.arrays(a)
    assert np.array_equal(arrays["x"], x) and arrays["m"].dtype == bool
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{a}.npz", f"{a}.json", f"{b}.json"])
    assert again.expire() == []  # young results stay
    assert sorted(again.expire(now=time.time() + 7200)) == sorted([a, b])
    assert not list(tmp_path.iterdir())


def test_store_never_uses_client_text_as_a_path(tmp_path):
    store = JobStore(tmp_path)
    for bad in ("../../etc/passwd", "a" * 31, "A" * 32, "x/../" + "a" * 27):
        with pytest.raises(ProtocolError):
            store.save(bad, {"state": DONE})
    assert not list(tmp_path.iterdir())


def test_queue_is_bounded_fifo_and_cancel_removes_queued():
    table = JobTable(max_queue=2)
    jobs = [Job(new_job_id(), "echo", {}, {}, b"peer") for _ in range(3)]
    assert table.enqueue(jobs[0]) == 0 and table.enqueue(jobs[1]) == 1
    with pytest.raises(QueueFull):
        table.enqueue(jobs[2])
    first = table.take(timeout=0.1)
    assert first is jobs[0] and first.state == RUNNING and table.running is first
    assert table.position(jobs[1]) == 1
    assert table.remove_queued(jobs[1]) and not table.remove_queued(first)
    table.finish(first, DONE)
    assert first.arrays is None and table.running is None and table.take(timeout=0.01) is None
    assert jobs[1].state == QUEUED and table.queued() == 0


@pytest.mark.parametrize("address, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.0.0.2:1", True), ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True), ("ipc:///tmp/ex4d.sock", True), ("tcp://127.0.0.1:*", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://eth0:5555", False),
    ("tcp://192.168.1.5:5555", False), ("tcp://gpu-box:5555", False), ("udp://127.0.0.1:1", False),
])
def test_loopback_detection(address, local):
    assert is_loopback(address) is local


def test_gpu_out_of_memory_in_a_job_becomes_a_one_line_error():
    import torch

    from backend import workers
    from ex4d.errors import OutOfMemoryError

    def exhausts_memory(engine, params, arrays, progress, cancel):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    workers.HANDLERS["oom_probe"] = exhausts_memory
    try:
        engine = workers.Engine(generator="none", device="cpu")
        engine.load()
        with pytest.raises(OutOfMemoryError) as e:
            engine.run("oom_probe", {}, {}, lambda *a, **k: None, None)
        assert e.value.code == "out_of_memory" and "\n" not in str(e.value) and "memory-mode" in str(e.value)
    finally:
        del workers.HANDLERS["oom_probe"]
