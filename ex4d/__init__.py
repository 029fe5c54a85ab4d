"""EX-4D for Blender: extreme-viewpoint camera moves from a monocular video.

The package is importable without torch and without bpy; heavy modules (render, dwmesh, generate,
depth models) import torch themselves when used.
"""

__version__ = "0.1.0"
