"""The `svd-animate` command.

Sub-commands: `animate` (the default: `svd-animate --ref img.png --pose dance.mp4`), `batch` (many
references x many clips), `pose` (driving video -> aligned skeletons), `prepare-data` and `train`
(fine-tuning), `convert` (published checkpoints -> diffusers-style folder), `ui` (a local web page).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

from svd_animate.options import add_generation_options
from svd_common.errors import InputError, Terminated, UserError

logger = logging.getLogger("svd_animate")

PROG = "svd-animate"


def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a{'n integer' if kind is int else ' number'}, got {text!r}"
                                         ) from None


def _positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def add_pose_source_options(p, align_default: str | None) -> None:
    """Options shared by every command that extracts poses: backend, alignment (unless `align_default` is
    None), cache (defined in svd_animate/options.py)."""
    from svd_animate.options import pose_source_options

    for option in pose_source_options(align_default):
        option.add_to(p)


def add_pose_parser(subparsers) -> None:
    from pose.extract import FILL_MODES, ExtractSettings

    defaults = ExtractSettings()

    p = subparsers.add_parser(
        "pose", help="extract (and align) the driving skeletons of a video",
        description="Extract the driving person's whole-body pose from every kept frame of a video, "
                    "optionally retarget it to the person in a reference image, and save a PoseSequence "
                    ".npz (input of `svd-animate --pose`). Poses are cached by the video's content.",
    )
    p.add_argument("--video", required=True, type=Path, help="driving video (mp4, mov, webm, ...)")
    p.add_argument("--ref", type=Path, help="reference image to align the poses to")
    add_pose_source_options(p, align_default="ls with --ref, none without")
    p.add_argument("--stride", type=_positive_int, default=defaults.stride,
                   help=f"keep every N-th frame (default {defaults.stride})")
    p.add_argument("--max-frames", type=_positive_int, default=defaults.max_frames, help="stop after N kept frames")
    p.add_argument("--start", type=_seconds, default=defaults.start, help="start time in seconds")
    p.add_argument("--end", type=_seconds, default=defaults.end, help="end time in seconds")
    p.add_argument("--fill", choices=FILL_MODES, default=defaults.fill,
                   help=f"frames with nobody found: interpolate between neighbours or hold the last pose "
                        f"(default {defaults.fill})")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .npz")
    p.add_argument("--preview", type=Path, help="also write a preview video: source | skeleton (| on the reference)")
    p.set_defaults(run=run_pose)


def run_pose(args) -> int:
    from pose.cache import PoseCache
    from pose.detect import load_detector
    from pose.extract import ExtractSettings, detect_reference, extract_aligned
    from pose.preview import write_preview
    from svd_common.paths import check_input_file, check_not_input
    from svd_common.video import check_output_container, check_writable, is_image_path, probe_video, read_image

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
    method = args.align or ("ls" if args.ref else "none")
    if method != "none" and args.ref is None:
        raise InputError(f"--align {method} needs --ref (the image to align to)")
    if args.end is not None and args.end <= args.start:
        raise InputError(f"--end ({args.end}s) must come after --start ({args.start}s)")
    if args.preview:
        check_output_container(args.preview)
        check_writable(args.preview)
    if args.ref is not None:
        check_input_file(args.ref)
    probe_video(args.video)  # a bad video fails here, before any model loads

    settings = ExtractSettings(args.stride, args.max_frames, args.start, args.end, args.fill)
    cache = None if args.no_cache else PoseCache(args.cache_dir)
    with load_detector(args.detector or "auto", dwpose_dir=args.dwpose_dir) as detector:
        reference, reference_image = None, None
        if args.ref is not None and method != "none":
            reference, reference_image = detect_reference(args.ref, detector)
        elif args.ref is not None:
            reference_image = read_image(args.ref)
        size = (reference_image.shape[1], reference_image.shape[0]) if reference_image is not None else None
        result = extract_aligned(args.video, detector, settings, cache, reference, method, size,
                                 progress=not args.quiet)
    poses = result.poses
    poses.meta = {**poses.meta, "reference": args.ref.name if args.ref else None, "align": poses.meta.get(
        "align", {"method": method})}
    poses.save(args.output)
    if args.preview:
        write_preview(args.preview, args.video, poses, settings, reference_image, progress=not args.quiet)

    source = "cache" if result.from_cache else poses.meta.get("detector")
    filled = f", {poses.num_filled} filled (no person found)" if poses.num_filled else ""
    print(f"{args.output}: {len(poses)} frames at {poses.fps:g} fps from {source}{filled}, align {method}")
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
    add_generation_options(p)
    p.set_defaults(run=run_animate)


def run_animate(args) -> int:
    from pose.cache import PoseCache
    from svd_animate.animate import animate
    from svd_common.devices import check_device

    config = config_from_args(args)
    output = args.output or Path(f"{args.pose.stem}_{args.ref.stem}.mp4")
    device = check_device(args.device)
    cache = None if args.no_cache else PoseCache(args.cache_dir)
    result = animate(args.ref, args.pose, output, config, weights=args.weights, device=device,
                     side_by_side=bool(args.side_by_side), cache=cache, dwpose_dir=args.dwpose_dir,
                     progress=not args.quiet)
    audio = ", with the driving clip's audio" if result.audio else ""
    seed = f", seed {result.seed}" if config.seed < 0 else ""
    print(f"{result.output}: {result.frames} frames at {result.fps:g} fps{audio}{seed}{random_weights_label(config)}")
    return 0


def add_batch_parser(subparsers) -> None:
    from svd_animate.batch import PAIRINGS

    p = subparsers.add_parser(
        "batch", help="animate many references with many driving clips (resumable, multi-process)",
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
    p.add_argument("--num-processes", type=_positive_int, default=1,
                   help="split the jobs over N processes (one per GPU when there are GPUs); or use "
                        "`accelerate launch --multi_gpu --num_processes N -m svd_controlnext batch ...`")
    add_generation_options(p)
    p.set_defaults(run=run_batch)


def run_batch(args) -> int:
    import os

    from svd_animate import batch
    from svd_common.devices import check_device

    if (args.jobs is None) == (args.refs is None and args.poses is None):
        raise InputError("give either --jobs FILE or --refs DIR and --poses DIR")
    if args.jobs is None and (args.refs is None or args.poses is None):
        raise InputError("--refs and --poses go together")
    config = config_from_args(args)
    if args.device is not None:
        check_device(args.device)
    outdir = args.output
    if args.jobs is not None:
        jobs = batch.jobs_from_manifest(args.jobs, outdir, config)
    else:
        jobs = batch.jobs_from_folders(args.refs, args.poses, outdir, args.pairing)
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ and not args.dry_run:
        from svd_animate.launch import launch_processes  # (each process checks again: one line here, not N)

        return launch_processes(args.num_processes, sys.argv[1:] if args.argv is None else args.argv)
    if not args.dry_run:  # a dry run writes nothing, not even the folder
        batch.prepare_outdir(outdir)
    unreadable = batch.unreadable_inputs(jobs)
    for path, reason in unreadable.items():
        logger.warning("%s (its jobs will be recorded as failed)", reason)
    options = batch.BatchOptions(outdir, args.weights, args.device, args.cache_dir, not args.no_cache,
                                 args.dwpose_dir, args.overwrite, bool(args.side_by_side), progress=not args.quiet)
    if args.dry_run:
        print(batch.dry_run_listing(jobs, config, options, unreadable))
        return 0
    return batch.run_batch_process(jobs, config, options, unreadable, label=random_weights_label(config))


def add_prepare_data_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-data", help="extract the poses of a folder of dance clips for training",
        description="Extract every clip's poses once (through the pose cache) into DATASET/poses/*.npz and write "
                    "DATASET/dataset.json, the input of `svd-animate train --data DATASET`. Nothing is rendered: "
                    "skeletons are drawn on the fly at the training size. Clips that fail are listed and skipped.",
    )
    p.add_argument("--videos", required=True, type=Path, help="folder of training videos")
    p.add_argument("-o", "--output", required=True, type=Path, help="dataset folder")
    p.add_argument("--max-frames", type=_positive_int, help="keep at most N frames of each clip")
    add_pose_source_options(p, align_default=None)
    p.set_defaults(run=run_prepare_data)


def run_prepare_data(args) -> int:
    from pose.cache import PoseCache
    from pose.detect import load_detector
    from svd_animate.train.data import prepare_dataset

    cache = None if args.no_cache else PoseCache(args.cache_dir)
    with load_detector(args.detector or "auto", dwpose_dir=args.dwpose_dir) as detector:
        manifest = prepare_dataset(args.videos, args.output, detector, cache, args.max_frames,
                                   progress=not args.quiet)
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
    p.add_argument("--config", default="controlnext-svd-v2", help="training config name or YAML file")
    p.add_argument("--data", type=Path, help="dataset folder (prepare-data's, or the published meta_info.json layout)")
    p.add_argument("--output-dir", type=Path, help="run folder")
    p.add_argument("--max-steps", type=_positive_int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--trainable", help="encoder (default: fits one GPU), encoder+unet-subset, encoder+unet (what the "
                                       "published v2 run trained: 8 GPUs, DeepSpeed ZeRO-2) or lora")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"))
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", help="`latest` (the newest checkpoint in the run folder) or a checkpoint folder")
    p.add_argument("--num-processes", type=_positive_int, default=1,
                   help="data-parallel over N processes (one per GPU; gloo on CPU); or use `accelerate launch "
                        "--multi_gpu --num_processes N -m svd_controlnext train ...`")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    import os

    from svd_animate.train.config import load_train_config

    config = load_train_config(args.config).replace(
        data=str(args.data) if args.data else None, output_dir=str(args.output_dir) if args.output_dir else None,
        max_steps=args.max_steps, learning_rate=args.learning_rate, trainable=args.trainable,
        mixed_precision=args.mixed_precision, seed=args.seed).check()
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
    p.add_argument("--controlnet", required=True, help="controlnet.bin, a folder holding it, or a hub repo id")
    p.add_argument("--unet", help="unet.bin (full UNet state dict), a folder holding it, or a hub repo id")
    p.add_argument("--base", default=None, help="SVD base model (hub id or local folder) giving the UNet config "
                                                "(default stabilityai/stable-video-diffusion-img2vid-xt-1-1)")
    p.add_argument("--embedding-padding", type=int, choices=(0, 1), default=0,
                   help="0: the published inference encoder (default); 1: the training code's variant")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
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
                   help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=_positive_int, default=7860, help="port (default 7860)")
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
                           args.examples.resolve() if args.examples else None)
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
