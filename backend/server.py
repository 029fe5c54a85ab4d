"""The backend service: a ZeroMQ ROUTER that keeps models warm and runs jobs from a bounded queue.

Threads and sockets (ZeroMQ sockets are single-threaded; each one here is used by one thread only):

* the **socket thread** (:meth:`Server.serve_forever`) owns the ROUTER. It answers hello, status,
  cancel, fetch and heartbeats at once, queues submitted jobs, and forwards what the worker produces;
* the **worker thread** runs one job at a time (:class:`~backend.workers.Engine`) and sends its progress,
  result or error to the socket thread over an ``inproc://`` PAIR socket, which also wakes the poller.

Finished jobs are written to the :class:`~backend.store.JobStore` before their result is sent, so a
client that went away gets them later with ``fetch``, even after a restart of the service.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import zmq

from ex4d import __version__
from ex4d.errors import Cancelled, Ex4dError, InputError, ProtocolError
from ex4d.protocol import wire
from ex4d.protocol.wire import (
    CLIENT_TYPES,
    DEFAULT_LIMITS,
    ERR_INTERNAL,
    ERR_UNKNOWN_JOB,
    PROTOCOL_VERSION,
    Limits,
    check_job_id,
    encode,
    error_fields,
    make_preview,
    new_job_id,
)

from .jobs import CANCELLED, DONE, FAILED, FINISHED, QUEUED, RUNNING, Job, JobTable, QueueFull
from .store import JobStore
from .workers import Engine, check_job


@dataclass
class ServeConfig:
    bind: str = "tcp://127.0.0.1:5555"
    jobs_dir: Path = field(default_factory=lambda: Path("ex4d-jobs"))
    max_queue: int = 8
    ttl_s: float = 24 * 3600.0
    keys_dir: Path | None = None
    heartbeat_s: float = 1.0
    peer_timeout_s: float = 30.0  # stop heartbeating a client not heard from for this long
    progress_interval_s: float = 0.1  # at most ~10 progress messages a second (first/last step always sent)
    limits: Limits = DEFAULT_LIMITS


def is_loopback(address: str) -> bool:
    """True for tcp://127.x / localhost / [::1], and for ipc:// and inproc:// (not on the network)."""
    parts = urlsplit(address)
    if parts.scheme in ("ipc", "inproc"):
        return True
    if parts.scheme != "tcp":
        return False
    host = parts.netloc.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: assume reachable from the network


def check_bind(bind: str, keys_dir) -> None:
    """Binding beyond loopback without CURVE keys is refused (with what to do instead)."""
    if not is_loopback(bind) and keys_dir is None:
        raise InputError(
            f"refusing to listen on {bind} without encryption: binding beyond this machine needs CURVE keys "
            "(run `ex4d keys generate --dir KEYS` and start with --keys-dir KEYS), or bind tcp://127.0.0.1:PORT "
            "and use an SSH tunnel"
        )


def log(msg: str) -> None:
    print(f"[ex4d-backend {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Server:
    def __init__(self, config: ServeConfig, engine: Engine):
        self.config = config
        self.engine = engine
        self.limits = config.limits
        self.store = JobStore(config.jobs_dir, config.ttl_s)
        self.table = JobTable(config.max_queue)
        self._peers: dict[bytes, float] = {}
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._auth = None
        self._router = None
        self._pair = None
        self._worker = None
        self._pair_addr = f"inproc://ex4d-worker-{uuid.uuid4().hex}"
        self._capabilities: dict = {}
        self.address: str | None = None

    # ---------------------------------------------------------------------------------------------
    # start / stop
    # ---------------------------------------------------------------------------------------------

    def start(self) -> str:
        """Check the security rule, bind, reload finished jobs, start the worker. Returns the bound address."""
        cfg = self.config
        check_bind(cfg.bind, cfg.keys_dir)
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client reconnecting with its id takes its route back
        router.setsockopt(zmq.MAXMSGSIZE, int(max(self.limits.max_array_bytes, self.limits.max_header_bytes)))
        if cfg.keys_dir is not None:
            self._enable_curve(router, cfg.keys_dir)
        try:
            router.bind(cfg.bind)
        except zmq.ZMQError as e:
            router.close(0)
            raise InputError(f"cannot listen on {cfg.bind}: {e}") from None
        self._router = router
        self.address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pair = self._ctx.socket(zmq.PAIR)
        self._pair.bind(self._pair_addr)

        self.store.cleanup()
        for rec in self.store.finished():
            job = Job(rec["job"], str(rec.get("kind", "?")), {}, None, None, state=rec.get("state", DONE))
            job.finished, job.error = rec.get("finished"), rec.get("error")
            self.table.add_finished(job)
        self._capabilities = self.engine.capabilities()
        self._worker = threading.Thread(target=self._work_loop, name="ex4d-worker", daemon=True)
        self._worker.start()
        return self.address

    def _enable_curve(self, router, keys_dir) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        from ex4d.protocol.keys import authorized_dir, server_secret

        if not zmq.has("curve"):
            raise InputError("this libzmq has no CURVE support")
        pub, sec = server_secret(keys_dir)
        allowed = authorized_dir(keys_dir)
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(allowed))
        router.curve_server = True
        router.curve_publickey = pub
        router.curve_secretkey = sec

    def stop(self) -> None:
        self._stop.set()
        self.table.wake()

    def close(self) -> None:
        self.stop()
        running = self.table.running
        if running is not None:
            running.cancel.set()
        if self._worker is not None:
            self._worker.join(timeout=10)
        for s in (self._router, self._pair):
            if s is not None:
                s.close(0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # ---------------------------------------------------------------------------------------------
    # socket thread
    # ---------------------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        router, pair = self._router, self._pair
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pair, zmq.POLLIN)
        last_hb = 0.0
        last_expire = time.monotonic()
        while not self._stop.is_set():
            ready = dict(poller.poll(int(self.config.heartbeat_s * 250)))
            if pair in ready:
                self._forward_worker_messages()
            if router in ready:
                for _ in range(256):  # bounded, so heartbeats and worker output still get their turn
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
            now = time.monotonic()
            if now - last_hb >= self.config.heartbeat_s:
                last_hb = now
                self._send_heartbeats(now)
            if now - last_expire >= 60.0:
                last_expire = now
                for job_id in self.store.expire():
                    self.table.forget(job_id)

    def _send(self, peer: bytes, type: str, job: str | None = None, arrays=None, **fields) -> None:
        try:
            self._router.send_multipart([peer, *encode(type, job, arrays, **fields)], copy=False)
        except zmq.ZMQError as e:  # peer gone / HWM: the result stays on disk for fetch
            log(f"could not send {type} to a client: {e}")

    def _send_error(self, peer: bytes, job: str | None, code: str, message: str) -> None:
        self._send(peer, "error", job, code=code, message=message)

    def _send_heartbeats(self, now: float) -> None:
        running = self.table.running
        for peer, seen in list(self._peers.items()):
            if now - seen > self.config.peer_timeout_s:
                del self._peers[peer]
                continue
            self._send(peer, "heartbeat", state="busy" if running else "idle", queue=self.table.queued())

    def _forward_worker_messages(self) -> None:
        while True:
            try:
                frames = self._pair.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            job = self.table.get(frames[0].bytes.decode())
            if job is None:
                continue
            for peer in list(job.watchers):
                try:
                    # memoryviews of the received frames: the same bytes go to every watcher without a copy
                    self._router.send_multipart([peer, *(f.buffer for f in frames[1:])], copy=False)
                except zmq.ZMQError as e:
                    log(f"could not send to a client of job {job.id}: {e}")

    def _handle(self, frames) -> None:
        peer = frames[0].bytes
        is_new = peer not in self._peers
        self._peers[peer] = time.monotonic()
        if is_new:
            self._send(peer, "heartbeat", state="busy" if self.table.running else "idle", queue=self.table.queued())
        msg = None
        try:
            msg = wire.decode(frames[1:], self.limits)
            if msg.type not in CLIENT_TYPES:
                raise ProtocolError(f"'{msg.type}' is not a message a client sends")
            getattr(self, f"_on_{msg.type}")(peer, msg)
        except Ex4dError as e:  # ProtocolError included: code protocol / version / too_large
            self._send(peer, "error", msg.job if msg is not None else None, **error_fields(e))
        except Exception as e:  # a bug: report it, keep serving
            log("error while handling a message:\n" + traceback.format_exc())
            self._send_error(peer, msg.job if msg is not None else None, ERR_INTERNAL, f"{type(e).__name__}: {e}")

    # --- message handlers (socket thread) ---------------------------------------------------------

    def _on_heartbeat(self, peer, msg) -> None:
        pass  # being heard from is all it says

    def _on_hello(self, peer, msg) -> None:
        self._send(peer, "capabilities", None, **self.capabilities())

    def capabilities(self) -> dict:
        return {
            "protocol": PROTOCOL_VERSION,
            "server": f"ex4d-backend {__version__}",
            **self._capabilities,
            "limits": self.limits.to_dict(),
            "max_queue": self.table.max_queue,
            "queue": self.table.queued(),
            "busy": self.table.running is not None,
            "heartbeat_s": self.config.heartbeat_s,
            "ttl_s": self.config.ttl_s,
            "curve": self.config.keys_dir is not None,
        }

    def _on_submit(self, peer, msg) -> None:
        job_id = msg.job or new_job_id()
        if job_id in self.table:
            self._send_error(peer, job_id, "duplicate_job", f"job {job_id} exists already")
            return
        kind, params = msg.header.get("kind"), msg.header.get("params", {})
        try:
            check_job(kind, params, msg.arrays)
        except Ex4dError as e:
            self._send(peer, "error", job_id, **error_fields(e))
            return
        job = Job(job_id, kind, params, dict(msg.arrays), peer)
        try:
            position = self.table.enqueue(job)
        except QueueFull:
            self._send(peer, "busy", job_id, message=f"the backend's queue is full ({self.table.max_queue} jobs waiting); "
                       "try again when one has finished", queue=self.table.queued())
            return
        self._send(peer, "accepted", job_id, kind=kind, position=position, queue=self.table.queued())

    def _job_or_error(self, peer, msg) -> Job | None:
        job = self.table.get(msg.job) if msg.job else None
        if job is None:
            self._send_error(peer, msg.job, ERR_UNKNOWN_JOB,
                             f"the backend does not know job {msg.job} (the backend was restarted since, or the job's result expired "
                             f"after {self.config.ttl_s / 3600:.0f} h or was already fetched)"
                             if msg.job else "this message needs a job id")
        return job

    def _on_cancel(self, peer, msg) -> None:
        job = self._job_or_error(peer, msg)
        if job is None:
            return
        if job.state == QUEUED and self.table.remove_queued(job):
            job.cancel.set()
            err = {"code": Cancelled.code, "message": "cancelled before it started"}
            self.table.finish(job, CANCELLED, err)
            self.store.save(job.id, {"state": CANCELLED, "kind": job.kind, "error": err})
            for target in {*job.watchers, peer}:
                self._send(target, "error", job.id, **err)
        elif job.state == RUNNING:
            job.cancel.set()  # the worker stops within one step and answers the watchers
            if peer not in job.watchers:
                self._send(peer, "status", job.id, **job.summary(), cancelling=True)
        else:
            self._send(peer, "status", job.id, **job.summary())

    def _on_status(self, peer, msg) -> None:
        if msg.job:
            job = self._job_or_error(peer, msg)
            if job is not None:
                self._send(peer, "status", job.id, **job.summary(), position=self.table.position(job))
            return
        running = self.table.running
        self._send(peer, "status", None, queue=self.table.queued(), max_queue=self.table.max_queue,
                   running=running.id if running else None, jobs=[{"job": j.id, **j.summary()} for j in self.table.all()])

    def _on_fetch(self, peer, msg) -> None:
        job = self._job_or_error(peer, msg)
        if job is None:
            return
        if msg.header.get("release"):
            if job.state in FINISHED and self.table.mark_released(job):
                self.store.delete(job.id)
            self._send(peer, "status", job.id, released=job.state in FINISHED, state=job.state)
            return
        if job.state in (QUEUED, RUNNING):
            job.watch(peer)  # progress and the result now go to this client too
            self._send(peer, "status", job.id, **job.summary(), position=self.table.position(job))
        elif job.state == DONE:
            pending = job.result  # still being written to disk: serve it from memory
            if pending is not None:
                params, arrays = pending
            else:
                try:
                    params, arrays = (self.store.record(job.id) or {}).get("params", {}), self.store.arrays(job.id)
                except (OSError, ValueError) as e:
                    self._send_error(peer, job.id, ERR_INTERNAL, f"stored result of job {job.id} is unreadable ({e})")
                    return
            self._send(peer, "result", job.id, arrays, kind=job.kind, params=params)
        else:
            err = job.error or {"code": "error", "message": f"job {job.state}"}
            self._send(peer, "error", job.id, **err)

    # ---------------------------------------------------------------------------------------------
    # worker thread
    # ---------------------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        out = self._ctx.socket(zmq.PAIR)
        out.connect(self._pair_addr)
        try:
            while not self._stop.is_set():
                job = self.table.take(timeout=0.5)
                if job is None:
                    continue
                self._run_job(job, out)
        finally:
            out.close(0)

    def _run_job(self, job: Job, out) -> None:
        jid = job.id.encode()

        def emit(type: str, arrays=None, **fields) -> None:
            out.send_multipart([jid, *encode(type, job.id, arrays, **fields)], copy=False)

        last = {"t": 0.0, "stage": None, "t_stage": time.monotonic()}

        def progress(stage: str, step: int, total: int, preview=None) -> None:
            if job.cancel.is_set():
                raise Cancelled("cancelled")
            now = time.monotonic()
            if stage != last["stage"]:
                last["stage"], last["t_stage"] = stage, now
            step, total = int(step), int(total)
            elapsed = now - last["t_stage"]
            eta = elapsed / step * (total - step) if step > 0 and total >= step else None
            job.stage, job.step, job.total, job.eta = stage, step, total, eta
            if step in (0, total) or now - last["t"] >= self.config.progress_interval_s or stage != last.get("sent_stage"):
                last["t"], last["sent_stage"] = now, stage
                arrays = {"preview": make_preview(preview)} if preview is not None else None
                emit("progress", arrays, stage=stage, step=step, total=total, eta=eta)

        t0 = time.perf_counter()
        try:
            params, arrays = self.engine.run(job.kind, job.params, job.arrays, progress, job.cancel)
            params = dict(params, seconds=round(time.perf_counter() - t0, 3))
            arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
            # Send first, then write to disk (a 49-frame guide set takes 0.2-0.5 s to write on a busy disk):
            # until the write is done, fetch answers from memory. Only a crash inside that window loses a
            # result whose client was not connected.
            job.result, job.saved = (params, arrays), False
            self.table.finish(job, DONE)
            emit("result", arrays, kind=job.kind, params=params)
            try:
                self.store.save(job.id, {"state": DONE, "kind": job.kind, "params": params}, arrays)
            except OSError as e:  # the client has it (or fetches it from memory); keep serving
                log(f"could not write the result of job {job.id} to {self.store.root}: {e}; kept in memory")
            else:
                if self.table.mark_saved(job):
                    self.store.delete(job.id)  # released while it was being written
            log(f"job {job.id} ({job.kind}) done in {params['seconds']:.2f} s")
        except BaseException as e:  # every failure becomes an error reply; the service keeps going
            if isinstance(e, Cancelled) or job.cancel.is_set():
                state, err = CANCELLED, {"code": Cancelled.code, "message": "cancelled"}
            else:
                state, err = FAILED, error_fields(e)
                if not isinstance(e, Ex4dError):
                    log(f"job {job.id} ({job.kind}) failed:\n" + traceback.format_exc())
            try:
                self.store.save(job.id, {"state": state, "kind": job.kind, "error": err})
            except OSError as io:
                log(f"could not store the failure of job {job.id}: {io}")
            self.table.finish(job, state, err)
            emit("error", **err)
            log(f"job {job.id} ({job.kind}) {state}: {err['message']}")
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            job.arrays = None
            self.engine.free_memory(full=job.state != DONE)


def serve(config: ServeConfig, engine: Engine, ready=None) -> int:
    """Load, bind and serve until SIGINT/SIGTERM. ``ready(address)`` is called once listening."""
    import signal

    server = Server(config, engine)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: server.stop())
    address = server.start()
    log(f"listening on {address} (generator {engine.generator_name}, device {engine.device}, "
        f"queue {config.max_queue}, jobs in {config.jobs_dir}{', CURVE on' if config.keys_dir else ''})")
    if ready is not None:
        ready(address)
    try:
        server.serve_forever()
    finally:
        server.close()
        log("stopped")
    return 0
