"""``ex4d eval``: guide quality on synthetic scenes with exact ground truth (ours vs the EX-4D recipe,
the torn-mesh ablation and a point-cloud splat)."""

from __future__ import annotations

import argparse


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got '{text}'") from None


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="measure guide quality (PSNR on valid pixels, mask precision/recall) on synthetic scenes",
        description="Render guides for synthetic scenes with exact ground truth and print, per camera path "
        "family and angle, PSNR on valid pixels, mask precision and recall for each method, pooled over scenes.",
    )
    p.add_argument("--scenes", type=_ints, default=(0, 1, 2, 3, 4, 5), metavar="SEEDS",
                   help="scene seeds, comma-separated (default 0,1,2,3,4,5)")
    p.add_argument("--angles", type=_ints, default=(30, 60, 90), help="path angles in degrees (default 30,60,90)")
    p.add_argument("--paths", default="orbit,ex4d",
                   help="path families: orbit (around the median depth) and/or ex4d (the release's arcs)")
    p.add_argument("--methods", default="ours,ex4d,torn,splat", help="methods to score (default all)")
    p.add_argument("--size", type=_size, default=(128, 96), help="image size WIDTHxHEIGHT (default 128x96)")
    p.add_argument("--frames", type=int, default=5, help="frames per path (default 5)")
    p.add_argument("--rasterizer", default="torch", choices=("auto", "torch", "nvdiffrast"))
    p.add_argument("--per-scene", action="store_true", help="also print one row per scene")
    p.add_argument("--json", metavar="FILE", help="write all rows as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import json

    from ..errors import InputError
    from ..evaluate import FAMILIES, METHODS, evaluate, format_table, summarize
    from ._checks import check_output_file, check_path_given

    families = tuple(f.strip() for f in args.paths.split(",") if f.strip())
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for f in families:
        if f not in FAMILIES:
            raise InputError(f"unknown path family '{f}' (orbit or ex4d)")
    for m in methods:
        if m not in METHODS:
            raise InputError(f"unknown method '{m}' (one of {', '.join(METHODS)})")
    if not args.scenes:
        raise InputError("--scenes is empty; give scene seeds such as 0,1,2")
    if any(seed < 0 for seed in args.scenes):
        raise InputError(f"--scenes: seeds must be 0 or more, got {', '.join(str(v) for v in args.scenes if v < 0)}")
    if not args.angles:
        raise InputError("--angles is empty; give angles such as 30,60,90")
    if not families:
        raise InputError("--paths is empty; give orbit and/or ex4d")
    if not methods:
        raise InputError(f"--methods is empty; give some of {', '.join(METHODS)}")
    if any(a <= 0 or a > 90 for a in args.angles):
        raise InputError("angles must be between 1 and 90 degrees")
    if args.frames < 2:
        raise InputError("--frames must be at least 2")
    w, h = args.size
    if w < 8 or h < 8:
        raise InputError("--size must be at least 8x8")
    if args.json is not None:  # before the run: a bad path must not cost the whole evaluation
        check_path_given(args.json, "--json")
        check_output_file(args.json, "--json")

    from tqdm import tqdm

    bar = tqdm(total=len(args.scenes) * len(families) * len(args.angles), desc="eval", unit="view")

    def progress(stage, step, total, preview=None):
        bar.n = step
        bar.refresh()

    rows = evaluate(seeds=args.scenes, angles=args.angles, families=families, methods=methods, width=w, height=h,
                    num_frames=args.frames, rasterizer=args.rasterizer, progress=progress)
    bar.close()
    if args.per_scene:
        for r in rows:
            s = r["score"]
            print(f"scene {r['seed']} {r['family']} {r['angle']} {r['method']}: PSNR {s.psnr:.2f} "
                  f"precision {s.precision:.4f} recall {s.recall:.4f}")
    print(f"{len(args.scenes)} scenes ({', '.join(map(str, args.scenes))}), {w}x{h}, {args.frames} frames per path; "
          "pooled over scenes and over frames 1..T-1")
    print(format_table(summarize(rows)))
    if args.json:
        from dataclasses import asdict

        from ..errors import Ex4dError
        from ..video import atomic_path

        out = [{k: (asdict(v) if k == "score" else v) for k, v in r.items()} for r in rows]
        try:
            with atomic_path(args.json) as tmp:  # removes its temporary file when anything fails
                tmp.write_text(json.dumps(out, indent=1))
        except OSError as e:
            raise Ex4dError(f"cannot write --json {args.json} ({e.strerror or e})") from None
    return 0
