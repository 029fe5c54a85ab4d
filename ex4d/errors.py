"""User-facing errors.

Every problem a user can cause (bad file, wrong shape, missing weights, dropped connection) is raised as
an :class:`Ex4dError` subclass with a one-line message that names the problem and, where possible, the
fix. The CLI prints ``error: <message>`` and exits non-zero; the backend turns them into ``error``
replies with the same text; the Blender add-on shows them as reports. Anything else is a bug.
"""

from __future__ import annotations


class Ex4dError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    code = "error"


class InputError(Ex4dError):
    code = "bad_input"


class VideoError(InputError):
    code = "bad_video"


class DepthError(InputError):
    code = "bad_depth"


class CameraFileError(InputError):
    code = "bad_camera"


class WeightsError(Ex4dError):
    code = "missing_weights"


class OutOfMemoryError(Ex4dError):
    code = "out_of_memory"


class ProtocolError(Ex4dError):
    code = "protocol"


class ConnectionLost(Ex4dError):
    code = "connection_lost"


class Cancelled(Ex4dError):
    code = "cancelled"
