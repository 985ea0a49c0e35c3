"""The Gradio page of `svd-animate ui`.

Every option input is made from `svd_animate.options.generation_options()`, the definitions the CLI builds its
flags from: the page holds no copy of an option's type, allowed values or help. Each input shows the value the
chosen preset gives it; a job takes only what the visitor changed (`given`), as the command line takes only the
flags given, so the page and the CLI make the same config.

Step 1 shows the aligned skeletons (source | skeleton | skeleton over the reference) from the pose cache when
the clip was seen before; step 2 animates. Both run through Gradio's queue one at a time (other visitors see
their place) on one `JobRunner`, whose models stay loaded. Errors are one line in the page, never a traceback.

Scripts get the same two jobs as the API endpoints `/poses` and `/animate` (one call each, the files and the
page's options as named arguments, every other event private); the uploads a job used are removed when an API
call ends or the visitor leaves the page.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import threading
import typing
import uuid
from pathlib import Path

import gradio as gr
from gradio import FileData
from gradio.utils import get_upload_folder, is_in_or_equal

from svd_common.errors import Cancelled, InputError, UserError
from svd_common.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES

from ..config import CONFIG_DIR, TINY, AnimateConfig
from ..options import DEFAULT_PRESET, Option, generation_options, is_optional_number
from .jobs import CancelFlag, JobRunner

logger = logging.getLogger(__name__)

# Shown above the fold, in these rows; every other page option goes under "Advanced options".
MAIN_ROWS = (("preset", "align", "fast", "side_by_side"), ("steps", "seed", "stride", "max_frames", "width", "height"))
MAIN_OPTIONS = sum(MAIN_ROWS, ())
STAGES = {"poses": "extracting poses", "preview": "drawing the preview", "sampling": "sampling (steps)",
          "decoding": "decoding frames"}
CONFIG_FIELDS = {field.name for field in dataclasses.fields(AnimateConfig)}
# The inputs that choose which settings the others show; `fast` is shown by the field it sets.
CHOICE = ("preset", "fast", "published_sampling")
SHORTCUT_FIELDS = {"fast": "fast_sampling"}
CSS = "#status.error {color: var(--error-text-color);}"
# Gradio's own copies (uploads, results shown) older than this go, checked hourly; all of them when the server stops
CACHE_LIFETIME_S = 6 * 3600
PRIVATE = {"api_visibility": "private"}  # the page's own events: not part of the API


def page_options() -> list[Option]:
    """The options a visitor sets per job (those fixed for the server are `ui` command flags)."""
    return [option for option in generation_options() if option.on_page]


def label(option: Option) -> str:
    return option.cli_flag.removeprefix("--").replace("-", " ")


def shown_value(config: AnimateConfig, option: Option, current=None):
    """What `option`'s input shows under `config` (the preset with the fast or published settings over it);
    options that are not config fields keep `current`."""
    field = SHORTCUT_FIELDS.get(option.name, option.name)
    if option.name == "preset" or not hasattr(config, field):
        return current
    value = getattr(config, field)
    if option.is_switch:
        return value == option.switch_value
    if is_optional_number(option):
        return "" if value is None else str(value)
    return value


def placeholder(config: AnimateConfig, option: Option) -> str:
    if option.name == "guidance":
        low, high = config.min_guidance, config.max_guidance
        return f"preset: {low:g}" + ("" if low == high else f" to {high:g} over a window")
    if not is_optional_number(option):
        return ""
    value = getattr(config, option.name, None)
    return "empty: none" if value is None else f"empty: the preset's {value}"


def make_input(option: Option, config: AnimateConfig, presets=(), preset: str = DEFAULT_PRESET):
    """One Gradio input for `option`, showing `config`'s value."""
    common = dict(label=label(option), info=option.help, elem_id=f"opt-{option.name}")
    value = shown_value(config, option)
    if option.name == "preset":
        return gr.Dropdown(choices=list(presets), value=preset, **common)
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
        if option.is_switch:  # a setting's switch always says its value; the choices (fast...) only when ticked
            explicit = option.name in CONFIG_FIELDS and option.name not in CHOICE
            value = option.switch_value if value else (not option.switch_value if explicit else None)
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


def given(values: dict, shown: AnimateConfig) -> dict:
    """What the visitor set: the values that differ from those `shown` (the preset, with the fast or published
    settings when ticked) gives. The others are "not given", like flags left out, so the page makes the config the
    command line makes: `--steps 30 --fast` keeps 30 steps, `--fast` alone takes the fast 10."""
    return {name: None if name in CONFIG_FIELDS and name not in CHOICE and value == getattr(shown, name) else value
            for name, value in values.items()}


def choice_of(values: dict) -> dict:
    return {name: values.get(name) or None for name in CHOICE}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def attempt(work):
    """(work(), None), or (None, the page's line) when it fails: every failure becomes one line (a bug's traceback
    goes to the log)."""
    try:
        return work(), None
    except Exception as error:  # noqa: BLE001 - shown as one line
        if not isinstance(error, UserError):
            logger.exception("job failed")
        return None, error_status(error)


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


def reference_image(**kwargs) -> gr.Image:
    """The reference upload. Gradio opens an upload with PIL before any handler runs, and a file that is not an
    image (or a decompression bomb) would end there as its generic "the upstream app raised an exception": such a
    file is passed on by its path instead, and the job's own reader names the problem in one line. (The component
    is wrapped, not subclassed: Gradio writes a .pyi stub beside the module of every subclass.)"""
    component = gr.Image(type="filepath", image_mode=None, **kwargs)  # the upload itself: `read_image` decodes it
    preprocess = component.preprocess

    def tolerant(payload):
        try:
            return preprocess(payload)
        except Exception:  # noqa: BLE001 - whatever PIL says, `read_image` says it better, in the page
            if payload is None or not getattr(payload, "path", None):
                raise
            return str(payload.path)

    component.preprocess = tolerant
    return component


def api_type(option: Option, presets=()):
    """The type hint of `option`'s API argument, from which Gradio writes its schema; None: the preset's value."""
    choices = tuple(presets) if option.name == "preset" else option.choices
    kind = typing.Literal[choices] if choices else (str if option.kind is Path else option.kind)
    return typing.Optional[kind]


def typed_value(option: Option, value):
    """An API argument as the option's value (`audio=False`: no audio), its type checked in one line; the value
    itself is checked with the CLI's checks when the config is made."""
    if value is None:
        return None
    if option.is_switch:
        ok = isinstance(value, bool)
    elif option.kind in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            option.kind is float or float(value).is_integer())
        value = option.kind(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        kind = {bool: "true or false", int: "a whole number", float: "a number"}.get(option.kind, "a string")
        raise InputError(f"{option.name}: must be {kind}, got {value!r}")
    return value


def remove_upload(path, blocks: gr.Blocks) -> None:
    """Delete a file Gradio wrote when it received an upload, and its folder when empty: only a path in the page's
    upload record inside Gradio's upload folder, never a visitor's example or a file of the server's own."""
    path = str(path or "")
    if path not in blocks.upload_file_set or not is_in_or_equal(path, get_upload_folder()):
        return
    blocks.upload_file_set.discard(path)
    Path(path).unlink(missing_ok=True)
    try:
        os.rmdir(Path(path).parent)  # Gradio's one folder per upload (named by its hash), if nothing else is in it
    except OSError:
        pass


def example_files(folder: Path | None, suffixes) -> list[list[str]]:
    if folder is None or not folder.is_dir():
        return []
    return [[str(path)] for path in sorted(folder.iterdir()) if path.suffix.lower() in suffixes]


def preset_choices(initial: str) -> list[str]:
    return sorted({path.stem for path in CONFIG_DIR.glob("*.yaml")} | {initial})


class Page:
    """The page and its handlers over one `JobRunner`. Each job gets an id, a Cancel flag and the choice its inputs
    showed when its button was clicked (so Cancel also reaches a job still waiting in the queue, and what the
    visitor changes while it waits does not change it); `_jobs` maps ids to (visitor, flag, choice), `_uploads`
    each visitor to their uploads (removed when they leave: step 2 reuses step 1's)."""

    def __init__(self, runner: JobRunner, preset: str = DEFAULT_PRESET, examples: Path | None = None):
        self.runner = runner
        self.preset = preset
        self.presets = preset_choices(preset)
        self.examples = examples
        self.options = page_options()
        self._jobs: dict[str, tuple[str, CancelFlag, tuple]] = {}
        self._uploads: dict[str, set[str]] = {}
        self._jobs_lock = threading.Lock()
        self.blocks: gr.Blocks | None = None

    # -- handlers -------------------------------------------------------------------------------------------

    def arm(self, shown_choice: tuple, request: gr.Request):
        """On the click, before the job joins the queue: its id (sent with the job, in a hidden box), Cancel flag
        and the (preset, fast, published) choice whose values the inputs show."""
        job_id = uuid.uuid4().hex
        with self._jobs_lock:
            self._jobs[job_id] = (request.session_hash, CancelFlag(), tuple(shown_choice))
        return "Waiting for the worker (one job at a time)...", job_id

    def note_uploads(self, reference, video, request: gr.Request) -> None:
        """On an upload: the visitor's files, to remove when they leave."""
        self._note(request.session_hash, (reference, video))

    def _note(self, visitor: str | None, paths) -> None:
        with self._jobs_lock:
            self._uploads.setdefault(visitor, set()).update(str(path) for path in paths if path)

    def forget(self, request: gr.Request) -> None:
        """The visitor left: their jobs' entries go, and their uploads unless another visitor holds the same file
        (Gradio keeps one copy of the same bytes under the same name). A job already running goes on to its end
        (its folder is kept in the output folder); one still waiting that Gradio runs anyway starts with a fresh
        flag."""
        with self._jobs_lock:
            for job_id in [k for k, (visitor, _, _) in self._jobs.items() if visitor == request.session_hash]:
                del self._jobs[job_id]
            used = self._uploads.pop(request.session_hash, set())
            used -= set().union(*self._uploads.values())
        for path in used:
            remove_upload(path, self.blocks)

    def cancel(self, request: gr.Request) -> str:
        """Stop this visitor's jobs: the running one at its next frame or step, the waiting ones when they start."""
        with self._jobs_lock:
            flags = [flag for visitor, flag, _ in self._jobs.values() if visitor == request.session_hash]
        for flag in flags:
            flag.cancel()
        return "Cancelling..." if flags else "Nothing to cancel."

    def _job(self, work, data: dict, progress):
        job_id = data[self.job_box]
        with self._jobs_lock:
            visitor, flag, shown_choice = self._jobs.get(job_id, (None, CancelFlag(), data[self.choice_state]))
        reference, video = data[self.reference_input], data[self.video_input]
        self._note(visitor, (reference, video))
        raw = [data[component] for component in self.option_inputs]

        def on_progress(stage: str, done: int, total: int | None) -> None:
            progress((done, total) if total else None, desc=STAGES.get(stage, stage), unit="frames" if stage in (
                "poses", "preview", "decoding") else "window steps")

        def run():
            flag.check()  # cancelled while it waited in the queue
            return work(reference, video, self.job_values(raw, shown_choice), on_progress, flag)

        try:
            return attempt(run)
        finally:
            with self._jobs_lock:
                self._jobs.pop(job_id, None)

    def _api_job(self, work, reference: FileData, video: FileData, arguments: dict):
        """One API call: the job on the uploaded files, its files returned; a failure is one line (`gr.Error`), and
        the call's uploads are removed either way."""
        paths = [file.get("path") if isinstance(file, dict) else getattr(file, "path", None)
                 for file in (reference, video)]
        try:
            job, error = attempt(lambda: work(*paths, self.api_values(arguments)))
        finally:
            for path in paths:
                remove_upload(path, self.blocks)
        if error:
            raise gr.Error(error.removeprefix("Error: "), print_exception=False)
        return job

    def api_values(self, arguments: dict) -> dict:
        """An API call's arguments as a job takes them: each the option's value, None the preset's (the server's
        preset when no preset is named), as the CLI takes its flags."""
        values = {option.name: typed_value(option, arguments.get(option.name)) for option in self.options}
        values["preset"] = values["preset"] or self.preset
        self.check_preset(values)
        return values

    def api_endpoint(self, name: str, work, outputs, doc: str):
        """A function for `gr.api` whose signature Gradio shows to clients: the reference and video files, then
        one argument per page option, named after it and None by default (the preset's value)."""
        files = [inspect.Parameter(file, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=FileData)
                 for file in ("reference", "video")]
        options = [inspect.Parameter(option.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                     annotation=api_type(option, self.presets)) for option in self.options]
        returns = typing.Tuple[(FileData,) * len(outputs)]

        def endpoint(reference, video, *values):
            job = self._api_job(work, reference, video, dict(zip((o.name for o in self.options), values)))
            return tuple(FileData(path=str(getattr(job, output))) for output in outputs)

        endpoint.__name__, endpoint.__doc__ = name, doc
        endpoint.__signature__ = inspect.Signature(files + options, return_annotation=returns)
        endpoint.__annotations__ = {p.name: p.annotation for p in files + options} | {"return": returns}
        return endpoint

    def job_values(self, raw: list, shown_choice: tuple) -> dict:
        """The option inputs' values (in `self.options` order) as a job takes them: only what the visitor set.
        `shown_choice` is the (preset, fast, published) whose values the inputs show; what still equals them was
        not set, so a choice changed a moment ago applies even before the page has shown its values."""
        values = values_from_inputs(self.options, raw)
        self.check_preset(values)
        return given(values, self.runner.config(choice_of(dict(zip(CHOICE, shown_choice)))))

    def check_preset(self, values: dict) -> None:
        """Only the listed presets: a visitor names no YAML file of the server's."""
        if values.get("preset") not in self.presets:
            raise InputError(f"preset {values.get('preset')!r}: choose one of {', '.join(self.presets)}")

    def show_poses(self, data: dict, progress=gr.Progress()):
        job, error = self._job(self.runner.poses, data, progress)
        if error:
            return gr.update(value=error, elem_classes=["error"]), gr.update(), gr.update()
        status = f"Poses: {job.summary}. Saved in {job.folder}."
        return gr.update(value=status, elem_classes=[]), str(job.preview), [str(job.poses)]

    def animate(self, data: dict, progress=gr.Progress()):
        job, error = self._job(self.runner.animate, data, progress)
        if error:
            return gr.update(value=error, elem_classes=["error"]), gr.update(), gr.update()
        weights = " (tiny preset: RANDOM WEIGHTS, the pixels are noise)" if job.random_weights else ""
        status = f"Animation: {job.summary}{weights}. Saved in {job.folder}."
        return gr.update(value=status, elem_classes=[]), str(job.video), [str(job.video), str(job.poses)]

    def refresh(self, previous: tuple, preset: str, fast: bool, published: bool, *current):
        """After the preset, fast or published choice changed: each input that still shows what the previous choice
        gave now shows what this one gives; inputs the visitor changed keep their value."""
        choice = (preset, bool(fast), bool(published))
        try:
            config = self.runner.config(choice_of(dict(zip(CHOICE, choice))))
        except UserError as error:
            return [gr.update(value=f"Error: {one_line(error)}", elem_classes=["error"]), previous] + \
                [gr.update()] * len(current)
        try:
            before = self.runner.config(choice_of(dict(zip(CHOICE, previous))))
        except UserError:
            before = None
        updates = []
        for option, value in zip(self.options, current):
            untouched = before is None or value == shown_value(before, option, value)
            if option.name in CHOICE or not untouched:
                updates.append(gr.update(value=shown_value(config, option, value)) if option.is_switch
                               and option.name in CHOICE else gr.update())
            else:
                updates.append(gr.update(value=shown_value(config, option, value), **(
                    {"placeholder": placeholder(config, option)} if is_optional_number(option) else {})))
        return [gr.update(), choice] + updates

    # -- layout ---------------------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        config = self.runner.config({"preset": self.preset})
        with gr.Blocks(title="svd-animate", analytics_enabled=False,
                       delete_cache=(3600, CACHE_LIFETIME_S)) as blocks:
            gr.Markdown("## svd-animate\nA reference image + a driving video → the character moving like the "
                        "dancer. **1.** check the skeletons, **2.** animate.")
            self.add_api()  # first: the page's own events then cannot take the names /poses and /animate
            if config.base_model == TINY:
                gr.Markdown("**Tiny preset: RANDOM WEIGHTS.** The result is noise, not an animation; start the "
                            "server with real weights (`--preset controlnext-svd-v2`) for real output.")
            with gr.Row():
                with gr.Column():
                    reference = reference_image(label="Reference image", sources=["upload"],
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
            presets = self.presets
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

            # the job's id rides with the job in a hidden box (a gr.State would be read when the job starts)
            job_box = gr.Textbox(visible="hidden", elem_id="job-id")
            choice_state = gr.State((self.preset, False, False))
            self.reference_input, self.video_input, self.option_inputs = reference, video, ordered
            self.job_box, self.choice_state = job_box, choice_state
            job_inputs = {reference, video, job_box, choice_state, *ordered}
            for button, handler, shown in ((poses_button, self.show_poses, preview),
                                           (animate_button, self.animate, result)):
                button.click(self.arm, choice_state, [status, job_box], queue=False, **PRIVATE).then(
                    handler, job_inputs, [status, shown, downloads], concurrency_id="worker", concurrency_limit=1,
                    **PRIVATE)
            cancel_button.click(self.cancel, None, status, queue=False, **PRIVATE)
            for upload in (reference, video):
                upload.upload(self.note_uploads, [reference, video], None, queue=False, show_progress="hidden",
                              **PRIVATE)
            choice = [inputs[name] for name in CHOICE]
            for changed in choice:  # `input`: the visitor's changes only, not the page's own updates
                changed.input(self.refresh, [choice_state, *choice, *ordered], [status, choice_state, *ordered],
                              queue=False, **PRIVATE)
            blocks.unload(self.forget)
        blocks.queue(default_concurrency_limit=1)
        self.blocks = blocks
        return blocks

    def add_api(self) -> None:
        """`/poses` and `/animate` for scripts (gradio_client), in the page's one-job-at-a-time queue."""
        for name, work, outputs, doc in (
                ("poses", self.runner.poses, ("preview", "poses"), "Step 1: the driving poses aligned to the "
                 "reference. Returns the preview video (source | skeleton | skeleton over the reference) and "
                 "poses.npz."),
                ("animate", self.runner.animate, ("video", "poses"), "Step 2: the animation. Returns the video "
                 "and the poses.npz it followed.")):
            gr.api(self.api_endpoint(name, work, outputs, doc), api_name=name, concurrency_id="worker",
                   concurrency_limit=1)

    def serve(self, host: str, port: int, auth: list | None = None, max_upload_bytes: int | None = None):
        """Build the page and serve it in the background, behind a login when `auth` lists (user, password) pairs,
        refusing uploads over `max_upload_bytes`; `block_thread()` on the result waits until Ctrl-C."""
        blocks = self.build()
        allowed = [str(self.runner.output_dir)] + ([str(self.examples)] if self.examples else [])
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"])  # no web fonts: the page works offline
        logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests, one INFO line each
        blocks.launch(server_name=host, server_port=port, allowed_paths=allowed, show_error=False, quiet=True,
                      prevent_thread_lock=True, theme=theme, css=CSS, auth=auth or None,
                      max_file_size=max_upload_bytes)
        return blocks


def serve(runner: JobRunner, host: str, port: int, preset: str, examples: Path | None, auth: list | None = None,
          max_upload_bytes: int | None = None):
    """The page of `svd-animate ui`, served in the background (results are served from the runner's output
    folder, uploads from Gradio's, `GRADIO_TEMP_DIR`)."""
    return Page(runner, preset, examples).serve(host, port, auth, max_upload_bytes)
