"""The `svd-animate` command.

Sub-commands: `animate` (the default: `svd-animate --ref img.png --pose dance.mp4`), `batch` (many
references x many clips), `pose` (driving video -> aligned skeletons), `prepare-data` and `train`
(fine-tuning), `convert` (published checkpoints -> diffusers-style folder), `ui` (a local web page), `comfyui`
(the ComfyUI nodes added to a ComfyUI folder).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

from svd_animate.options import (add_generation_options, add_options, comfyui_options, convert_options, pose_options,
                                  positive_int, prepare_data_options, train_config_fields, train_options)
from svd_common.errors import InputError, Terminated, UserError

logger = logging.getLogger("svd_animate")

PROG = "svd-animate"


def add_pose_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pose", help="extract (and align) the driving skeletons of a video",
        description="Extract the driving person's whole-body pose from every kept frame of a video, "
                    "optionally retarget it to the person in a reference image, and save a PoseSequence "
                    ".npz (input of `svd-animate --pose`): the poses `svd-animate` would use with the same settings. "
                    "Poses are cached by the video's content.",
    )
    add_options(p, pose_options())
    p.set_defaults(run=run_pose)


def run_pose(args) -> int:
    """The poses stage of an animation job, saved (and previewed): the same code path as `svd-animate`'s."""
    from pose.preview import write_preview
    from svd_animate.animate import Animator, extract_settings, saved_poses
    from svd_animate.config import AnimateConfig
    from svd_animate.options import POSE_STRIDE
    from svd_animate.run import RunSettings
    from svd_common.paths import check_not_input
    from svd_common.video import check_output_container, check_writable, is_image_path, read_image

    if is_image_path(args.video):
        raise InputError(f"{args.video}: is an image; --video takes a driving video")
    inputs = {"--video": args.video, "--ref": args.ref}
    check_not_input(args.output, inputs)
    check_writable(args.output)
    if args.output.suffix.lower() != ".npz":
        raise InputError(f"{args.output}: the poses are saved as .npz; end the name with .npz "
                         f"(--preview takes the video)")
    if args.preview:
        check_not_input(args.preview, {**inputs, "-o": args.output}, "the preview")
    if args.align not in (None, "none") and args.ref is None:
        raise InputError(f"--align {args.align} needs --ref (the image to align to)")
    given = {option.name: getattr(args, option.name) for option in pose_options()}
    config = AnimateConfig(stride=POSE_STRIDE, align="ls" if args.ref else "none").with_given(
        **{name: value for name, value in given.items() if name in AnimateConfig.__dataclass_fields__})
    if args.preview:
        check_output_container(args.preview)
        check_writable(args.preview)
    with Animator(config, RunSettings.from_values(vars(args))) as animator:
        job = animator.job(args.ref, args.video)
        job.check()
        poses = saved_poses(job.poses(), args.ref, config)
    poses.save(args.output)
    if args.preview:
        reference_image = read_image(args.ref) if args.ref is not None else None
        write_preview(args.preview, args.video, poses, extract_settings(job.config), reference_image,
                      progress=not args.quiet)

    source = "cache" if job.extraction.from_cache else poses.meta.get("detector")
    filled = f", {poses.num_filled} filled (no person found)" if poses.num_filled else ""
    print(f"{args.output}: {len(poses)} frames at {poses.fps:g} fps from {source}{filled}, align {config.align}")
    if args.preview:
        print(f"{args.preview}: preview")
    return 0


def config_from_args(args):
    """The preset, then --published-sampling or --fast, then every flag given (None: not given)."""
    from svd_animate.options import config_from_values

    return config_from_values(vars(args))


def random_weights_label(config) -> str:
    from svd_animate.config import TINY

    return " (tiny preset: RANDOM WEIGHTS, the pixels are noise, not an animation)" if config.base_model == TINY else ""


def add_animate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "animate", help="animate a reference image with a driving video (the default command)",
        description="Animate the character in --ref with the motion of --pose (a driving video or a poses .npz "
                    "from `svd-animate pose`). Preset values are defaults; flags override them.",
    )
    p.add_argument("--ref", required=True, type=Path, help="reference image of the character")
    p.add_argument("--pose", required=True, type=Path, help="driving video, or a PoseSequence .npz")
    p.add_argument("-o", "--output", type=Path, help="output video: .mp4, .mov, .mkv, .webm or .gif (default: <pose>_<ref>.mp4 here)")
    p.add_argument("--num-processes", type=positive_int, default=1,
                   help="share this video's windows over N processes (one per GPU when there are GPUs): the same "
                        "frames, sooner; or use `accelerate launch --num_processes N -m svd_controlnext ...`")
    add_generation_options(p)
    p.set_defaults(run=run_animate)


def run_animate(args) -> int:
    import os

    from svd_animate.animate import animate
    from svd_animate.run import RunSettings

    config = config_from_args(args)
    output = args.output or Path(f"{args.pose.stem}_{args.ref.stem}.mp4")
    run = RunSettings.from_values(vars(args))
    run.resolved_device()  # a bad --device: one line before anything else
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        from svd_animate.animate import Animator
        from svd_animate.launch import launch_processes

        Animator(config, run).job(args.ref, args.pose, output, bool(args.side_by_side)).check()  # one line, not N
        return launch_processes(args.num_processes, sys.argv[1:] if args.argv is None else args.argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # one of the processes: this video's windows are shared
        from svd_animate.launch import window_parallel_run

        run = window_parallel_run(run)
    result = animate(args.ref, args.pose, output, config, run, side_by_side=bool(args.side_by_side))
    if run.parallel is not None and not run.parallel.is_main:
        return 0
    audio = ", with the driving clip's audio" if result.audio else ""
    seed = f", seed {result.seed}" if config.seed < 0 else ""
    print(f"{result.output}: {result.frames} frames at {result.fps:g} fps{audio}{seed}{random_weights_label(config)}")
    return 0


def add_batch_parser(subparsers) -> None:
    from svd_animate.batch import PAIRINGS

    p = subparsers.add_parser(
        "batch", help="animate many references with many driving clips (resumable; several processes or Ray)",
        description="Run many animations with the models loaded once per process. Jobs come from --refs and "
                    "--poses folders or from a --jobs manifest (CSV or YAML: ref, pose, and optional output, "
                    "seed, steps, width, height, stride, max_frames, guidance, control_scale, ...). Outputs that "
                    "already exist are skipped; a failed job is recorded and the batch goes on; OUTDIR/report.json "
                    "lists every job. Exit status 0 when every job is done or skipped, 1 otherwise.",
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--refs", type=Path, help="folder of reference images")
    p.add_argument("--poses", type=Path, help="folder of driving videos and/or poses .npz")
    p.add_argument("--pairing", choices=PAIRINGS, default="all",
                   help="all: every reference with every clip (default); name: files with the same stem")
    p.add_argument("--jobs", type=Path, help="manifest (.csv, .yaml) instead of --refs/--poses")
    p.add_argument("--overwrite", action="store_true", help="redo jobs whose output exists")
    p.add_argument("--dry-run", action="store_true", help="list the jobs, what is cached and what would be skipped")
    p.add_argument("--num-processes", type=positive_int,
                   help="split the jobs over N processes (default 1; one per GPU when there are GPUs); or use "
                        "`accelerate launch --multi_gpu --num_processes N -m svd_controlnext batch ...`; with "
                        "--ray: N workers (default: one per GPU of the cluster, or one per node without GPUs)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the jobs on Ray workers, handed out as they become free (pip install "
                        "'svd-animate[ray]'); ADDRESS: a running cluster's (default: RAY_ADDRESS, else a local "
                        "one). OUTDIR must be reachable by every worker (a shared filesystem)")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="with --ray: how often a job whose worker was lost (process killed, node gone) is run "
                        "again (default 2)")
    add_generation_options(p)
    p.set_defaults(run=run_batch)


def run_batch(args) -> int:
    import os

    from svd_animate import batch
    from svd_animate.run import RunSettings
    from svd_common.devices import check_device

    if (args.jobs is None) == (args.refs is None and args.poses is None):
        raise InputError("give either --jobs FILE or --refs DIR and --poses DIR")
    if args.jobs is None and (args.refs is None or args.poses is None):
        raise InputError("--refs and --poses go together")
    if args.retries < 0:
        raise InputError(f"--retries must be at least 0, got {args.retries}")
    config = config_from_args(args)
    if args.device is not None:
        check_device(args.device)
    outdir = args.output
    if args.jobs is not None:
        jobs = batch.jobs_from_manifest(args.jobs, outdir, config)
    else:
        jobs = batch.jobs_from_folders(args.refs, args.poses, outdir, args.pairing)
    if args.ray is None and (args.num_processes or 1) > 1 and "WORLD_SIZE" not in os.environ and not args.dry_run:
        from svd_animate.launch import launch_processes  # (each process checks again: one line here, not N)

        return launch_processes(args.num_processes, sys.argv[1:] if args.argv is None else args.argv)
    if args.ray is not None and not args.dry_run:
        from svd_animate.ray_batch import connect

        connect(args.ray)  # Ray missing or the cluster unreachable: one line, before anything is written
    if not args.dry_run:  # a dry run writes nothing, not even the folder
        batch.prepare_outdir(outdir)
    unreadable = batch.unreadable_inputs(jobs)
    for path, reason in unreadable.items():
        logger.warning("%s (its jobs will be recorded as failed)", reason)
    options = batch.BatchOptions(outdir, RunSettings.from_values(vars(args)), args.overwrite, bool(args.side_by_side))
    if args.dry_run:
        print(batch.dry_run_listing(jobs, config, options, unreadable))
        return 0
    if args.ray is not None:
        from svd_animate.ray_batch import run_batch_on_ray

        return run_batch_on_ray(jobs, config, options, unreadable, args.ray, args.num_processes, args.retries,
                                label=random_weights_label(config))
    return batch.run_batch_process(jobs, config, options, unreadable, label=random_weights_label(config))


def add_prepare_data_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-data", help="extract the poses of a folder of dance clips for training",
        description="Extract every clip's poses once (through the pose cache) into DATASET/poses/*.npz and write "
                    "DATASET/dataset.json, the input of `svd-animate train --data DATASET`. Nothing is rendered: "
                    "skeletons are drawn on the fly at the training size. Clips that fail are listed and skipped.",
    )
    add_options(p, prepare_data_options())
    p.set_defaults(run=run_prepare_data)


def run_prepare_data(args) -> int:
    from pose.detect import load_detector
    from svd_animate.run import RunSettings
    from svd_animate.train.data import prepare_dataset

    run = RunSettings.from_values(vars(args))
    with load_detector(args.detector or "auto", dwpose_dir=run.dwpose_dir) as detector:
        manifest = prepare_dataset(args.videos, args.output, detector, run.pose_cache(), args.max_frames,
                                   progress=run.progress)
    for skipped in manifest["skipped"]:
        print(f"skipped: {skipped['reason']}")
    frames = sum(clip["frames"] for clip in manifest["clips"])
    print(f"{args.output}: {len(manifest['clips'])} clips, {frames} frames with poses, "
          f"{len(manifest['skipped'])} skipped")
    return 0


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune the pose encoder (and optionally the UNet) with accelerate",
        description="Train from a YAML config (configs/train/: tiny, controlnext-svd-v2; or your own file with the "
                    "keys of svd_animate/train/config.py; unknown keys refused). Checkpoints go to "
                    "RUN/checkpoints/, validation videos to RUN/validation/, TensorBoard logs to RUN/logs/, and the "
                    "trained weights to RUN/final/ (use with `svd-animate --weights RUN/final`).",
    )
    add_options(p, train_options())
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    import os

    from svd_animate.train.config import load_train_config

    config = load_train_config(args.config).with_given(**train_config_fields(vars(args))).check()
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        from svd_animate.launch import launch_processes

        return launch_processes(args.num_processes, sys.argv[1:] if args.argv is None else args.argv)
    from svd_animate.train.trainer import train

    result = train(config, resume=args.resume, progress=not args.quiet)
    if result.export_dir is not None:
        last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
        print(f"{result.export_dir}: trained weights after {result.steps} steps{last}")
    return 0


def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert published ControlNeXt-SVD-v2 checkpoints to a diffusers-style folder",
        description="Read the published controlnet.bin (and optionally unet.bin) safely (safetensors, or "
                    "torch.load with weights_only) and write DIR/pose_encoder/ (and DIR/unet/) as safetensors.",
    )
    add_options(p, convert_options())
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from svd_controlnext.weights import BASE_MODEL, convert

    out = convert(args.controlnet, args.output, unet=args.unet, base=args.base or BASE_MODEL,
                  embedding_padding=args.embedding_padding)
    parts = "pose_encoder/" + (" and unet/" if args.unet else "")
    print(f"{out}: wrote {parts} (safetensors)")
    return 0


def add_ui_parser(subparsers) -> None:
    from svd_animate.options import generation_options

    p = subparsers.add_parser(
        "ui", help="a local web page: check the skeletons, then animate",
        description="Serve a web page (Gradio) for the main job: upload a reference and a driving clip, see the "
                    "aligned skeletons (step 1), animate (step 2) with progress and a Cancel button, download the "
                    "video and poses.npz. One job runs at a time; the models load once. The options below are "
                    "fixed for the server; the per-job ones are on the page.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0: every interface, which "
                        "needs --auth, --auth-file or --no-auth)")
    p.add_argument("--port", type=positive_int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", action="append", metavar="USER:PASSWORD",
                   help="a login the page asks for (repeatable; --auth-file keeps the password out of `ps`)")
    p.add_argument("--auth-file", type=Path, metavar="FILE", help="logins, one user:password a line")
    p.add_argument("--no-auth", action="store_true",
                   help="serve beyond this machine without a login: anyone who reaches it may use the GPU and disk")
    p.add_argument("--max-upload", type=positive_int, default=500, metavar="MB",
                   help="largest upload accepted, in MB (default 500)")
    p.add_argument("--output-dir", type=Path, default=Path("svd-animate-ui"),
                   help="folder for uploads (uploads/) and one folder per job (default ./svd-animate-ui)")
    p.add_argument("--examples", type=Path, help="folder whose images and videos the page offers as examples")
    for option in generation_options():
        if option.name == "preset" or not (option.on_page or option.name == "no_cache"):
            option.add_to(p)
    p.set_defaults(run=run_ui)


def run_ui(args) -> int:
    import dataclasses
    import importlib.util
    import os

    from svd_animate.config import AnimateConfig, load_preset
    from svd_common.devices import check_device
    from svd_common.video import check_writable

    from svd_animate.ui.access import check_exposure, read_logins

    logins = read_logins(args.auth, args.auth_file)
    check_exposure(args.host, logins, args.no_auth)
    load_preset(args.preset)  # an unknown preset: one line now, not a broken page
    check_device(args.device)
    output_dir = args.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    check_writable(output_dir / "probe")
    if args.examples is not None and not args.examples.is_dir():
        raise InputError(f"--examples {args.examples}: no such folder")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(output_dir / "uploads"))  # uploads live in the output folder
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if importlib.util.find_spec("gradio") is None:
        raise InputError("the web page needs Gradio: pip install 'svd-animate[ui]' (or 'gradio>=6,<7')")
    from svd_animate.ui.jobs import JobRunner
    from svd_animate.ui.page import serve

    fields = {field.name for field in dataclasses.fields(AnimateConfig)}
    fixed = {name: value for name, value in vars(args).items() if name in fields}
    runner = JobRunner(output_dir, args.weights, args.device, args.cache_dir, args.dwpose_dir, fixed,
                       progress=not args.quiet)
    try:
        try:
            blocks = serve(runner, args.host, args.port, args.preset,
                           args.examples.resolve() if args.examples else None, logins, args.max_upload * 10**6)
        except OSError as e:
            reason = f"port {args.port} is in use (choose another with --port)" if "empty port" in str(e) \
                else one_line(e)
            raise InputError(f"cannot serve on {args.host}:{args.port}: {reason}") from None
        print(f"{PROG} ui: http://{args.host}:{args.port} (results in {output_dir}; Ctrl-C stops)", flush=True)
        blocks.block_thread()
        if TERMINATED.is_set():
            raise Terminated()
    finally:
        runner.close()
    return 0


def add_comfyui_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "comfyui", help="add the ComfyUI nodes to a ComfyUI folder (for pip installs; a clone needs nothing)",
        description="Write COMFYUI_DIR/custom_nodes/svd-animate/: a loader of the nodes of this installed svd-animate "
                    "and the example workflows. Install svd-animate into the Python that runs ComfyUI first; run "
                    "again to refresh the folder it wrote.")
    add_options(p, comfyui_options())
    p.set_defaults(run=run_comfyui)


def run_comfyui(args) -> int:
    from .comfy.install import install

    folder = install(args.comfyui_dir)
    print(f"{folder}: the svd-animate nodes and example workflows; restart ComfyUI to load them")
    return 0


def one_line(error) -> str:
    return " ".join(str(error).split())


class CommandParser(argparse.ArgumentParser):
    """argparse whose errors (`--steps abc`, `--fusion cosine`) are one line like every other error of the
    command, not the usage block first; the sub-command parsers are made with this class too."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=PROG, description="Pose-driven character animation on Stable Video "
                                                            "Diffusion (ControlNeXt).")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info messages")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_animate_parser(subparsers)
    add_batch_parser(subparsers)
    add_pose_parser(subparsers)
    add_prepare_data_parser(subparsers)
    add_train_parser(subparsers)
    add_convert_parser(subparsers)
    add_ui_parser(subparsers)
    add_comfyui_parser(subparsers)
    for sub in subparsers.choices.values():
        sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(commands=tuple(subparsers.choices))
    return parser


def with_default_command(argv: list[str], commands) -> list[str]:
    """`svd-animate --ref a.png --pose b.mp4` means `svd-animate animate ...`."""
    for index, arg in enumerate(argv):
        if arg in ("-q", "--quiet", "-v", "--verbose"):
            continue
        if arg not in commands and arg not in ("-h", "--help"):
            return [*argv[:index], "animate", *argv[index:]]
        break
    return argv


# Set by SIGTERM: Gradio's server loop takes the Terminated it raises for a Ctrl-C and returns normally.
TERMINATED = threading.Event()


def _raise_terminated(signum, frame):
    TERMINATED.set()
    raise Terminated()


def main(argv=None) -> int:
    TERMINATED.clear()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if threading.current_thread() is \
        threading.main_thread() else None
    try:
        parser = build_parser()
        commands = parser.get_default("commands")
        args = parser.parse_args(with_default_command(list(sys.argv[1:] if argv is None else argv), commands))
        args.argv = argv
        level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
        logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
        logging.getLogger("accelerate").setLevel(max(level, logging.WARNING))  # its per-file INFO lines drown ours
        warnings.filterwarnings("ignore", module="google.protobuf")
        if not args.verbose:  # the libraries' advice to their developers (hub symlinks, deprecations): -v shows it
            for library in ("huggingface_hub", "diffusers", "transformers"):
                for category in (UserWarning, FutureWarning):
                    warnings.filterwarnings("ignore", category=category, module=library)
        return args.run(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM); nothing half-written was kept", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
