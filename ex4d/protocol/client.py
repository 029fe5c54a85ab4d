"""Client library for the EX-4D backend (a ZeroMQ DEALER). Used by the CLI and by the Blender add-on.

    from ex4d.protocol import Client
    with Client("tcp://127.0.0.1:5555") as c:
        print(c.hello())
        job = c.submit("generate", {"prompt": "...", "seed": 0}, {"color": color, "mask": mask})
        result = c.wait(job, on_progress=lambda ev: print(ev.header["stage"], ev.header["step"]))
        frames = result.arrays["frames"]

Everything is non-blocking underneath: :meth:`poll` returns whatever has arrived (for Blender's timer),
:meth:`wait` loops on it. :meth:`hello`, :meth:`submit` and :meth:`fetch` wait for their answer;
:meth:`hello_nowait`, :meth:`submit_nowait` and :meth:`fetch_nowait` only send, and the answer comes
through :meth:`poll` (what a UI that must never freeze uses). A client object must be used from one thread (ZeroMQ sockets are not
thread-safe). Heartbeats: every call that touches the socket sends one when due; :meth:`alive` is
True while the backend was heard from within ``heartbeat_timeout_s``.

numpy + pyzmq only: bundled into the Blender add-on.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .. import errors
from .wire import (
    DEFAULT_LIMITS,
    ERR_UNKNOWN_JOB,
    JOB_KINDS,
    BackendBusy,
    Limits,
    RemoteError,
    check_job_id,
    decode,
    encode,
    new_job_id,
)

HEARTBEAT_S = 1.0


@dataclass
class Event:
    """Something the backend sent: ``type`` is accepted, progress, result, error, busy, status,
    capabilities or heartbeat; ``header`` is the whole JSON header; ``arrays`` the payload."""

    type: str
    job_id: str | None
    header: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    # Progress conveniences (None on other types).
    @property
    def stage(self) -> str | None:
        return self.header.get("stage")

    @property
    def step(self) -> int | None:
        return self.header.get("step")

    @property
    def total(self) -> int | None:
        return self.header.get("total")


@dataclass
class Result:
    """A finished job: ``params`` (JSON values, e.g. K, fps, timings) and ``arrays`` (numpy)."""

    params: dict
    arrays: dict[str, np.ndarray]
    job_id: str | None = None


def _error_for(code: str, message: str, job_id: str | None) -> errors.Ex4dError:
    """Map an ``error`` reply to the matching ex4d.errors class (Cancelled, OutOfMemoryError, ...)."""
    if code == "busy":
        return BackendBusy(message)
    for cls in _walk(errors.Ex4dError):
        if cls.__dict__.get("code") == code and cls is not errors.Ex4dError:
            e = cls(message)
            e.job_id = job_id
            return e
    return RemoteError(code, message, job_id)


error_for = _error_for  # public name (the add-on maps polled ``error`` events with it)


def _walk(cls):
    yield cls
    for sub in cls.__subclasses__():
        yield from _walk(sub)


class Client:
    """A connection to one backend.

    ``server_key``: the server's CURVE public key (a keys folder, a ``server.key`` file or Z85 text);
    ``client_keys``: this client's keypair (a keys folder, a ``client.key_secret`` file or a
    (public, secret) tuple). Both are needed when the backend runs with ``--keys-dir``.
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        timeout_s: float = 10.0,
        server_key=None,
        client_keys=None,
        heartbeat_s: float = HEARTBEAT_S,
        heartbeat_timeout_s: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
        context=None,
    ):
        import zmq

        self._zmq = zmq
        self.address = address
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self.heartbeat_timeout_s = float(heartbeat_timeout_s or max(3.0 * heartbeat_s, 3.0))
        self.limits = limits
        self.identity = uuid.uuid4().bytes  # fixed for this object: survives reconnects to a restarted backend
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, self.identity)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        s.setsockopt(zmq.MAXMSGSIZE, int(limits.max_message_bytes + limits.max_header_bytes))
        if server_key is not None or client_keys is not None:
            from .keys import client_keypair, server_public

            if server_key is None or client_keys is None:
                raise errors.InputError("CURVE needs both the server's public key and this client's keypair")
            pub, sec = client_keypair(client_keys)
            s.curve_serverkey = server_public(server_key)
            s.curve_publickey = pub
            s.curve_secretkey = sec
        try:
            s.connect(address)
        except zmq.ZMQError as e:
            s.close(0)
            raise errors.InputError(f"cannot use backend address '{address}': {e}") from None
        self._sock = s
        self._poller = zmq.Poller()
        self._poller.register(s, zmq.POLLIN)
        self._events: collections.deque[Event] = collections.deque()
        self._last_rx = 0.0
        self._last_tx = 0.0
        self._was_lost = False
        self._watched: set[str] = set()  # jobs we wait on: re-attached after the backend comes back
        self.capabilities: dict | None = None
        self._closed = False

    # ---------------------------------------------------------------------------------------------
    # low level
    # ---------------------------------------------------------------------------------------------

    def _send(self, type: str, job: str | None = None, arrays: Mapping[str, Any] | None = None, **fields) -> None:
        if self._closed:
            raise errors.ConnectionLost("client is closed")
        frames = encode(type, job, arrays, **fields)
        try:
            # Never block: with no connection at all (backend never reached, or a refused CURVE handshake) a
            # DEALER's send would wait forever - in Blender that would freeze the UI.
            self._sock.send_multipart(frames, flags=self._zmq.NOBLOCK, copy=len(frames) == 1)
        except self._zmq.Again:
            if type == "heartbeat":
                return
            raise errors.ConnectionLost(
                f"cannot reach the backend at {self.address} (no connection; is `ex4d serve` running there, and do "
                "the CURVE keys match?)"
            ) from None
        self._last_tx = time.monotonic()

    def _heartbeat(self) -> None:
        if time.monotonic() - self._last_tx >= self.heartbeat_s:
            self._send("heartbeat")

    def _pump(self, timeout_ms: float = 0) -> int:
        """Receive everything that has arrived (waiting up to ``timeout_ms`` for the first message)."""
        self._heartbeat()
        n = 0
        zmq = self._zmq
        wait = max(0, int(timeout_ms))
        while self._poller.poll(wait):
            wait = 0
            while True:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._last_rx = time.monotonic()
                n += 1
                try:
                    msg = decode(frames, self.limits)
                except errors.ProtocolError as e:  # a bad message from the server: surface it, keep going
                    self._events.append(Event("error", None, {"code": getattr(e, "code", "protocol"), "message": str(e)}))
                    continue
                if msg.type == "status" and msg.header.get("released"):
                    continue  # the answer to a fire-and-forget release
                if msg.type == "capabilities":
                    self._set_capabilities(msg.header)
                self._events.append(Event(msg.type, msg.job, msg.header, msg.arrays))
        if n and self._was_lost:
            # The backend is back (maybe restarted): ask for the jobs we wait on, so their owner is us again.
            self._was_lost = False
            for job in list(self._watched):
                self._send("fetch", job)
        elif not n and self._last_rx and time.monotonic() - self._last_rx > self.heartbeat_timeout_s:
            self._was_lost = True
        return n

    def _take(self, match: Callable[[Event], bool]) -> Event | None:
        for i, ev in enumerate(self._events):
            if match(ev):
                del self._events[i]
                return ev
        return None

    def _request(self, match: Callable[[Event], bool], timeout_s: float | None, what: str) -> Event:
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            ev = self._take(match)
            if ev is not None:
                return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.ConnectionLost(
                    f"no answer from the backend at {self.address} to {what} within "
                    f"{self.timeout_s if timeout_s is None else timeout_s:.0f} s: is `ex4d serve` running there?"
                )
            self._pump(min(left, self.heartbeat_s) * 1000.0)

    # ---------------------------------------------------------------------------------------------
    # API
    # ---------------------------------------------------------------------------------------------

    def hello(self, timeout_s: float | None = None) -> dict:
        """The backend's capabilities: protocol version, generators, devices, gpus, limits, queue size."""
        self.hello_nowait()
        ev = self._request(lambda e: e.type in ("capabilities", "error") and e.job_id is None, timeout_s, "hello")
        if ev.type == "error":
            raise _error_for(ev.header.get("code", "error"), ev.header.get("message", ""), None)
        return self.capabilities

    def hello_nowait(self) -> None:
        """Send hello; the answer comes through :meth:`poll` as a ``capabilities`` event (also stored in
        :attr:`capabilities`) or an ``error`` event without a job id."""
        self._send("hello", client="ex4d-client")

    def _set_capabilities(self, header: dict) -> None:
        self.capabilities = {k: v for k, v in header.items() if k not in ("type", "job", "arrays")}
        if "limits" in self.capabilities:
            self.limits = Limits.from_dict(self.capabilities["limits"])

    def submit(self, kind: str, params: Mapping[str, Any] | None = None, arrays: Mapping[str, np.ndarray] | None = None,
               job_id: str | None = None) -> str:
        """Queue a job; returns its id once the backend accepted it. Raises BackendBusy when the queue is full."""
        arrays = dict(arrays or {})
        job_id = self.submit_nowait(kind, params, arrays, job_id)
        try:
            ev = self._request(lambda e: e.job_id == job_id and e.type in ("accepted", "busy", "error"),
                               self.submit_timeout_s(arrays), f"submit {kind}")
            if ev.type != "accepted":
                raise self.submit_error(ev)
        except BaseException:
            self._watched.discard(job_id)
            raise
        return job_id

    def submit_nowait(self, kind: str, params: Mapping[str, Any] | None = None,
                      arrays: Mapping[str, np.ndarray] | None = None, job_id: str | None = None) -> str:
        """Send a job and return its id at once; the answer comes through :meth:`poll`: ``accepted``, or
        ``busy`` / ``error`` (turn those into an exception with :meth:`submit_error`). Expect it within
        :meth:`submit_timeout_s`."""
        if kind not in JOB_KINDS:
            raise errors.InputError(f"unknown job kind '{kind}' (one of {', '.join(JOB_KINDS)})")
        job_id = check_job_id(job_id) if job_id else new_job_id()
        self._send("submit", job_id, dict(arrays or {}), kind=kind, params=dict(params or {}))
        self._watched.add(job_id)
        return job_id

    def submit_timeout_s(self, arrays: Mapping[str, np.ndarray] | None = None) -> float:
        """How long the answer to a submit may take: large uploads over a slow link take a while."""
        return self.timeout_s + sum(np.asarray(a).nbytes for a in (arrays or {}).values()) / 20e6

    @staticmethod
    def submit_error(ev: Event) -> errors.Ex4dError:
        """The exception for a ``busy`` or ``error`` answer to a submit."""
        return _error_for("busy" if ev.type == "busy" else ev.header.get("code", "error"),
                          ev.header.get("message", "the backend's queue is full; try again later"), ev.job_id)

    def poll(self, timeout_ms: float = 0) -> list[Event]:
        """Every event that has arrived (non-blocking by default); sends a heartbeat when due."""
        self._pump(timeout_ms)
        out = list(self._events)
        self._events.clear()
        for ev in out:
            if ev.type in ("result", "error") and ev.job_id:
                self._watched.discard(ev.job_id)
        return out

    def wait(self, job_id: str, on_progress: Callable[[Event], Any] | None = None, timeout_s: float | None = None,
             cancel: threading.Event | None = None, release: bool = True) -> Result:
        """Block until the job finishes. Progress events go to ``on_progress``; setting ``cancel`` cancels the
        job (raises errors.Cancelled once the backend confirmed). A lost backend raises ConnectionLost after
        ``heartbeat_timeout_s`` without a heartbeat... unless it comes back in time (it is then asked for
        the job again). With ``release`` the backend may delete its stored copy of the result."""
        job_id = check_job_id(job_id)
        self._watched.add(job_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        cancel_sent = False
        lost_since = None
        try:
            while True:
                ev = self._take(lambda e: e.job_id == job_id and e.type in ("progress", "result", "error", "status"))
                if ev is not None:
                    if ev.type == "progress":
                        if on_progress is not None:
                            on_progress(ev)
                    elif ev.type == "result":
                        if release:
                            self.release(job_id)
                        return Result(_params(ev.header), ev.arrays, job_id)
                    elif ev.type == "error":
                        raise _error_for(ev.header.get("code", "error"), ev.header.get("message", ""), job_id)
                    continue  # status (e.g. the answer to a re-attaching fetch)
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    self._send("cancel", job_id)
                    cancel_sent = True
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    raise errors.ConnectionLost(f"job {job_id} did not finish within {timeout_s:.0f} s")
                if self._last_rx and now - self._last_rx > self.heartbeat_timeout_s:
                    lost_since = lost_since or now
                    if now - lost_since > max(self.timeout_s, self.heartbeat_timeout_s):
                        raise errors.ConnectionLost(
                            f"lost the backend at {self.address} (no heartbeat for {now - self._last_rx:.0f} s); "
                            f"job {job_id} may still finish: fetch it later"
                        )
                else:
                    lost_since = None
                self._pump(100)
        finally:
            self._watched.discard(job_id)

    def fetch(self, job_id: str, timeout_s: float | None = None, release: bool = True) -> Result | None:
        """The result of a job submitted earlier (by any client): None while it is queued or running (its
        progress and result now come to this client too), raises the job's error if it failed, RemoteError(unknown_job) if
        the backend does not know it."""
        job_id = self.fetch_nowait(job_id)
        ev = self._request(lambda e: e.job_id == job_id and e.type in ("result", "status", "error"), timeout_s, "fetch")
        if ev.type == "result":
            if release:
                self.release(job_id)
            return Result(_params(ev.header), ev.arrays, job_id)
        if ev.type == "error":
            raise _error_for(ev.header.get("code", ERR_UNKNOWN_JOB), ev.header.get("message", ""), job_id)
        self._watched.add(job_id)
        return None

    def fetch_nowait(self, job_id: str) -> str:
        """Ask for a job without waiting: a ``result``, a ``status`` (still queued or running: its progress
        and result now come here too) or an ``error`` (failed, cancelled, unknown_job) arrives through
        :meth:`poll`. Nothing is released."""
        job_id = check_job_id(job_id)
        self._send("fetch", job_id)
        return job_id

    def release(self, job_id: str) -> None:
        """Tell the backend it may delete the stored result of a finished job (no answer is awaited)."""
        self._send("fetch", check_job_id(job_id), release=True)

    def cancel(self, job_id: str) -> None:
        """Ask the backend to stop the job; its owner then gets an ``error`` with code ``cancelled``."""
        self._send("cancel", check_job_id(job_id))

    def status(self, job_id: str | None = None, timeout_s: float | None = None) -> dict:
        """One job's state (queued/running/done/failed/cancelled, stage, step) or the backend's overview."""
        job = check_job_id(job_id) if job_id else None
        self._send("status", job)
        ev = self._request(lambda e: e.type in ("status", "error") and e.job_id == job and not e.header.get("released"),
                           timeout_s, "status")
        if ev.type == "error":
            raise _error_for(ev.header.get("code", "error"), ev.header.get("message", ""), job)
        return {k: v for k, v in ev.header.items() if k not in ("v", "type", "arrays")}

    def alive(self, wait_ms: float = 0) -> bool:
        """True when the backend was heard from within ``heartbeat_timeout_s``."""
        self._pump(wait_ms)
        return bool(self._last_rx) and time.monotonic() - self._last_rx <= self.heartbeat_timeout_s

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close(0)
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; explicit close() is the rule
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass


def _params(header: dict) -> dict:
    return dict(header.get("params") or {})
