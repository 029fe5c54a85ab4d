"""Peak memory of reading a long HD clip at a small working size: fitted while decoding (what
``load_shot_inputs`` does) vs the whole clip decoded first, then fitted (what it did before).

    .venv/bin/python bench/decode_memory_cpu.py [--frames 120] [--size 256x144]

Writes a 1920x1080 H.264 clip of ``--frames`` frames into a temp folder (in a process of its own, so
this one stays small), then runs each way in its own process, which prints its peak resident memory
(ru_maxrss) and the frames' checksum.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, warnings
import numpy as np
warnings.simplefilter("ignore")
from ex4d.video import fit_frames, read_video
path, mode, W, H = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "fitted_while_decoding":
    frames = read_video(path, size=(W, H), fit="resize").frames
else:
    frames = fit_frames(read_video(path).frames, W, H, "resize")
import resource
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"shape": list(frames.shape), "checksum": int(frames.astype(np.int64).sum()), "peak_kib": peak_kib}))
"""

WRITER = """
import sys
import numpy as np
from ex4d.video import write_video
path, frames = sys.argv[1], int(sys.argv[2])
base = np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
write_video(path, np.stack([np.roll(base, 8 * t, axis=1) for t in range(frames)]), 24)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--size", default="256x144")
    args = ap.parse_args()
    W, H = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "hd.mp4"
        subprocess.run([sys.executable, "-c", WRITER, str(clip), str(args.frames)], check=True)
        print(f"clip: {args.frames} frames 1920x1080 -> {W}x{H}")
        for mode in ("whole_clip_then_fit", "fitted_while_decoding"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(clip), mode, str(W), str(H)],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{mode:24s} peak RSS {r['peak_kib'] / 1024:6.0f} MiB  frames {tuple(r['shape'])} checksum {r['checksum']}")


if __name__ == "__main__":
    main()
