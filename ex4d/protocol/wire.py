"""The EX-4D wire protocol: one source of truth for the Blender add-on, the client and the backend.

A message is a ZeroMQ multipart message:

* frame 0: a UTF-8 JSON object (the *header*), at most ``Limits.max_header_bytes``::

      {"v": PROTOCOL_VERSION, "type": "submit", "job": "<32 hex>",
       "arrays": [{"name": "frames", "dtype": "uint8", "shape": [5, 48, 64, 3]}, ...], ...}

* frames 1..n: the raw bytes of each array listed in ``header["arrays"]``, in that order,
  C order, little-endian. They are sent as memoryviews of the arrays (no copy) and received with
  ``np.frombuffer`` (no copy; the received arrays are read-only views of the ZeroMQ frames).

Nothing is ever pickled. Every declared dtype must be in :data:`DTYPES`; declared shapes are checked
against :class:`Limits` *before* any array is created, and then against the real frame length.

This module depends on numpy only (and ``..errors``): the add-on bundles it unchanged.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import Ex4dError, ProtocolError

PROTOCOL_VERSION = 1

# Message types. Client -> server: hello, submit, cancel, status, fetch, heartbeat.
# Server -> client: capabilities, accepted, busy, progress, result, error, status, heartbeat.
CLIENT_TYPES = frozenset({"hello", "submit", "cancel", "status", "fetch", "heartbeat"})
SERVER_TYPES = frozenset({"capabilities", "accepted", "busy", "progress", "result", "error", "status", "heartbeat"})
MESSAGE_TYPES = CLIENT_TYPES | SERVER_TYPES

JOB_KINDS = ("reconstruct", "render", "generate", "shot", "echo")  # echo: diagnostics

# Only plain numeric dtypes travel; byte order is always little-endian on the wire.
DTYPES = {
    "bool": np.dtype(np.bool_),
    "uint8": np.dtype("<u1"),
    "int8": np.dtype("<i1"),
    "uint16": np.dtype("<u2"),
    "int16": np.dtype("<i2"),
    "uint32": np.dtype("<u4"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_ARRAY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

# Error codes sent in ``error`` replies (besides the codes of ex4d.errors classes).
ERR_PROTOCOL = "protocol"  # malformed message
ERR_VERSION = "version"  # wrong protocol version
ERR_TOO_LARGE = "too_large"  # over a limit
ERR_UNKNOWN_JOB = "unknown_job"
ERR_INTERNAL = "internal"  # a bug on the server; the message says what


@dataclass(frozen=True)
class Limits:
    """Bounds on what one message may carry; the server advertises its own in ``capabilities``."""

    max_header_bytes: int = 256 * 1024
    max_arrays: int = 32
    max_ndim: int = 6
    max_array_bytes: int = 2 * 1024**3  # one array: 2 GiB (e.g. 129 frames of 1920x1080 RGB)
    max_message_bytes: int = 4 * 1024**3  # all arrays of one message
    max_preview_bytes: int = 512 * 512 * 3

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Limits":
        d = d or {}
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__ if k in d})


DEFAULT_LIMITS = Limits()


class RemoteError(Ex4dError):
    """An ``error`` reply from the backend; ``code`` is the server's code (e.g. ``out_of_memory``)."""

    def __init__(self, code: str, message: str, job_id: str | None = None):
        super().__init__(message)
        self.code = str(code)
        self.job_id = job_id


class BackendBusy(Ex4dError):
    """The backend's queue is full; try again later."""

    code = "busy"


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_JOB_ID.match(value))


def check_job_id(value: Any) -> str:
    """A job id is 32 lowercase hex digits (a uuid4 without dashes); anything else is refused."""
    if isinstance(value, str) and len(value) == 36 and value.count("-") == 4:
        value = value.replace("-", "")
    if not is_job_id(value):
        raise ProtocolError("job id must be 32 lowercase hex digits")
    return value


@dataclass
class Message:
    """A decoded message: the header's ``type`` and ``job`` pulled out, the rest kept in ``header``."""

    type: str
    job: str | None
    header: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def _wire_array(name: str, arr: Any) -> tuple[dict, np.ndarray]:
    if not isinstance(name, str) or not _ARRAY_NAME.match(name):
        raise ProtocolError(f"array name {name!r} is not a plain identifier")
    a = np.asarray(arr)
    dtype_name = None
    for key, dt in DTYPES.items():
        if a.dtype == dt or (a.dtype.kind == dt.kind and a.dtype.itemsize == dt.itemsize):
            dtype_name = key
            break
    if dtype_name is None:
        raise ProtocolError(f"array '{name}' has dtype {a.dtype}, which does not travel (use one of {', '.join(DTYPES)})")
    want = DTYPES[dtype_name]
    if a.dtype != want:  # big-endian input: convert once
        a = a.astype(want)
    a = np.ascontiguousarray(a)
    return {"name": name, "dtype": dtype_name, "shape": [int(s) for s in a.shape]}, a


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def encode(type: str, job: str | None = None, arrays: Mapping[str, Any] | None = None, **fields: Any) -> list:
    """Build the frames of one message: ``[header bytes, memoryview, ...]`` (arrays are not copied).

    ``fields`` go into the header as they are (JSON; small numpy values and arrays become lists).
    """
    if type not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type '{type}'")
    specs, bufs = [], []
    for name, arr in (arrays or {}).items():
        spec, a = _wire_array(name, arr)
        specs.append(spec)
        # A flat uint8 view: memoryview works for every dtype (bool included) and shares memory.
        bufs.append(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")
    header = {"v": PROTOCOL_VERSION, "type": type, "job": job, "arrays": specs}
    for k, v in fields.items():
        if k in header:
            raise ProtocolError(f"header field '{k}' is reserved")
        header[k] = v
    return [json.dumps(header, default=_json_default, allow_nan=False).encode("utf-8"), *bufs]


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _frame_buffer(frame: Any) -> memoryview:
    """bytes, memoryview or zmq.Frame -> memoryview (zero-copy)."""
    buf = getattr(frame, "buffer", None)
    if buf is not None:
        return buf
    return memoryview(frame)


def decode_header(raw: Any, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Parse and validate frame 0. Raises ProtocolError (code ``protocol``, ``version`` or ``too_large``)."""
    buf = _frame_buffer(raw)
    if buf.nbytes > limits.max_header_bytes:
        raise _err(ERR_TOO_LARGE, f"header is {buf.nbytes} bytes, the limit is {limits.max_header_bytes}")
    try:
        header = json.loads(bytes(buf).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _err(ERR_PROTOCOL, "frame 0 is not a UTF-8 JSON header") from None
    if not isinstance(header, dict):
        raise _err(ERR_PROTOCOL, "header must be a JSON object")
    v = header.get("v")
    if v != PROTOCOL_VERSION:
        raise _err(ERR_VERSION, f"protocol version {v!r} is not supported (this side speaks {PROTOCOL_VERSION}); update the add-on or the backend")
    t = header.get("type")
    if t not in MESSAGE_TYPES:
        raise _err(ERR_PROTOCOL, f"unknown message type {str(t)[:40]!r}")
    job = header.get("job")
    if job is not None and not is_job_id(job):
        raise _err(ERR_PROTOCOL, "job id must be 32 lowercase hex digits")
    specs = header.get("arrays", [])
    if not isinstance(specs, list):
        raise _err(ERR_PROTOCOL, "'arrays' must be a list")
    if len(specs) > limits.max_arrays:
        raise _err(ERR_TOO_LARGE, f"{len(specs)} arrays in one message, the limit is {limits.max_arrays}")
    total = 0
    seen = set()
    for i, spec in enumerate(specs):
        nbytes = _check_spec(i, spec, limits)
        if spec["name"] in seen:
            raise _err(ERR_PROTOCOL, f"array '{spec['name']}' is declared twice")
        seen.add(spec["name"])
        total += nbytes
        if total > limits.max_message_bytes:
            raise _err(ERR_TOO_LARGE, f"message declares more than {limits.max_message_bytes} bytes of arrays")
    return header


def _check_spec(i: int, spec: Any, limits: Limits) -> int:
    if not isinstance(spec, dict):
        raise _err(ERR_PROTOCOL, f"array spec {i} must be an object")
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str) or not _ARRAY_NAME.match(name):
        raise _err(ERR_PROTOCOL, f"array spec {i}: bad name")
    if dtype not in DTYPES:
        raise _err(ERR_PROTOCOL, f"array '{name}': dtype {str(dtype)[:20]!r} is not allowed")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise _err(ERR_PROTOCOL, f"array '{name}': shape must be a list of at most {limits.max_ndim} sizes")
    # bool is a subclass of int in Python: refuse it explicitly.
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape):
        raise _err(ERR_PROTOCOL, f"array '{name}': shape entries must be non-negative integers")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if nbytes > limits.max_array_bytes:
        raise _err(ERR_TOO_LARGE, f"array '{name}' declares {nbytes} bytes, the limit is {limits.max_array_bytes}")
    return nbytes


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate and decode a multipart message (bytes or zmq.Frame). Arrays are zero-copy, read-only views."""
    if not frames:
        raise _err(ERR_PROTOCOL, "empty message")
    header = decode_header(frames[0], limits)
    specs = header.get("arrays", [])
    if len(frames) - 1 != len(specs):
        raise _err(ERR_PROTOCOL, f"header declares {len(specs)} arrays but {len(frames) - 1} data frames came")
    arrays: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames[1:]):
        dt = DTYPES[spec["dtype"]]
        shape = tuple(spec["shape"])
        buf = _frame_buffer(frame)
        want = math.prod(shape) * dt.itemsize
        if buf.nbytes != want:
            raise _err(ERR_PROTOCOL, f"array '{spec['name']}' declares {want} bytes but its frame has {buf.nbytes}")
        arr = np.frombuffer(buf, dtype=dt) if want else np.zeros(0, dtype=dt)
        arrays[spec["name"]] = arr.reshape(shape)
    if header["type"] == "progress" and "preview" in arrays and arrays["preview"].nbytes > limits.max_preview_bytes:
        raise _err(ERR_TOO_LARGE, "progress preview is too large")
    return Message(header["type"], header.get("job"), header, arrays)


def _err(code: str, message: str) -> ProtocolError:
    e = ProtocolError(message)
    e.code = code
    return e


# --------------------------------------------------------------------------------------------------
# Helpers shared by both sides
# --------------------------------------------------------------------------------------------------


def error_fields(exc: BaseException) -> dict:
    """``code`` + one-line ``message`` for an ``error`` reply."""
    code = getattr(exc, "code", None) or ERR_INTERNAL
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, Ex4dError):
        text = f"{type(exc).__name__}: {text}"
    return {"code": str(code), "message": text[:500]}


def make_preview(image: np.ndarray, max_side: int = 128) -> np.ndarray:
    """A small uint8 preview (nearest-neighbour downscale) for ``progress`` messages."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32) * (255.0 if a.dtype.kind == "f" and a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    h, w = a.shape[:2]
    step = max(1, int(math.ceil(max(h, w) / max_side)))
    return np.ascontiguousarray(a[::step, ::step])


def total_bytes(frames: Iterable[Any]) -> int:
    return sum(_frame_buffer(f).nbytes for f in frames)
