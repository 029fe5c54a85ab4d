"""Jobs, their states and the bounded queue the worker takes them from.

States: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``. Finished jobs live in the
:class:`~backend.store.JobStore`; the table keeps a small record of them (no arrays) so that status and
fetch answer without reading the disk.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


@dataclass
class Job:
    id: str
    kind: str
    params: dict
    arrays: dict[str, np.ndarray] | None
    owner: bytes | None  # ZeroMQ routing id of the client that submitted it
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    stage: str | None = None
    step: int = 0
    total: int = 0
    eta: float | None = None
    error: dict | None = None  # {"code", "message"} once failed or cancelled
    cancel: threading.Event = field(default_factory=threading.Event)
    # A finished result is sent first and written to disk right after; until then it is served from here.
    result: tuple[dict, dict] | None = None
    saved: bool = True
    released: bool = False
    # Clients that get its progress and result: the submitter, and whoever fetched it while it ran.
    watchers: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.owner is not None and self.owner not in self.watchers:
            self.watchers.append(self.owner)

    def watch(self, peer: bytes) -> None:
        if peer not in self.watchers:
            self.watchers.append(peer)
            del self.watchers[:-8]  # a few reconnects' worth; stale routes are dropped by ZeroMQ anyway

    def summary(self) -> dict[str, Any]:
        out = {"kind": self.kind, "state": self.state, "created": self.created}
        if self.state == RUNNING:
            out.update(stage=self.stage, step=self.step, total=self.total, eta=self.eta, started=self.started)
        if self.finished:
            out["finished"] = self.finished
        if self.error:
            out["error"] = dict(self.error)
        return out


class QueueFull(Exception):
    pass


class JobTable:
    """Every known job by id, and the FIFO of queued ones (bounded). Thread-safe."""

    def __init__(self, max_queue: int):
        self.max_queue = int(max_queue)
        self._jobs: dict[str, Job] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self.running: Job | None = None

    def __contains__(self, job_id: str) -> bool:
        with self._cond:
            return job_id in self._jobs

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def add_finished(self, job: Job) -> None:
        with self._cond:
            self._jobs[job.id] = job

    def enqueue(self, job: Job) -> int:
        """Queue a job; returns its position (0 = next). Raises QueueFull."""
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull()
            self._jobs[job.id] = job
            self._queue.append(job)
            self._cond.notify()
            return len(self._queue) - 1 + (self.running is not None)

    def take(self, timeout: float) -> Job | None:
        """The next queued job (marked running), or None after ``timeout`` seconds."""
        with self._cond:
            if not self._queue:
                self._cond.wait(timeout)
            if not self._queue:
                return None
            job = self._queue.popleft()
            job.state, job.started = RUNNING, time.time()
            self.running = job
            return job

    def finish(self, job: Job, state: str, error: dict | None = None) -> None:
        with self._cond:
            job.state, job.finished, job.error = state, time.time(), error
            job.arrays = None  # free the inputs
            if self.running is job:
                self.running = None

    def remove_queued(self, job: Job) -> bool:
        """Take a queued job out of the queue (for cancel). False if it already started."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            return True

    def mark_saved(self, job: Job) -> bool:
        """The worker finished writing the result; True if the client already released it (delete it now)."""
        with self._cond:
            job.saved, job.result = True, None
            return job.released

    def mark_released(self, job: Job) -> bool:
        """A client released the result; True if it is on disk already (delete it now), else the worker will."""
        with self._cond:
            job.released = True
            self._jobs.pop(job.id, None)
            return job.saved

    def forget(self, job_id: str) -> None:
        with self._cond:
            self._jobs.pop(job_id, None)

    def position(self, job: Job) -> int | None:
        with self._cond:
            for i, j in enumerate(self._queue):
                if j is job:
                    return i + (self.running is not None)
            return None

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def all(self) -> list[Job]:
        with self._cond:
            return list(self._jobs.values())

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
