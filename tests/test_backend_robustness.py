"""Service-level failure cases with real ``ex4d serve`` processes (geometry-only, ``--generator none``):
SIGKILL + restart keeps finished results, heartbeats notice a dead backend, CURVE admits only authorised
keys, a non-loopback bind without keys is refused.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from backend.launch import ServiceProcess, wait_until
from ex4d.errors import ConnectionLost
from ex4d.protocol import wire
from ex4d.protocol.client import Client

ROOT = Path(__file__).resolve().parents[1]


def test_killed_service_restarts_with_finished_results(tmp_path):
    jobs = tmp_path / "jobs"
    x = np.random.default_rng(1).random((5, 48, 64)).astype(np.float32)
    svc = ServiceProcess(["--generator", "none", "--heartbeat", "0.2"], jobs_dir=jobs, log_path=tmp_path / "a.log").start()
    try:
        with Client(svc.address, timeout_s=3, heartbeat_s=0.2, heartbeat_timeout_s=1.0) as c:
            done = c.submit("echo", {}, {"x": x})
            assert np.array_equal(c.wait(done, release=False, timeout_s=30).arrays["x"], x)
            running = c.submit("echo", {"steps": 100, "step_seconds": 0.1}, {"x": x})
            assert wait_until(lambda: c.status(running)["state"] == "running", 20)
            assert c.alive()
            svc.kill()  # SIGKILL mid-job
            assert wait_until(lambda: not c.alive(), 5), "client did not notice the dead backend"
            with pytest.raises(ConnectionLost, match="no heartbeat"):  # not the deadline: the heartbeat gap
                c.wait(running, timeout_s=60)
    finally:
        svc.kill()
    assert (jobs / f"{done}.json").exists()
    svc2 = ServiceProcess(["--generator", "none"], jobs_dir=jobs, log_path=tmp_path / "b.log").start()
    try:
        with Client(svc2.address, timeout_s=20) as c:  # a new client (new identity) on the restarted service
            r = c.fetch(done)
            assert r is not None and np.array_equal(r.arrays["x"], x)
            with pytest.raises(wire.RemoteError) as e:  # the job that was running when the service died is gone
                c.fetch(running)
            assert e.value.code == "unknown_job"
            with pytest.raises(wire.RemoteError):  # released by the fetch above
                c.fetch(done)
    finally:
        assert svc2.stop() == 0
    assert not list(jobs.glob(".*.tmp"))


def test_non_loopback_bind_without_keys_is_refused(tmp_path):
    for bind in ("tcp://0.0.0.0:45123", "tcp://*:45123"):
        r = subprocess.run([sys.executable, "-m", "ex4d.cli", "serve", "--bind", bind, "--generator", "none",
                            "--jobs-dir", str(tmp_path / "j")], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert r.returncode == 2 and "refusing to listen" in r.stderr and "--keys-dir" in r.stderr


def test_curve_admits_only_authorised_keys(tmp_path):
    keys, other = tmp_path / "keys", tmp_path / "other"
    for d in (keys, other):
        r = subprocess.run([sys.executable, "-m", "ex4d.cli", "keys", "generate", "--dir", str(d)], capture_output=True,
                           text=True, timeout=60, cwd=str(ROOT))
        assert r.returncode == 0, r.stderr
    assert (keys / "authorized" / "client.key").exists()
    svc = ServiceProcess(["--generator", "none", "--keys-dir", str(keys)], jobs_dir=tmp_path / "jobs",
                         log_path=tmp_path / "curve.log").start()
    try:
        with Client(svc.address, timeout_s=20, server_key=keys, client_keys=keys) as good:
            assert good.hello()["curve"] is True
            job = good.submit("echo", {}, {"x": np.arange(3, dtype=np.int64)})
            assert list(good.wait(job, timeout_s=30).arrays["x"]) == [0, 1, 2]
        # right server key, unknown client key: the handshake is refused, nothing is answered
        with Client(svc.address, timeout_s=1.5, server_key=keys, client_keys=other) as stranger:
            with pytest.raises(ConnectionLost):
                stranger.hello()
        with Client(svc.address, timeout_s=1.5) as plain:  # no encryption at all
            with pytest.raises(ConnectionLost):
                plain.hello()
        r = subprocess.run([sys.executable, "-m", "ex4d.cli", "client", "ping", "--address", svc.address, "--keys-dir",
                            str(keys)], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert r.returncode == 0 and '"curve": true' in r.stdout
        assert svc.alive()
    finally:
        assert svc.stop() == 0


def test_waiting_client_reattaches_after_a_restart(tmp_path):
    """A client waiting on a job notices the backend died, reconnects to the restarted one on the same
    address by itself, and asks for its job again: a finished one is delivered, a lost one reported."""
    jobs = tmp_path / "jobs"
    svc = ServiceProcess(["--generator", "none", "--heartbeat", "0.2"], jobs_dir=jobs, log_path=tmp_path / "a.log").start()
    address = svc.address
    try:
        with Client(address, timeout_s=30, heartbeat_s=0.2, heartbeat_timeout_s=0.8) as c:
            job = c.submit("echo", {"steps": 100, "step_seconds": 0.1}, {"x": np.ones(4)})
            assert wait_until(lambda: c.status(job)["state"] == "running", 20)
            svc.kill()
            assert wait_until(lambda: not c.alive(), 5)
            svc = ServiceProcess(["--generator", "none", "--heartbeat", "0.2"], jobs_dir=jobs, bind=address,
                                 log_path=tmp_path / "b.log").start()
            t0 = time.monotonic()
            with pytest.raises(wire.RemoteError) as e:
                c.wait(job, timeout_s=30)
            assert e.value.code == "unknown_job" and time.monotonic() - t0 < 15
            assert c.alive()
            again = c.submit("echo", {}, {"x": np.ones(4)})  # the same client object keeps working
            assert np.array_equal(c.wait(again, timeout_s=20).arrays["x"], np.ones(4))
    finally:
        svc.kill()
