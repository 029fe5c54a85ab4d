"""Pure-Python logic of the add-on: no bpy, testable in any Python with numpy.

The ex4d modules it needs (camera, depth_rules, errors, fit, protocol) come from ``_core/`` inside the built extension
(copied by ``ex4d addon build``), or from the installed ``ex4d`` package in a source checkout.
"""

try:  # inside the extension zip: <addon>/_core
    from .._core import camera, depth_rules, errors, fit  # noqa: F401
except ImportError:  # source checkout (tests of addon/core in the project's environment)
    from ex4d import camera, depth_rules, errors, fit  # noqa: F401


def protocol_client():
    """The client module (imported lazily: it needs pyzmq)."""
    try:
        from .._core.protocol import client
    except ImportError:
        from ex4d.protocol import client
    return client
