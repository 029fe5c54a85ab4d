"""Start and stop an ``ex4d serve`` process (tests, benchmarks, and the add-on's "start local backend").

    with ServiceProcess(["--generator", "tiny"], jobs_dir=tmp) as svc:
        client = Client(svc.address)

The service binds ``tcp://127.0.0.1:*`` (a free port chosen by ZeroMQ) unless ``bind`` is given, and
prints ``ex4d backend ready on ADDRESS`` once it listens; :meth:`ServiceProcess.start` waits for that
line. Its log goes to ``<jobs_dir>/../serve-<pid>.log`` (or ``log_path``). :meth:`stop` sends SIGTERM and
waits; :meth:`kill` sends SIGKILL (crash tests). The process is always reaped on exit of the ``with``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = "ex4d backend ready on "


class ServiceProcess:
    def __init__(self, args: list[str] | None = None, *, jobs_dir: str | os.PathLike, bind: str = "tcp://127.0.0.1:*",
                 python: str | None = None, log_path: str | os.PathLike | None = None, env: dict | None = None,
                 start_timeout_s: float = 120.0):
        self.args = list(args or [])
        self.jobs_dir = Path(jobs_dir)
        self.bind = bind
        self.python = python or sys.executable
        self.log_path = Path(log_path) if log_path else self.jobs_dir.parent / f"serve-{os.getpid()}-{id(self):x}.log"
        self.env = env
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None

    def command(self) -> list[str]:
        return [self.python, "-m", "ex4d.cli", "serve", "--bind", self.bind, "--jobs-dir", str(self.jobs_dir), *self.args]

    def start(self) -> "ServiceProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=log, env=env, text=True,
                                     preexec_fn=_die_with_parent if _PRCTL is not None else None)
        log.close()
        line: list[str] = []

        def read_first_line() -> None:
            for text in self.proc.stdout:
                if text.startswith(READY):
                    line.append(text[len(READY):].strip())
                    return

        reader = threading.Thread(target=read_first_line, daemon=True)
        reader.start()
        reader.join(self.start_timeout_s)
        if not line:
            rc = self.proc.poll()
            self.kill()
            raise RuntimeError(f"ex4d serve did not start (exit code {rc}); log:\n{self.log()[-3000:]}")
        self.address = line[0]
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            try:
                self.proc.stdout.close()
            except OSError:
                pass

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _load_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:
        return None


# Looked up once here: the function below runs between fork and exec, where importing (the import lock may
# be held by another thread of a test process) must not happen.
_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Linux: SIGTERM the service when the process that started it dies (a killed test run leaves nothing)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
