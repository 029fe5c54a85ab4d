"""The wire format (ex4d/protocol/wire.py): round trips, limits checked before allocation, bad input refused.

Pure numpy; one test runs the protocol package in the Blender environment (no torch there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ex4d.errors import Cancelled, OutOfMemoryError, ProtocolError
from ex4d.protocol import wire
from ex4d.protocol.client import _error_for

ROOT = Path(__file__).resolve().parents[1]


def frames_of(msg):
    return [bytes(f) for f in msg]


def header_of(**fields):
    h = {"v": wire.PROTOCOL_VERSION, "type": "submit", "job": None, "arrays": []}
    h.update(fields)
    return json.dumps(h).encode()


@pytest.mark.parametrize("dtype", sorted(wire.DTYPES))
def test_every_dtype_round_trips(dtype):
    rng = np.random.default_rng(0)
    a = (rng.random((3, 4, 5)) * 100).astype(wire.DTYPES[dtype])
    job = wire.new_job_id()
    msg = wire.decode(frames_of(wire.encode("result", job, {"x": a}, params={"k": 1})))
    assert msg.type == "result" and msg.job == job and msg.header["params"] == {"k": 1}
    assert msg.arrays["x"].dtype == wire.DTYPES[dtype] and np.array_equal(msg.arrays["x"], a)


def test_send_and_receive_do_not_copy():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    frames = wire.encode("result", None, {"a": a})
    assert isinstance(frames[1], memoryview) and np.shares_memory(np.frombuffer(frames[1], np.uint8), a)
    buf = bytearray(frames[1])
    out = wire.decode([frames[0], buf]).arrays["a"]
    assert np.shares_memory(out, np.frombuffer(buf, np.uint8))


def test_non_contiguous_big_endian_and_empty_arrays():
    a = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]
    e = np.zeros((0, 3), np.int32)
    msg = wire.decode(frames_of(wire.encode("result", None, {"a": a, "e": e})))
    assert msg.arrays["a"].dtype == np.dtype("<f4") and np.array_equal(msg.arrays["a"], a)
    assert msg.arrays["e"].shape == (0, 3)


def test_object_and_string_arrays_never_travel():
    with pytest.raises(ProtocolError):
        wire.encode("result", None, {"a": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(ProtocolError):
        wire.encode("result", None, {"a": np.array(["text"])})
    with pytest.raises(ProtocolError):
        wire.encode("result", None, {"../etc": np.zeros(2)})


def test_declared_size_is_checked_before_allocation():
    # 10^12 float64 declared, a few bytes sent: refused as too large without allocating anything.
    h = header_of(arrays=[{"name": "x", "dtype": "float64", "shape": [1000000, 1000000]}])
    with pytest.raises(ProtocolError) as e:
        wire.decode([h, b"12345678"])
    assert e.value.code == "too_large"
    small = wire.Limits(max_array_bytes=1000)
    h = header_of(arrays=[{"name": "x", "dtype": "uint8", "shape": [10, 101]}])
    with pytest.raises(ProtocolError, match="limit"):
        wire.decode([h, b"\0" * 1010], small)


@pytest.mark.parametrize(
    "header, data, code",
    [
        (b"\xff\xfe not json", [], "protocol"),
        (b"[1, 2]", [], "protocol"),
        (json.dumps({"v": 99, "type": "hello", "arrays": []}).encode(), [], "version"),
        (json.dumps({"type": "hello", "arrays": []}).encode(), [], "version"),
        (header_of(type="launch_missiles"), [], "protocol"),
        (header_of(job="../../etc/passwd"), [], "protocol"),
        (header_of(arrays=[{"name": "x", "dtype": "object", "shape": [1]}]), [b"x"], "protocol"),
        (header_of(arrays=[{"name": "x", "dtype": "uint8", "shape": [-1]}]), [b""], "protocol"),
        (header_of(arrays=[{"name": "x", "dtype": "uint8", "shape": [True]}]), [b"x"], "protocol"),
        (header_of(arrays=[{"name": "x", "dtype": "uint8", "shape": [2.5]}]), [b"xx"], "protocol"),
        (header_of(arrays=[{"name": "x", "dtype": "uint8", "shape": [4]}]), [b"xyz"], "protocol"),  # truncated
        (header_of(arrays=[{"name": "x", "dtype": "uint8", "shape": [4]}]), [], "protocol"),  # frame missing
        (header_of(arrays=[{"name": "x", "dtype": "uint8", "shape": [1]}] * 2), [b"a", b"b"], "protocol"),
        (header_of(arrays=[{"name": "a b", "dtype": "uint8", "shape": [1]}]), [b"a"], "protocol"),
        (header_of(arrays="x"), [], "protocol"),
        (header_of(arrays=[{"name": "x", "dtype": "uint8", "shape": [1] * 9}]), [b"a"], "protocol"),
        (b"{" + b" " * (300 * 1024) + b"}", [], "too_large"),
    ],
)
def test_malformed_messages_are_refused_with_a_code(header, data, code):
    with pytest.raises(ProtocolError) as e:
        wire.decode([header, *data])
    assert e.value.code == code
    assert "\n" not in str(e.value)


def test_empty_message_and_extra_frames():
    with pytest.raises(ProtocolError):
        wire.decode([])
    with pytest.raises(ProtocolError):
        wire.decode([header_of(), b"surplus"])


def test_job_ids():
    j = wire.new_job_id()
    assert wire.check_job_id(j) == j
    assert wire.check_job_id("12345678-1234-1234-1234-123456789abc") == "12345678123412341234123456789abc"
    for bad in ("", "x" * 32, "../" + "a" * 29, j.upper(), 5, None):
        with pytest.raises(ProtocolError):
            wire.check_job_id(bad)


def test_error_fields_and_mapping_back():
    assert wire.error_fields(Cancelled("cancelled")) == {"code": "cancelled", "message": "cancelled"}
    f = wire.error_fields(ValueError("bad\nsecond line"))
    assert f == {"code": "internal", "message": "ValueError: bad"}
    assert isinstance(_error_for("cancelled", "x", None), Cancelled)
    assert isinstance(_error_for("out_of_memory", "x", None), OutOfMemoryError)
    e = _error_for("something_new", "msg", "a" * 32)
    assert isinstance(e, wire.RemoteError) and e.code == "something_new" and str(e) == "msg"
    assert isinstance(_error_for("busy", "full", None), wire.BackendBusy)


def test_preview_is_small_uint8():
    p = wire.make_preview(np.random.default_rng(0).random((512, 512, 3)), max_side=128)
    assert p.dtype == np.uint8 and max(p.shape[:2]) <= 128


@pytest.mark.skipif(not (ROOT / ".venv-blender/bin/python").exists(), reason="no Blender environment")
def test_protocol_runs_in_blenders_python_without_torch():
    code = (
        "import sys, numpy as np\n"
        "from ex4d.protocol import wire, client, keys\n"
        "m = wire.decode([bytes(f) for f in wire.encode('progress', None, {'preview': np.zeros((4,4,3), np.uint8)}, stage='s', step=1, total=2)])\n"
        "assert m.header['stage'] == 's' and m.arrays['preview'].shape == (4,4,3)\n"
        "c = client.Client('tcp://127.0.0.1:9', timeout_s=0.2); assert not c.alive(); c.close()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print('ok', np.__version__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([str(ROOT / ".venv-blender/bin/python"), "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok 1.")
