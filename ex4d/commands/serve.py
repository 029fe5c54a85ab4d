"""``ex4d serve`` (the backend service), ``ex4d client ...`` (talk to one) and ``ex4d keys generate``.

Only parsers are built here; the backend (and torch) is imported inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


def register(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="run the backend service (ZeroMQ) that keeps models warm for the Blender add-on and `ex4d client`",
        description="Start the EX-4D backend: a ZeroMQ ROUTER that loads the models once and runs reconstruct, "
        "render, generate and shot jobs from a bounded queue. Results are kept under --jobs-dir until fetched.",
    )
    s.add_argument("--bind", default=DEFAULT_ADDRESS, help=f"address to listen on (default {DEFAULT_ADDRESS}); anything but "
                   "loopback needs --keys-dir")
    s.add_argument("--models", metavar="DIR", help="folder with the model weights (laid out as the public releases)")
    s.add_argument("--generator", default="draft", choices=("ex4d", "draft", "tiny", "none"),
                   help="generator kept warm: ex4d (Wan2.1-I2V-14B + EX-4D adapter), draft (classical fill), "
                   "tiny (random test model) or none (geometry only); default draft")
    from .generate import add_generator_options

    add_generator_options(s)
    s.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    s.add_argument("--depth-weights", metavar="DIR", help="folder with depth model weights (for jobs that name a depth_model)")
    s.add_argument("--renderer", default="auto", choices=("auto", "torch", "nvdiffrast"), help="rasterizer for guide renders")
    s.add_argument("--jobs-dir", default="ex4d-jobs", metavar="DIR", help="where finished results are kept (default ./ex4d-jobs)")
    s.add_argument("--ttl", type=float, default=24.0, metavar="HOURS", help="delete unfetched results after this long (default 24)")
    s.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs for the ex4d generator (N>1: sequence parallel "
                   "under torchrun over NCCL; N divides 40: 2, 4, 5 or 8)")
    s.add_argument("--max-queue", type=int, default=8, metavar="N", help="jobs that may wait; more are answered 'busy' (default 8)")
    s.add_argument("--keys-dir", metavar="DIR", help="enable CURVE encryption with the keys from `ex4d keys generate`; "
                   "only clients whose public key is in DIR/authorized/ may connect")
    s.add_argument("--max-message-mb", type=float, default=4096.0, metavar="MB",
                   help="largest accepted message (all arrays of one job) in MiB; one array may use half (default 4096)")
    s.add_argument("--heartbeat", type=float, default=1.0, metavar="S", help="heartbeat interval in seconds (default 1)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("client", help="talk to a running backend (ping, run, status, fetch, cancel)")
    csub = c.add_subparsers(dest="client_command", metavar="ACTION")

    def common(p):
        p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"backend address (default {DEFAULT_ADDRESS})")
        p.add_argument("--keys-dir", metavar="DIR", help="folder with server.key and client.key_secret (CURVE)")
        p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for an answer (default 10)")

    p = csub.add_parser("ping", help="print the backend's capabilities as JSON")
    common(p)
    p.set_defaults(func=cmd_ping)

    p = csub.add_parser("status", help="print the backend's queue (or one job) as JSON")
    common(p)
    p.add_argument("job", nargs="?", help="job id")
    p.set_defaults(func=cmd_status)

    p = csub.add_parser("cancel", help="cancel a job")
    common(p)
    p.add_argument("job", help="job id")
    p.set_defaults(func=cmd_cancel)

    p = csub.add_parser("fetch", help="wait for a job submitted earlier and write its arrays to an .npz")
    common(p)
    p.add_argument("job", help="job id")
    p.add_argument("--out", required=True, metavar="FILE", help="output .npz")
    p.set_defaults(func=cmd_fetch)

    p = csub.add_parser("run", help="send a whole shot to the backend; write the guides and shot_<name>.mp4",
                        description="Read the video (and depth) here, send them with the camera move to the backend, "
                        "show its progress and write color_/mask_<name>.mp4, render_<name>.npz, cameras_<name>.json "
                        "and shot_<name>.mp4 into --out (all or nothing).")
    common(p)
    add_shot_arguments(p)
    p.set_defaults(func=cmd_run)

    k = sub.add_parser("keys", help="CURVE keys for a backend reachable beyond this machine")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION")
    p = ksub.add_parser("generate", help="write server and client keypairs (zmq.auth) and authorise the client")
    p.add_argument("--dir", required=True, metavar="DIR", help="keys folder")
    p.add_argument("--name", default="client", help="client key name (default client); run again with another name for more clients")
    p.add_argument("--overwrite", action="store_true", help="replace existing keys")
    p.set_defaults(func=cmd_keys_generate)


def add_shot_arguments(p: argparse.ArgumentParser) -> None:
    from .recon import add_camera_arguments

    p.add_argument("video", help="input video")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--name", help="name in the output files (default: the preset or the trajectory's name)")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--depth", metavar="FILE", help="depth file read here (.npz 'depth' (T,H,W), 16-bit PNGs, OpenEXR)")
    d.add_argument("--depth-model", metavar="NAME", help="let the backend estimate depth with this model")
    p.add_argument("--depth-scale", type=float, metavar="S", help="units per stored step of a 16-bit PNG depth")
    add_camera_arguments(p)
    p.add_argument("--frames", type=int, metavar="N", help="use the first N frames")
    p.add_argument("--size", metavar="WxH", help="working size (even numbers)")
    p.add_argument("--fit", choices=("resize", "crop"), default="resize", help="how to reach --size")
    p.add_argument("--mesh-method", choices=("ours", "ex4d", "torn"), default="ours", help="DW-mesh recipe")
    p.add_argument("--prompt", help="text prompt (default: the generator's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the generator's)")
    p.add_argument("--guides-only", action="store_true", help="render the guides only, no generation")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------------


def serve_config(args):
    """The service settings of ``ex4d serve``'s options (shared with each ``--gpus N`` rank 0)."""
    from pathlib import Path

    from backend.server import ServeConfig

    from ..protocol.wire import Limits

    total = int(args.max_message_mb * 2**20)
    limits = Limits(max_message_bytes=total, max_array_bytes=max(total // 2, 1))
    return ServeConfig(bind=args.bind, jobs_dir=Path(args.jobs_dir), max_queue=args.max_queue, ttl_s=args.ttl * 3600.0,
                       keys_dir=Path(args.keys_dir) if args.keys_dir else None, heartbeat_s=args.heartbeat, limits=limits)


def cmd_serve(args) -> int:
    from ..errors import InputError

    if args.max_queue < 1:
        raise InputError("--max-queue must be at least 1")
    if args.gpus < 1:
        raise InputError("--gpus must be at least 1")
    if args.heartbeat <= 0:
        raise InputError("--heartbeat must be positive")
    if args.max_message_mb <= 0:
        raise InputError("--max-message-mb must be positive")
    if args.gpus > 1 and args.preview_cache:
        raise InputError("--preview-cache needs --gpus 1 (the sequence-parallel model function runs every step)")

    from backend.server import check_bind, serve
    from backend.workers import Engine

    check_bind(args.bind, args.keys_dir)  # fail before loading any model
    if args.keys_dir:
        from ..protocol.keys import authorized_dir, server_secret

        server_secret(args.keys_dir)
        authorized_dir(args.keys_dir)
    if args.gpus > 1:
        from backend.parallel import launch_parallel

        return launch_parallel(args)

    config = serve_config(args)
    engine = Engine(generator=args.generator, models_dir=args.models, device=args.device, memory_mode=args.memory_mode,
                    depth_weights=args.depth_weights, renderer=args.renderer, speed=args.speed,
                    vram_limit_gb=args.vram_limit, preview_cache=args.preview_cache)
    engine.load()

    def ready(address: str) -> None:
        print(f"ex4d backend ready on {address}", flush=True)

    rc = serve(config, engine, ready)
    # Sockets are closed and every result is on disk: leave now. Tearing down torch/diffsynth module state at
    # interpreter exit takes several seconds and serves no one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


# --------------------------------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------------------------------


def _client(args):
    from ..protocol.client import Client

    keys = {}
    if args.keys_dir:
        keys = {"server_key": args.keys_dir, "client_keys": args.keys_dir}
    return Client(args.address, timeout_s=args.timeout, **keys)


def cmd_ping(args) -> int:
    with _client(args) as c:
        print(json.dumps(c.hello(), indent=2))
    return 0


def cmd_status(args) -> int:
    with _client(args) as c:
        print(json.dumps(c.status(args.job), indent=2))
    return 0


def cmd_cancel(args) -> int:
    with _client(args) as c:
        c.hello()  # make sure the backend is there before saying it was asked
        c.cancel(args.job)
        print(json.dumps(c.status(args.job), indent=2))
    return 0


def cmd_fetch(args) -> int:
    from ..video import write_npz_atomic

    with _client(args) as c:
        progress = _progress_bar(False)
        try:
            result = c.fetch(args.job, release=False)
            if result is None:
                result = c.wait(args.job, on_progress=lambda ev: progress(ev.stage, ev.step, ev.total), release=False)
        finally:
            progress.close()
        write_npz_atomic(args.out, compress=False, **result.arrays)
        c.release(result.job_id)
    print(f"wrote {args.out}")
    return 0


def _progress_bar(quiet: bool):
    from .recon import TqdmProgress

    return TqdmProgress(enabled=not quiet)


def cmd_run(args) -> int:
    import threading

    import numpy as np

    from ..camera import CameraPath, read_transforms
    from ..pipeline import ShotResult, parse_size, write_shot
    from ..recon import check_name
    from ._checks import check_numbers, check_output_folder, check_path_given
    from .recon import check_camera_options, plan_shot_output, print_written

    # the same cheap checks as `ex4d run`, before the video is read and sent
    check_path_given(args.out)
    check_numbers(args, angle="finite", distance="positive", focal="positive", fov="finite", depth_scale="positive",
                  frames="count", steps="count")
    check_camera_options(args)
    check_output_folder(args.out)
    if args.name is not None:
        check_name(args.name)
    size = parse_size(args.size)
    trajectory = read_transforms(args.trajectory) if args.trajectory else None
    # as `ex4d run`: inputs among the outputs are refused, and an earlier set of the name is reported
    name, earlier = plan_shot_output(args, trajectory)
    progress = _progress_bar(args.quiet)
    inputs = _read_shot_inputs(args, size, progress)
    frames, depth, intr, fps = inputs
    T, H, W = frames.shape[:3]
    arrays = {"frames": frames}
    params = {"K": intr.K.tolist(), "mesh_method": args.mesh_method, "seed": args.seed, "generate": not args.guides_only,
              "cam": args.cam, "angle": args.angle, "pivot": args.pivot or "median", "distance": args.distance}
    if args.prompt is not None:
        params["prompt"] = args.prompt
    if args.steps is not None:
        params["steps"] = args.steps
    if depth is not None:
        arrays["depth"] = depth
    else:
        params["depth_model"] = args.depth_model
    if trajectory is not None:
        from ..pipeline import make_camera_path

        path = make_camera_path(T, intr, None, trajectory=trajectory)
        arrays["c2w"], arrays["K"] = path.c2w, path.K
        params.update(width=path.width, height=path.height, name=path.name)
    cancel = threading.Event()
    with _client(args) as c:
        caps = c.hello()
        if not args.guides_only and caps.get("generator") in (None, "none"):
            from ..errors import InputError

            raise InputError("the backend runs without a generator; pass --guides-only or restart it with --generator")
        job = c.submit("shot", params, arrays)
        print(f"job {job} submitted to {args.address}", file=sys.stderr)
        try:
            result = c.wait(job, on_progress=lambda ev: progress(ev.stage, ev.step, ev.total), cancel=cancel)
        except KeyboardInterrupt:
            c.cancel(job)
            raise
        finally:
            progress.close()
    r = result.arrays
    path = CameraPath(np.array(r["c2w"]), np.array(r["K"]), W, H, name=name)

    class _Guides:
        color, mask = np.asarray(r["color"]), np.asarray(r["mask"])

    shot = ShotResult(mesh=None, guides=_Guides(), path=path, video=np.asarray(r["frames"]) if "frames" in r else None)
    files = write_shot(args.out, name, shot, fps)
    print(f"{T} frames at {W}x{H}; camera '{path.name}'; {float(shot.guides.mask.mean()):.1%} of guide pixels valid; "
          f"backend time {result.params.get('seconds', 0):.1f} s")
    print_written(files, name, args.out, earlier)
    return 0


def _read_shot_inputs(args, size, progress):
    """(frames, depth or None, intrinsics, fps) at the working size, read on this machine."""
    from ..camera import resolve_intrinsics
    from ..errors import InputError

    if args.depth:
        from ..pipeline import load_shot_inputs

        s = load_shot_inputs(args.video, depth=args.depth, depth_scale=args.depth_scale, num_frames=args.frames, size=size,
                             fit=args.fit, focal=args.focal, fov=args.fov, progress=progress)
        return s.frames, s.depth, s.intrinsics, s.fps
    if not args.depth_model:
        raise InputError("no depth: pass --depth FILE, or --depth-model NAME to let the backend estimate it")
    from ..pipeline import default_working_size
    from ..video import fit_box, fit_intrinsics, probe_video, read_video

    info = probe_video(args.video)
    W, H = size if size is not None else default_working_size(info.width, info.height)
    fit_box(info.width, info.height, W, H, args.fit)
    clip = read_video(args.video, max_frames=args.frames, size=(W, H), fit=args.fit)  # fitted as decoded
    w, h = clip.source_size
    intr, _ = resolve_intrinsics(w, h, focal_px=args.focal, fov_deg=args.fov)
    return clip.frames, None, fit_intrinsics(intr, W, H, args.fit), clip.fps


# --------------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------------


def cmd_keys_generate(args) -> int:
    from ..protocol.keys import generate_keys

    files = generate_keys(args.dir, client_name=args.name, overwrite=args.overwrite)
    for k, v in files.items():
        print(f"{k}: {v}")
    print("start the backend with --keys-dir on the GPU machine (server.key_secret + authorized/); give the artist's "
          "machine server.key and the client's .key_secret")
    return 0
