"""The Gradio page of `svd-animate ui`.

Every option input is made from `svd_animate.options.generation_options()`, the definitions the CLI builds its
flags from: the page holds no copy of an option's type, allowed values or help. An empty input means "not
given", so the preset's value applies, as a flag left out does on the command line.

Step 1 shows the aligned skeletons (source | skeleton | skeleton over the reference) from the pose cache when
the clip was seen before; step 2 animates. Both run through Gradio's queue one at a time (other visitors see
their place) on one `JobRunner`, whose models stay loaded. Errors are one line in the page, never a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import typing
from pathlib import Path

import gradio as gr

from svd_common.errors import Cancelled, InputError, UserError
from svd_common.video import IMAGE_SUFFIXES

from ..config import CONFIG_DIR, TINY, AnimateConfig, field_types
from ..options import DEFAULT_PRESET, Option, generation_options
from .jobs import CancelFlag, JobRunner

logger = logging.getLogger(__name__)

# Shown above the fold, in these rows; every other page option goes under "Advanced options".
MAIN_ROWS = (("preset", "align", "fast", "side_by_side"), ("steps", "seed", "stride", "max_frames", "width", "height"))
MAIN_OPTIONS = sum(MAIN_ROWS, ())
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
STAGES = {"poses": "extracting poses", "preview": "drawing the preview", "sampling": "sampling (steps × windows)",
          "decoding": "decoding frames"}
CONFIG_FIELDS = {field.name for field in dataclasses.fields(AnimateConfig)}
CSS = "#status.error {color: var(--error-text-color);}"


def page_options() -> list[Option]:
    """The options a visitor sets per job (those fixed for the server are `ui` command flags)."""
    return [option for option in generation_options() if option.on_page]


def label(option: Option) -> str:
    return option.cli_flag.removeprefix("--").replace("-", " ")


def is_optional_number(option: Option) -> bool:
    """A number that may be left out (`max_frames: None`): a text box, where empty means "none" or "the
    preset's", since Gradio's number box cannot be empty."""
    if option.kind not in (int, float) or option.choices is not None:
        return False
    annotation = field_types(AnimateConfig).get(option.name)
    return annotation is None or type(None) in typing.get_args(annotation)


def shown_value(config: AnimateConfig, option: Option, current=None):
    """What `option`'s input shows under `config` (the preset with the fast or published settings over it);
    options that are not config fields keep `current`."""
    if option.name == "preset" or not hasattr(config, option.name):
        return current
    value = getattr(config, option.name)
    if option.is_switch:
        return value == option.switch_value
    if is_optional_number(option):
        return "" if value is None else f"{value:g}"
    return value


def placeholder(config: AnimateConfig, option: Option) -> str:
    if option.name == "guidance":
        low, high = config.min_guidance, config.max_guidance
        return f"preset: {low:g}" + ("" if low == high else f" to {high:g} over a window")
    return "empty: none" if is_optional_number(option) else ""


def make_input(option: Option, config: AnimateConfig, presets=(), preset: str = DEFAULT_PRESET):
    """One Gradio input for `option`, showing `config`'s value."""
    common = dict(label=label(option), info=option.help, elem_id=f"opt-{option.name}")
    value = shown_value(config, option)
    if option.name == "preset":
        return gr.Dropdown(choices=list(presets), value=preset, allow_custom_value=True, **common)
    if option.is_switch:
        return gr.Checkbox(value=bool(value), **common)
    if option.choices is not None:
        return gr.Dropdown(choices=list(option.choices), value=value, **common)
    if is_optional_number(option):
        return gr.Textbox(value=value or "", placeholder=placeholder(config, option), **common)
    if option.kind in (int, float):
        return gr.Number(value=value, precision=0 if option.kind is int else None, **common)
    return gr.Textbox(value=value or "", **common)


def values_from_inputs(options: list[Option], raw) -> dict:
    """The inputs' values as `config_from_values` takes them (None: not given); a text box that should hold a
    number and does not is named in one line."""
    values = {}
    for option, value in zip(options, raw):
        if option.is_switch:  # a config field's switch always says its value; the others only when ticked
            value = option.switch_value if value else (not option.switch_value if option.name in CONFIG_FIELDS
                                                        else None)
        elif isinstance(value, str):
            text = value.strip()
            value = None
            if text and option.kind in (int, float):
                try:
                    value = option.kind(float(text)) if option.kind is int and float(text).is_integer() \
                        else option.kind(text)
                except ValueError:
                    raise InputError(f"{label(option)}: must be {'a whole' if option.kind is int else 'a'} "
                                     f"number, got {text!r}") from None
            elif text:
                value = text
        elif isinstance(value, float) and option.kind is int:
            value = int(value)
        values[option.name] = value
    return values


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_status(error: BaseException) -> str:
    """What the page says when a job fails: the error's one line, or for a bug its kind (the log has the rest)."""
    import torch

    if isinstance(error, Cancelled):
        return "Cancelled: the job was stopped and nothing was written."
    if isinstance(error, UserError):
        return f"Error: {one_line(error)}"
    if isinstance(error, torch.OutOfMemoryError):
        return ("Error: out of memory: try the fast preset, a smaller width/height or window, or start the server "
                "with a preset that sets offload: model or low_vram: true")
    return f"Error: {type(error).__name__}: {one_line(error)[:300]} (the server's log has the details)"


def example_files(folder: Path | None, suffixes) -> list[list[str]]:
    if folder is None or not folder.is_dir():
        return []
    return [[str(path)] for path in sorted(folder.iterdir()) if path.suffix.lower() in suffixes]


def preset_choices(initial: str) -> list[str]:
    return sorted({path.stem for path in CONFIG_DIR.glob("*.yaml")} | {initial})


class Page:
    """The page and its handlers over one `JobRunner`; `cancel_flags` holds each visitor's current job."""

    def __init__(self, runner: JobRunner, preset: str = DEFAULT_PRESET, examples: Path | None = None):
        self.runner = runner
        self.preset = preset
        self.examples = examples
        self.options = page_options()
        self.cancel_flags: dict[str, CancelFlag] = {}
        self._flags_lock = threading.Lock()

    # -- handlers -------------------------------------------------------------------------------------------

    def arm(self, request: gr.Request) -> str:
        """Before a job joins the queue: a fresh Cancel flag for this visitor (so Cancel works while it waits)."""
        with self._flags_lock:
            self.cancel_flags[request.session_hash] = CancelFlag()
        return "Waiting for the worker (one job at a time)..."

    def cancel(self, request: gr.Request) -> str:
        with self._flags_lock:
            flag = self.cancel_flags.get(request.session_hash)
        if flag is None:
            return "Nothing to cancel."
        flag.cancel()
        return "Cancelling..."

    def _flag(self, request: gr.Request) -> CancelFlag:
        with self._flags_lock:
            return self.cancel_flags.setdefault(request.session_hash, CancelFlag())

    def _job(self, work, data: dict, request, progress):
        flag = self._flag(request)
        reference, video = data[self.reference_input], data[self.video_input]
        raw = [data[component] for component in self.option_inputs]

        def on_progress(stage: str, done: int, total: int | None) -> None:
            progress((done, total) if total else None, desc=STAGES.get(stage, stage), unit="frames" if stage in (
                "poses", "preview", "decoding") else "window steps")

        try:
            flag.check()  # cancelled while it waited in the queue
            return work(reference, video, values_from_inputs(self.options, raw), on_progress, flag), None
        except Exception as error:  # noqa: BLE001 - every failure becomes one line in the page
            if not isinstance(error, UserError):
                logger.exception("job failed")
            return None, error_status(error)

    def show_poses(self, data: dict, request: gr.Request, progress=gr.Progress()):
        job, error = self._job(self.runner.poses, data, request, progress)
        if error:
            return gr.update(value=error, elem_classes=["error"]), gr.update(), gr.update()
        status = f"Poses: {job.summary}. Saved in {job.folder}."
        return gr.update(value=status, elem_classes=[]), str(job.preview), [str(job.poses)]

    def animate(self, data: dict, request: gr.Request, progress=gr.Progress()):
        job, error = self._job(self.runner.animate, data, request, progress)
        if error:
            return gr.update(value=error, elem_classes=["error"]), gr.update(), gr.update()
        weights = " (tiny preset: RANDOM WEIGHTS, the pixels are noise)" if job.random_weights else ""
        status = f"Animation: {job.summary}{weights}. Saved in {job.folder}."
        return gr.update(value=status, elem_classes=[]), str(job.video), [str(job.video), str(job.poses)]

    def refresh(self, preset: str, fast: bool, published: bool, *current):
        """The inputs after the preset, fast or published choice changed: the values that choice gives."""
        try:
            config = self.runner.config({"preset": preset, "fast": fast or None,
                                         "published_sampling": published or None})
        except UserError as error:
            return [gr.update(value=f"Error: {one_line(error)}", elem_classes=["error"])] + [gr.update()] * len(current)
        updates = [gr.update(value=shown_value(config, option, value), **(
            {"placeholder": placeholder(config, option)} if is_optional_number(option) else {}))
            for option, value in zip(self.options, current)]
        return [gr.update()] + updates

    # -- layout ---------------------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        config = self.runner.config({"preset": self.preset})
        with gr.Blocks(title="svd-animate", analytics_enabled=False) as blocks:
            gr.Markdown("## svd-animate\nA reference image + a driving video → the character moving like the "
                        "dancer. **1.** check the skeletons, **2.** animate.")
            if config.base_model == TINY:
                gr.Markdown("**Tiny preset: RANDOM WEIGHTS.** The result is noise, not an animation; start the "
                            "server with real weights (`--preset controlnext-svd-v2`) for real output.")
            with gr.Row():
                with gr.Column():
                    reference = gr.Image(type="filepath", label="Reference image", sources=["upload"],
                                         elem_id="reference", height=360)
                    images = example_files(self.examples, IMAGE_SUFFIXES)
                    if images:
                        gr.Examples(images, [reference], label="Example references")
                with gr.Column():
                    video = gr.Video(label="Driving video", sources=["upload"], elem_id="driving", height=360)
                    videos = example_files(self.examples, VIDEO_SUFFIXES)
                    if videos:
                        gr.Examples(videos, [video], label="Example clips")
            inputs = {}
            presets = preset_choices(self.preset)
            for row in MAIN_ROWS:
                with gr.Row():
                    for name in row:
                        option = next(o for o in self.options if o.name == name)
                        inputs[name] = make_input(option, config, presets, self.preset)
            with gr.Accordion("Advanced options", open=False, elem_id="advanced"):
                advanced = [option for option in self.options if option.name not in MAIN_OPTIONS]
                for switches in (True, False):  # the tick boxes (long help) in a row of their own
                    with gr.Row():
                        for option in advanced:
                            if option.is_switch == switches:
                                inputs[option.name] = make_input(option, config)
            ordered = [inputs[option.name] for option in self.options]
            with gr.Row():
                poses_button = gr.Button("1 · Show poses", variant="secondary", elem_id="show-poses")
                animate_button = gr.Button("2 · Animate", variant="primary", elem_id="animate")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
            status = gr.Markdown("Upload a reference image and a driving video (or pick examples).", elem_id="status")
            with gr.Row():
                preview = gr.Video(label="Poses: source | skeleton | skeleton over the reference", elem_id="preview",
                                   interactive=False, autoplay=True, loop=True, height=420)
                result = gr.Video(label="Animation", elem_id="result", interactive=False, height=420)
            downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")

            self.reference_input, self.video_input, self.option_inputs = reference, video, ordered
            job_inputs = {reference, video, *ordered}
            for button, handler, shown in ((poses_button, self.show_poses, preview),
                                           (animate_button, self.animate, result)):
                button.click(self.arm, None, status, queue=False).then(
                    handler, job_inputs, [status, shown, downloads], concurrency_id="worker", concurrency_limit=1)
            cancel_button.click(self.cancel, None, status, queue=False)
            choice = [inputs["preset"], inputs["fast"], inputs["published_sampling"]]
            for changed in choice:
                changed.change(self.refresh, choice + ordered, [status, *ordered], queue=False)
        blocks.queue(default_concurrency_limit=1)
        return blocks


def serve(runner: JobRunner, host: str, port: int, preset: str, examples: Path | None):
    """Build the page and start serving it in the background (uploads and results are served from the runner's
    output folder); `block_thread()` on the result waits until Ctrl-C."""
    page = Page(runner, preset, examples)
    blocks = page.build()
    allowed = [str(runner.output_dir)] + ([str(examples)] if examples else [])
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: the page works offline
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests, one INFO line each
    blocks.launch(server_name=host, server_port=port, allowed_paths=allowed, show_error=False, quiet=True,
                  prevent_thread_lock=True, theme=theme, css=CSS)
    return blocks
