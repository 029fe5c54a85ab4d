"""CURVE key files for the backend (ZeroMQ's own certificate format, written by ``zmq.auth``).

Layout of a keys folder made by ``ex4d keys generate --dir D``::

    D/server.key          server public key   (give to clients)
    D/server.key_secret   server secret key   (stays on the backend machine)
    D/client.key          client public key
    D/client.key_secret   client secret key   (give to the artist's machine, with server.key)
    D/authorized/         public keys the backend accepts (client.key is copied here; add more)

numpy/pyzmq only: bundled into the Blender add-on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import InputError

SERVER_NAME = "server"
CLIENT_NAME = "client"
AUTHORIZED = "authorized"


def _auth():
    import zmq.auth  # pure Python part of pyzmq

    return zmq.auth


def generate_keys(keys_dir: str | os.PathLike, client_name: str = CLIENT_NAME, overwrite: bool = False) -> dict[str, Path]:
    """Write a server keypair (unless one exists) and a client keypair; authorise the client's public key."""
    import zmq

    if not zmq.has("curve"):
        raise InputError("this pyzmq/libzmq has no CURVE support; install a pyzmq wheel from PyPI")
    d = Path(keys_dir)
    d.mkdir(parents=True, exist_ok=True)
    auth = _auth()
    out: dict[str, Path] = {}
    if overwrite or not (d / f"{SERVER_NAME}.key_secret").exists():
        pub, sec = auth.create_certificates(str(d), SERVER_NAME)
    out["server_public"], out["server_secret"] = d / f"{SERVER_NAME}.key", d / f"{SERVER_NAME}.key_secret"
    if (d / f"{client_name}.key_secret").exists() and not overwrite:
        raise InputError(f"{d / (client_name + '.key_secret')} already exists; choose another --name or pass --overwrite")
    auth.create_certificates(str(d), client_name)
    out["client_public"], out["client_secret"] = d / f"{client_name}.key", d / f"{client_name}.key_secret"
    (d / AUTHORIZED).mkdir(exist_ok=True)
    shutil.copyfile(out["client_public"], d / AUTHORIZED / f"{client_name}.key")
    out["authorized"] = d / AUTHORIZED
    try:
        for name in (out["server_secret"], out["client_secret"]):
            os.chmod(name, 0o600)
    except OSError:  # e.g. Windows
        pass
    return out


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise InputError(f"key file not found: {path}")
    try:
        return _auth().load_certificate(str(path))
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: not a ZeroMQ certificate ({e})") from None


def server_secret(keys_dir: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) of the backend, from D/server.key_secret."""
    pub, sec = _load(Path(keys_dir) / f"{SERVER_NAME}.key_secret")
    if not sec:
        raise InputError(f"{keys_dir}: server.key_secret has no secret key")
    return pub, sec


def server_public(source: str | bytes | os.PathLike) -> bytes:
    """The server's public key from a keys folder, a ``.key`` file, or the 40-character Z85 text itself."""
    if isinstance(source, bytes) and len(source) == 40:
        return source
    s = os.fspath(source) if not isinstance(source, bytes) else source.decode()
    if len(s) == 40 and not os.path.exists(s):
        return s.encode("ascii")
    p = Path(s)
    return _load(p / f"{SERVER_NAME}.key" if p.is_dir() else p)[0]


def client_keypair(source: str | os.PathLike | tuple, client_name: str = CLIENT_NAME) -> tuple[bytes, bytes]:
    """(public, secret) of a client from a keys folder, a ``.key_secret`` file, or a (public, secret) tuple."""
    if isinstance(source, tuple):
        pub, sec = source
        return (pub.encode() if isinstance(pub, str) else pub), (sec.encode() if isinstance(sec, str) else sec)
    p = Path(source)
    pub, sec = _load(p / f"{client_name}.key_secret" if p.is_dir() else p)
    if not sec:
        raise InputError(f"{p}: has no secret key (use the .key_secret file)")
    return pub, sec


def authorized_dir(keys_dir: str | os.PathLike) -> Path:
    d = Path(keys_dir) / AUTHORIZED
    if not d.is_dir() or not any(d.glob("*.key")):
        raise InputError(f"{d}: no authorised client keys (run `ex4d keys generate --dir {keys_dir}`)")
    return d
