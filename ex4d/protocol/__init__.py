"""Wire protocol and client library of the EX-4D backend (numpy + pyzmq only; bundled into the add-on).

``wire`` defines the messages (one source of truth), ``client`` the DEALER client, ``keys`` CURVE key files.
pyzmq is imported only when a Client is made, so ``wire`` can be used without it.
"""

from .wire import (
    DTYPES,
    JOB_KINDS,
    PROTOCOL_VERSION,
    BackendBusy,
    Limits,
    Message,
    RemoteError,
    check_job_id,
    decode,
    encode,
    new_job_id,
)


def __getattr__(name):
    if name in ("Client", "Event", "Result"):
        from . import client

        return getattr(client, name)
    raise AttributeError(name)


__all__ = ["Client", "Event", "Result", "DTYPES", "JOB_KINDS", "PROTOCOL_VERSION", "BackendBusy", "Limits",
           "Message", "RemoteError", "check_job_id", "decode", "encode", "new_job_id"]
