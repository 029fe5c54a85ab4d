"""Finished jobs on disk: ``<jobs-dir>/<job id>.npz`` (arrays) + ``<job id>.json`` (state, params, error).

The JSON file is written last (temp file + ``os.replace``), so a job whose JSON exists is complete; a
crash mid-write leaves only a temp file, which :meth:`JobStore.cleanup` removes on the next start.
File names come from validated job ids only (32 hex digits) - never from anything else a client sent.
Arrays are stored uncompressed: fetching a result is then a plain read.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from ex4d.protocol.wire import check_job_id


class JobStore:
    def __init__(self, root: str | os.PathLike, ttl_s: float = 24 * 3600.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl_s = float(ttl_s)

    def _paths(self, job_id: str) -> tuple[Path, Path]:
        job_id = check_job_id(job_id)
        return self.root / f"{job_id}.npz", self.root / f"{job_id}.json"

    def save(self, job_id: str, record: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Write a finished job atomically. ``record``: state, kind, params or error code/message."""
        npz, meta = self._paths(job_id)
        record = dict(record, job=job_id, finished=time.time(), arrays=sorted(arrays or {}))
        if arrays:
            tmp = npz.with_name(f".{npz.name}.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, npz)
        tmp = meta.with_name(f".{meta.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta)

    def record(self, job_id: str) -> dict | None:
        _, meta = self._paths(job_id)
        try:
            return json.loads(meta.read_text())
        except (OSError, ValueError):
            return None

    def arrays(self, job_id: str) -> dict[str, np.ndarray]:
        npz, _ = self._paths(job_id)
        if not npz.exists():
            return {}
        with np.load(npz, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def delete(self, job_id: str) -> None:
        for p in self._paths(job_id):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def finished(self) -> list[dict]:
        """Every complete job record (used when the service restarts)."""
        out = []
        for meta in sorted(self.root.glob("*.json")):
            stem = meta.stem
            try:
                check_job_id(stem)
            except Exception:
                continue
            rec = self.record(stem)
            if rec is None:
                continue
            if rec.get("arrays") and not self._paths(stem)[0].exists():
                continue  # arrays lost: not fetchable
            out.append(rec)
        return out

    def expire(self, now: float | None = None) -> list[str]:
        """Delete results older than the TTL; returns their ids."""
        now = time.time() if now is None else now
        gone = []
        for rec in self.finished():
            if now - float(rec.get("finished", now)) > self.ttl_s:
                self.delete(rec["job"])
                gone.append(rec["job"])
        return gone

    def cleanup(self) -> None:
        """Remove temp files left by a crash, and npz files whose JSON never got written."""
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for npz in self.root.glob("*.npz"):
            if not npz.with_suffix(".json").exists():
                npz.unlink(missing_ok=True)

    def check_readable(self, job_id: str) -> bool:
        npz, _ = self._paths(job_id)
        try:
            with zipfile.ZipFile(npz):
                return True
        except (OSError, zipfile.BadZipFile):
            return False
