"""Render the pictures of docs/addon.md (not a test): python tests/make_addon_docs_images.py

Starts `ex4d serve --generator draft` on a free port, makes the tests' synthetic shot at 160x120 and
runs tests/blender/docs_images.py in the bpy environment.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from addon_fixtures import ROOT, Backend, build_zip, run_blender, synthetic_shot  # noqa: E402

if __name__ == "__main__":
    tmp = Path(tempfile.mkdtemp(prefix="ex4d_docs_"))
    video, depth = synthetic_shot(tmp, 160, 120, 9)
    zip_path = build_zip(tmp / "dist")
    backend = Backend(tmp / "jobs", tmp / "backend.log", generator="draft")
    try:
        r = run_blender("docs_images.py", zip_path, video, depth, backend.address, tmp, ROOT / "docs" / "img", tmp=tmp)
    finally:
        backend.stop()
    print(r.stdout[-1500:], r.stderr[-1500:])
    sys.exit(r.returncode)
