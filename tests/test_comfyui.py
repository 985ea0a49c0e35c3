"""The ComfyUI nodes without ComfyUI: stand-ins of `folder_paths`, `comfy.model_management` and `comfy.utils` made
from the real modules' signatures (tests/comfyui/), the pack loaded through the repository's `__init__.py` as
ComfyUI loads a custom node folder, the example workflows run by a runner that follows ComfyUI's node contract
(tests/comfyui/runner.py), on the tiny preset, against the CLI."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from svd_animate.config import POSE_KEYS, AnimateConfig, allowed_values, field_types
from tests.conftest import ROOT

STANDINS = ROOT / "tests" / "comfyui"
WORKFLOWS = ROOT / "example_workflows"
TINY = {"SVDAnimateLoad": {"preset": "tiny"}, "SVDAnimate": {"max_frames": 4}, "SVDAnimatePoses": {"max_frames": 4}}


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's modules (the stand-ins) importable as in ComfyUI, and the pack loaded from the repository root."""
    sys.path.insert(0, str(STANDINS))
    import comfy.model_management
    import comfy.utils
    import core_nodes
    import folder_paths
    import runner

    base = Path(__import__("tempfile").mkdtemp(prefix="comfyui-"))
    folder_paths.use_base_path(str(base))
    pack = runner.load_custom_node(ROOT)
    yield dataclasses.make_dataclass("Comfy", ["pack", "runner", "folder_paths", "model_management", "utils",
                                               "mappings"])(
        pack, runner, folder_paths, comfy.model_management, comfy.utils,
        {**core_nodes.NODE_CLASS_MAPPINGS, **pack.NODE_CLASS_MAPPINGS})
    shutil.rmtree(base, ignore_errors=True)
    sys.path.remove(str(STANDINS))


@pytest.fixture
def base(comfy, tmp_path):
    """ComfyUI's folders in `tmp_path` (input, temp, output, models), the pack's model folder registered."""
    comfy.folder_paths.use_base_path(str(tmp_path))
    for name in ("input", "temp", "output", "models"):
        (tmp_path / name).mkdir()
    sys.modules["svd_animate.comfy.nodes"].register_model_folder()
    comfy.utils.set_progress_bar_global_hook(None)
    comfy.model_management.interrupt_current_processing(False)
    return tmp_path


@pytest.fixture
def clip_inputs(base, shared_data):
    """A PNG reference (ComfyUI's PIL and our OpenCV decode a JPEG alike only by luck) and a real driving clip, in
    ComfyUI's input folder."""
    Image.open(shared_data / "ref_controlnext_v2_01.jpeg").convert("RGB").save(base / "input" / "reference.png")
    return base / "input" / "reference.png", short_clip(shared_data, base / "input" / "driving.mp4")


def short_clip(shared_data, path: Path) -> Path:
    """The real clip's first 16 frames at half size (29 fps): seconds to detect at the tiny preset's stride 4. Written
    by our `VideoWriter`, whose bytes depend on the frames only, so every run tests the same clip."""
    import cv2

    from svd_common.video import VideoWriter, iter_frames

    with VideoWriter(path, fps=29) as writer:
        for _, frame in iter_frames(shared_data / "driving_controlnext_v2_01.mp4", max_frames=16):
            writer.write(cv2.resize(frame, (288, 512), interpolation=cv2.INTER_AREA))
    return path


def nodes(comfy):
    return sys.modules["svd_animate.comfy.nodes"]


def test_the_pack_loads_through_its_init_as_comfyui_loads_it(comfy):
    assert sorted(comfy.pack.NODE_CLASS_MAPPINGS) == ["SVDAnimate", "SVDAnimateDecode", "SVDAnimateLoad",
                                                      "SVDAnimatePoses", "SVDAnimateSample"]
    assert set(comfy.pack.NODE_DISPLAY_NAME_MAPPINGS) == set(comfy.pack.NODE_CLASS_MAPPINGS)
    assert str(ROOT).replace(".", "_x_") in sys.modules  # the module named by its path, as ComfyUI names it
    for cls in comfy.pack.NODE_CLASS_MAPPINGS.values():
        declared = cls.INPUT_TYPES()
        assert set(declared) <= {"required", "optional", "hidden"} and declared["required"]
        assert callable(getattr(cls(), cls.FUNCTION)) and cls.CATEGORY == "svd-animate"
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)


def test_outside_comfyui_the_repository_init_exports_and_imports_nothing(tmp_path):
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('checkout', {str(ROOT / '__init__.py')!r})\n"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "print(hasattr(module, 'NODE_CLASS_MAPPINGS'), 'svd_animate' in sys.modules, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "False"]


def test_the_inputs_are_the_option_definitions(comfy):
    from svd_animate.comfy.inputs import given_values, stage_options

    types = field_types(AnimateConfig)
    fields = {field.name: field for field in dataclasses.fields(AnimateConfig)}
    per_job = {name for name, field in fields.items() if field.metadata.get("per_job")}
    sample = comfy.pack.NODE_CLASS_MAPPINGS["SVDAnimateSample"].INPUT_TYPES()["required"]
    poses = comfy.pack.NODE_CLASS_MAPPINGS["SVDAnimatePoses"].INPUT_TYPES()["required"]
    assert set(sample) == {"model", "poses", "fast"} | (per_job - set(POSE_KEYS))
    assert set(poses) == {"model", "reference", "driving", "frame_rate"} | (per_job & set(POSE_KEYS))
    assert sample["scheduler"] == (list(allowed_values(types["scheduler"])), sample["scheduler"][1])
    assert sample["steps"][1]["default"] == fields["steps"].default and sample["steps"][1]["min"] == 1
    assert sample["seed"][1]["max"] == fields["seed"].metadata["maximum"] and sample["seed"][1]["min"] == -1
    assert sample["control_scale"][1]["max"] == 10
    assert poses["max_frames"][1]["default"] == 0 and poses["max_frames"][1]["min"] == 0  # None: 0, the preset's
    assert sample["steps"][1]["tooltip"].startswith(fields["steps"].metadata["help"])
    # a widget left at its default is not given (the preset's value applies), any other value is
    options = stage_options(poses=False)
    assert given_values(options, {"steps": 25, "seed": 7, "fast": False, "guidance_sigma_max": 0}) == {
        **{option.name: None for option in options}, "seed": 7}


def test_load_lists_the_model_folders_and_frees_comfyuis_models(comfy, base):
    (base / "models" / "svd-animate" / "my-run" / "pose_encoder").mkdir(parents=True)
    (base / "models" / "diffusers" / "svd-xt").mkdir(parents=True)
    (base / "models" / "diffusers" / "svd-xt" / "model_index.json").write_text("{}")
    declared = comfy.pack.NODE_CLASS_MAPPINGS["SVDAnimateLoad"].INPUT_TYPES()["required"]
    assert declared["weights"][0] == ["(preset's)", "my-run"]
    assert declared["base_model"][0] == ["(preset's)", "svd-xt"]
    assert "tiny" in declared["preset"][0] and declared["preset"][1]["default"] == "controlnext-svd-v2"
    before = comfy.model_management.unloaded
    (model,) = comfy.pack.NODE_CLASS_MAPPINGS["SVDAnimateLoad"]().load(
        "tiny", "(preset's)", "(preset's)", published_sampling=False, dtype="auto", offload="none", low_vram=False,
        compile=False, detector="mediapipe")
    assert comfy.model_management.unloaded == before + 1 and model.config.detector == "mediapipe"
    assert model.device == "cpu" and model._pipe is not None  # loaded by the node, on ComfyUI's device
    load = comfy.pack.NODE_CLASS_MAPPINGS["SVDAnimateLoad"]().load
    settings = dict(published_sampling=False, dtype="auto", low_vram=False, compile=False, detector="mediapipe")
    assert load("tiny", "(preset's)", "(preset's)", offload="none", **settings)[0] is model  # run again: the same
    (other,) = load("tiny", "(preset's)", "(preset's)", offload="model", **settings)
    assert other is not model and other.config.offload == "model"
    assert model._pipe is None  # the previous models let go before others load (ComfyUI does not know ours)


def test_the_nodes_refuse_another_packages_module_of_our_names(comfy, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "pose", types.SimpleNamespace(__file__="/elsewhere/pose/__init__.py"))
    with pytest.raises(ImportError, match="the module 'pose' comes from /elsewhere, not from svd-animate"):
        nodes(comfy).check_our_packages()


def cli_video(tmp_path, reference, clip, *flags) -> bytes:
    from svd_animate.cli import main

    output = tmp_path / f"cli{len(flags)}.mp4"
    assert main(["--preset", "tiny", "--ref", str(reference), "--pose", str(clip), "--no-audio", "--quiet",
                 "-o", str(output), *flags]) in (0, None)
    return output.read_bytes()


CLI_TINY = ("--max-frames", "4")


def saved(base, prefix: str) -> bytes:
    return (base / "output" / f"{prefix}_00001_.mp4").read_bytes()


def test_the_example_workflows_run_on_the_tiny_preset_and_give_the_clis_frames(comfy, clip_inputs, tmp_path):
    base, server = clip_inputs[0].parents[1], {}  # one server's outputs: the model loaded once, as in ComfyUI
    for name, prefix, flags in (("animate.json", "animation", ()), ("fast.json", "fast", ("--fast",))):
        workflow = json.loads((WORKFLOWS / name).read_text())
        comfy.runner.run_workflow(workflow, comfy.mappings, TINY, server)
        assert saved(base, f"svd-animate/{prefix}") == cli_video(tmp_path, *clip_inputs, *CLI_TINY, *flags), name
    # poses only: the skeletons the animation follows, as the library draws them
    results = comfy.runner.run_workflow(json.loads((WORKFLOWS / "poses.json").read_text()), comfy.mappings, TINY,
                                        server)
    job, skeletons, fps = results["5"]
    assert skeletons.dtype == torch.float32 and skeletons.shape == (4, 64, 64, 3)
    assert torch.equal((skeletons * 255).round().to(torch.uint8), torch.from_numpy(job.skeletons()))
    assert fps == pytest.approx(29 / 4)  # the tiny preset's stride 4 over the clip's 29 fps


def test_models_loaded_inside_inference_mode_are_built_outside_it(comfy, base):
    """ComfyUI runs every node under `torch.inference_mode()`; weights made there as inference tensors send some CPU
    kernels another way (the fast workflow's frames then differed from the CLI's in their last bits)."""
    from svd_animate.animate import Animator
    from svd_animate.config import load_preset

    with torch.inference_mode():
        unet = Animator(load_preset("tiny")).pipeline().unet
    assert not any(parameter.is_inference() for parameter in unet.parameters())


def test_workflow_checks_catch_a_mistyped_link_and_a_value_out_of_range(comfy, base):
    (base / "input" / "reference.png").touch()
    (base / "input" / "driving.mp4").touch()
    workflow = json.loads((WORKFLOWS / "animate.json").read_text())
    broken = json.loads(json.dumps(workflow))
    broken["links"][0][5] = "IMAGE"
    with pytest.raises(comfy.runner.WorkflowError, match="type IMAGE is not SVD_ANIMATE_MODEL"):
        comfy.runner.prompt_from_workflow(broken, comfy.mappings)
    prompt = comfy.runner.prompt_from_workflow(workflow, comfy.mappings)
    prompt["5"]["inputs"]["control_scale"] = 11
    with pytest.raises(comfy.runner.WorkflowError, match="value_bigger_than_max control_scale"):
        comfy.runner.validate_prompt(prompt, comfy.mappings)


@pytest.fixture
def tiny_model(comfy, base):
    (model,) = comfy.pack.NODE_CLASS_MAPPINGS["SVDAnimateLoad"]().load(
        "tiny", "(preset's)", "(preset's)", published_sampling=False, dtype="auto", offload="none", low_vram=False,
        compile=False, detector="mediapipe")
    return model


def widget_defaults(cls) -> dict:
    """The node's option widgets at their defaults (`frame_rate`, given in each call, left out)."""
    return {name: spec[1]["default"] for name, spec in cls.INPUT_TYPES()["required"].items()
            if len(spec) > 1 and "default" in spec[1] and name != "frame_rate"}


def images_of(path) -> torch.Tensor:
    from svd_common.video import iter_frames

    return torch.from_numpy(np.stack([frame for _, frame in iter_frames(path)]).astype(np.float32) / 255)


def test_interrupt_stops_sampling_at_the_next_step(comfy, tiny_model, shared_data):
    mappings = comfy.pack.NODE_CLASS_MAPPINGS
    reference = torch.from_numpy(np.asarray(Image.open(shared_data / "ref_controlnext_v2_01.jpeg").convert("RGB"),
                                            np.float32)[None] / 255)
    driving = images_of(shared_data / "driving_controlnext_v2_01.mp4")[:8]
    poses, _, _ = mappings["SVDAnimatePoses"]().poses(tiny_model, reference, driving, 29.0,
                                                       **widget_defaults(mappings["SVDAnimatePoses"]))
    steps = []

    def hook(done, total, preview, node_id=None):  # the user clicks Cancel while step 1 runs
        steps.append((done, total))
        comfy.model_management.interrupt_current_processing()

    comfy.utils.set_progress_bar_global_hook(hook)
    values = {**widget_defaults(mappings["SVDAnimateSample"]), "steps": 4}
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        mappings["SVDAnimateSample"]().sample(tiny_model, poses, **values)
    assert steps == [(1, 4)]
    assert not comfy.model_management.processing_interrupted()  # the check took the click


def test_a_bad_input_is_one_clear_line(comfy, tiny_model, base):
    from svd_common.errors import UserError

    mappings = comfy.pack.NODE_CLASS_MAPPINGS
    poses_node = mappings["SVDAnimatePoses"]()
    frames = torch.rand(4, 64, 64, 3)
    values = widget_defaults(mappings["SVDAnimatePoses"])
    cases = [
        (dict(reference=frames[:2]), "reference: one image expected, got a batch of 2"),
        (dict(reference=frames[0]), "reference: expected ComfyUI images (batch, height, width, 3), got (64, 64, 3)"),
        (dict(values={**values, "width": 100}), "must be multiples of 64"),
        (dict(frame_rate=0.0), "frame_rate must be above 0"),
    ]
    for change, message in cases:
        arguments = dict(reference=frames[:1], driving=frames, frame_rate=10.0, values=values) | change
        with pytest.raises(UserError) as caught:
            poses_node.poses(tiny_model, arguments["reference"], arguments["driving"], arguments["frame_rate"],
                             **arguments["values"])
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_image_batches_go_through_the_files_the_job_reads_exactly_and_once(tmp_path):
    from svd_animate.comfy.frames import clip_file, image_file, images_from_frames, pixels
    from svd_common.video import iter_frames, probe_video, read_image

    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
    images = torch.from_numpy(frames.astype(np.float32) / 255.0)  # as ComfyUI's loaders make them
    assert np.array_equal(pixels(images, "driving"), frames)
    assert np.array_equal(pixels(torch.cat([images, torch.ones(5, 32, 48, 1)], dim=-1), "driving"), frames)
    clip = clip_file(images, 29.97, tmp_path)
    assert np.array_equal(np.stack([frame for _, frame in iter_frames(clip)]), frames)
    assert probe_video(clip).fps == pytest.approx(29.97)
    written = clip.stat().st_mtime_ns
    assert clip_file(images.clone(), 29.97, tmp_path) == clip and clip.stat().st_mtime_ns == written
    assert clip_file(images, 30.0, tmp_path) != clip  # the rate is part of the clip
    assert np.array_equal(read_image(image_file(images[2:3], tmp_path)), frames[2])
    assert torch.equal(images_from_frames(iter(frames), 5, torch.device("cpu")), images)


def test_other_sampler_settings_over_the_same_poses_but_not_other_poses(tmp_path):
    from svd_animate.animate import Animator
    from svd_animate.config import load_preset
    from svd_common.errors import InputError

    job = Animator(load_preset("tiny")).job(tmp_path / "reference.png", tmp_path / "driving.mp4")
    later = job.with_config(job.config.replace(steps=7, seed=3))
    assert (later.config.steps, later.config.seed, job.config.steps) == (7, 3, 3) and later.animator is job.animator
    assert set(POSE_KEYS) == {"width", "height", "stride", "fps", "start", "end", "fill", "max_frames", "align",
                              "detector", "published_sampling", "prepend_reference_pose"}
    with pytest.raises(InputError, match="^width, max_frames: set where the poses are made, fixed after$"):
        job.with_config(job.config.replace(width=128, max_frames=2))
