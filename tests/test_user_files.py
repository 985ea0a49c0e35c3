"""A user's files are never destroyed, and the last hostile inputs end in one line (issue: "Never destroy a user's
file"): outputs that are inputs, --device mistakes, non-finite sampling, SIGTERM, Excel CSVs, library noise."""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pose.skeleton import PoseSequence
from svd_animate import cli
from svd_animate.animate import Animator
from svd_animate.config import load_preset
from svd_animate.run import RunSettings
from svd_common.devices import available_devices, check_device
from svd_common.errors import InputError, SamplingError
from svd_common.paths import check_not_input, same_file
from tests.helpers import make_pose

ROOT = Path(__file__).resolve().parents[1]
CLIP = "driving_controlnext_v2_01.mp4"
REF = "ref_controlnext_v2_01.jpeg"


def run(capsys, *args):
    code = cli.main(["-q", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def files(tmp_path):
    """A reference image, a poses file and a stand-in driving clip (bytes only: it must never be read as output)."""
    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), np.full((64, 64, 3), 128, np.uint8))
    poses = tmp_path / "poses.npz"
    PoseSequence.stack([make_pose({0: (0.5, 0.3), 1: (0.5, 0.4)})] * 3, 64, 64, fps=5).save(poses)
    return {"ref": ref, "poses": poses}


# ---- an output that is an input ---------------------------------------------------------------------------

def test_same_file_sees_through_symlinks_hard_links_and_spellings(tmp_path):
    clip = tmp_path / "v.mp4"
    clip.write_bytes(b"the user's clip")
    (tmp_path / "link.mp4").symlink_to(clip)
    os.link(clip, tmp_path / "hard.mp4")
    (tmp_path / "sub").mkdir()
    for other in ("v.mp4", "link.mp4", "hard.mp4", "sub/../v.mp4"):
        assert same_file(tmp_path / other, clip), other
    assert not same_file(tmp_path / "new.mp4", clip)
    with pytest.raises(InputError, match=r"hard\.mp4: the output would overwrite --pose .*v\.mp4; choose another"):
        check_not_input(tmp_path / "hard.mp4", {"--ref": None, "--pose": clip})


@pytest.mark.parametrize("target", ["same", "symlink", "hardlink"])
def test_animate_refuses_an_output_that_is_the_driving_input(files, tmp_path, capsys, target):
    poses = files["poses"]
    before = digest(poses)
    output = {"same": poses, "symlink": tmp_path / "link.npz", "hardlink": tmp_path / "hard.npz"}[target]
    if target == "symlink":
        output.symlink_to(poses)
    elif target == "hardlink":
        os.link(poses, output)
    code, _, stderr = run(capsys, "--ref", files["ref"], "--pose", poses, "--preset", "tiny", "-o", output)
    # (.npz is no video name either: the clash is named first, before the container)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "would overwrite --pose" in stderr, stderr
    assert digest(poses) == before


def test_animate_refuses_the_reference_as_output(files, tmp_path, capsys):
    ref = tmp_path / "ref.gif"
    shutil.copy(files["ref"], ref)
    before = digest(ref)
    code, _, stderr = run(capsys, "--ref", ref, "--pose", files["poses"], "--preset", "tiny", "-o", ref)
    assert code == 2 and "would overwrite --ref" in stderr and digest(ref) == before


def test_pose_command_refuses_its_video_or_reference_as_output_or_preview(shared_data, tmp_path, capsys):
    clip = tmp_path / "v.mp4"
    shutil.copy(shared_data / CLIP, clip)
    before = digest(clip)
    cases = [(["-o", clip], "the output would overwrite --video"),
             (["-o", tmp_path / "p.npz", "--preview", clip], "the preview would overwrite --video"),
             (["-o", tmp_path / "p.npz", "--ref", shared_data / REF, "--preview", shared_data / REF],
              "the preview would overwrite --ref"),
             (["-o", tmp_path / "poses.mp4"], r"poses\.mp4: the poses are saved as \.npz")]
    for extra, message in cases:
        code, _, stderr = run(capsys, "pose", "--video", clip, *extra)
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert re.search(message, stderr), (extra, stderr)
    assert digest(clip) == before and not (tmp_path / "p.npz").exists() and not (tmp_path / "poses.mp4").exists()


def test_batch_lists_an_output_that_is_an_input_with_the_other_problems(files, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"the user's clip")
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"ref,pose,output\n{files['ref']},{clip},{clip}\n{files['ref']},{files['poses']},a.mp4\n"
                        f"{files['ref']},{files['poses']},{files['ref'].with_suffix('.mp4')}\n")
    (tmp_path / "ref.mp4").symlink_to(clip)  # job 3 writes through a link to job 1's clip
    code, _, stderr = run(capsys, "batch", "--jobs", manifest, "-o", tmp_path, "--preset", "tiny", "--overwrite")
    assert code == 2 and "2 problems, nothing was started" in stderr
    assert "job 1: output clip.mp4 would overwrite its own pose" in stderr
    assert "job 3: output ref.mp4 would overwrite job 1's pose" in stderr
    assert clip.read_bytes() == b"the user's clip"


def test_a_multi_process_batch_names_its_problems_once_before_starting_processes(files, tmp_path, capsys,
                                                                                 monkeypatch):
    import svd_animate.launch

    monkeypatch.setattr(svd_animate.launch, "launch_processes", lambda *a: pytest.fail("processes were started"))
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"ref,pose,output\n{files['ref']},{files['poses']},{files['poses']}\n")
    code, _, stderr = run(capsys, "batch", "--jobs", manifest, "-o", tmp_path, "--preset", "tiny",
                          "--num-processes", "2")
    assert code == 2 and "job 1: output poses.npz would overwrite its own pose" in stderr
    code, _, stderr = run(capsys, "batch", "--jobs", manifest, "-o", tmp_path, "--preset", "tiny",
                          "--num-processes", "2", "--device", "banana")
    assert code == 2 and stderr.strip() == "svd-animate: error: --device banana: not a device name (this machine " \
                                           f"has: {', '.join(available_devices())})"


def test_batch_reads_a_csv_saved_by_excel(files, tmp_path):
    from svd_animate.batch import jobs_from_manifest

    manifest = tmp_path / "jobs.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + f"ref,pose,steps\r\n{files['ref']},{files['poses']},2\r\n".encode())
    (job,) = jobs_from_manifest(manifest, tmp_path / "out", load_preset("tiny"))
    assert job.ref == files["ref"] and dict(job.overrides) == {"steps": 2}


def test_a_folder_as_reference_is_named_a_folder(files, tmp_path, capsys):
    code, _, stderr = run(capsys, "--ref", tmp_path, "--pose", files["poses"], "--preset", "tiny",
                          "-o", tmp_path / "out.mp4")
    assert code == 2 and stderr.strip().endswith(f"{tmp_path}: is a folder, expected a file")


# ---- devices -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("banana", "--device banana: not a device name (this machine has: cpu"),
    ("cuda:7", "--device cuda:7: not available on this machine (it has: cpu"),
    ("mps", "--device mps: not available on this machine (it has: cpu"),
])
def test_device_mistakes_are_one_line_naming_the_devices_here(files, tmp_path, capsys, name, message):
    if name in available_devices():
        pytest.skip(f"{name} exists here")
    code, _, stderr = run(capsys, "--ref", files["ref"], "--pose", files["poses"], "--preset", "tiny",
                          "--device", name, "-o", tmp_path / "out.mp4")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr


def test_cuda_on_a_cpu_only_torch_is_refused_when_the_run_is_set_up():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(InputError, match="--device cuda: not available on this machine"):
        Animator(load_preset("tiny"), RunSettings(device="cuda"))
    assert check_device(None) == "cpu" and check_device("cpu") == "cpu"


# ---- non-finite sampling ---------------------------------------------------------------------------------

def test_nan_latents_stop_the_job_before_any_video_is_written(files, tmp_path):
    animator = Animator(load_preset("tiny"), RunSettings(progress=False))
    unet = animator.pipeline().unet

    def poison(module, args, output):  # any cause: an overflow, a bad checkpoint, an extreme setting
        output[0].fill_(float("nan"))

    handle = unet.register_forward_hook(poison)
    out = tmp_path / "out.mp4"
    try:
        with pytest.raises(SamplingError, match="NaN or infinite values at step 1 of 3.*nothing was written"):
            animator(files["ref"], files["poses"], out)
    finally:
        handle.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poses.npz", "ref.png"]


# ---- a poses file and the stride ------------------------------------------------------------------------

def test_a_poses_file_says_it_keeps_its_own_stride(files, tmp_path, caplog):
    poses = PoseSequence.load(files["poses"])
    poses.meta = {**poses.meta, "stride": 1}
    poses.save(files["poses"])
    with Animator(load_preset("tiny").replace(stride=3), RunSettings(progress=False)) as animator:
        animator.poses(files["ref"], files["poses"])
    assert "keeps the stride it was made with (1); this run's stride 3 applies to driving videos only" in caplog.text


# ---- SIGTERM ---------------------------------------------------------------------------------------------

WRITER = """
import sys, time
import svd_animate.animate as animate
from svd_animate import cli
decode = animate.iter_decoded_frames
def slow(*args, **kwargs):
    for index, frame in enumerate(decode(*args, **kwargs)):
        yield frame
        if index == 1:
            print("WRITING", flush=True)
            for _ in range(600):  # short sleeps: a signal taken by another thread (torch's, PyAV's) is handled
                time.sleep(0.1)   # by the main thread at its next bytecode, not after one long sleep
animate.iter_decoded_frames = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_while_writing_exits_143_in_one_line_and_leaves_no_part(files, tmp_path):
    out = tmp_path / "out" / "animation.mp4"
    out.parent.mkdir()
    process = subprocess.Popen([sys.executable, "-c", WRITER, "-q", "--ref", str(files["ref"]), "--pose",
                                str(files["poses"]), "--preset", "tiny", "-o", str(out)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "WRITING"
        assert [p.name.endswith(".part.mp4") for p in out.parent.iterdir()] == [True]  # a part is being written
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143
    assert stderr.strip() == "svd-animate: terminated (SIGTERM); nothing half-written was kept"
    assert list(out.parent.iterdir()) == []


# ---- library noise ---------------------------------------------------------------------------------------

def test_fp16_on_the_cpu_is_said_once_not_by_diffusers_eleven_times(capfd, caplog):
    animator = Animator(load_preset("tiny").replace(dtype="fp16"), RunSettings(progress=False))
    animator.pipeline()
    assert animator.pipeline().unet.dtype == torch.float16
    err = capfd.readouterr().err
    assert "cannot run with `cpu` device" not in err and "should be kept in float32" not in err, err
    assert caplog.text.count("--dtype fp16 on the CPU") == 1


def test_library_user_warnings_are_hidden_unless_verbose(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as shown:
        run(capsys, "pose", "--video", tmp_path / "missing.mp4", "-o", tmp_path / "p.npz")  # installs the filters
        warnings.warn_explicit("cache-system uses symlinks", UserWarning, "file_download.py", 1,
                               module="huggingface_hub.file_download")
        warnings.warn_explicit("ours", UserWarning, "video.py", 1, module="svd_common.video")
    assert [str(w.message) for w in shown] == ["ours"]


# ---- the page ---------------------------------------------------------------------------------------------

def test_a_text_file_uploaded_as_the_reference_is_one_line_in_the_page(shared_data, tmp_path):
    pytest.importorskip("gradio")
    from gradio.data_classes import ImageData

    from svd_animate.ui.jobs import JobRunner
    from svd_animate.ui.page import error_status, reference_image

    notes = tmp_path / "notes.png"
    notes.write_text("a text file with an image's name")
    component = reference_image()
    reference = component.preprocess(ImageData(path=str(notes), orig_name="notes.png"))
    assert reference == str(notes)  # Gradio's own PIL step raised here before; now the job names the problem
    runner = JobRunner(tmp_path / "ui", device="cpu", fixed={"detector": "mediapipe"})
    try:
        with pytest.raises(InputError) as error:
            runner.poses(reference, shared_data / CLIP, {"preset": "tiny"})
    finally:
        runner.close()
    assert error_status(error.value) == f"Error: {notes}: not a readable image"
    assert [p.name for p in (tmp_path / "ui").iterdir()] == []


# ---- weights before poses -----------------------------------------------------------------------------------

def test_weights_that_cannot_be_had_are_named_before_any_pose_is_extracted(shared_data, tmp_path, capsys,
                                                                           monkeypatch):
    import svd_animate.animate

    monkeypatch.setattr(svd_animate.animate, "load_detector", lambda *a, **k: pytest.fail("poses were extracted"))
    out = tmp_path / "out.mp4"
    code, _, stderr = run(capsys, "--ref", shared_data / REF, "--pose", shared_data / CLIP, "--width", "64",
                          "--height", "64", "--max-frames", "4", "-o", out)  # the published preset, offline
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "controlnet.bin" in stderr and "try --preset tiny" in stderr and not out.exists()


# ---- a full disk -------------------------------------------------------------------------------------------

def test_an_output_folder_without_room_is_refused_before_any_pose_is_extracted(shared_data, tmp_path, capsys,
                                                                               monkeypatch):
    import svd_animate.animate
    import svd_common.video

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(svd_common.video.shutil, "disk_usage", lambda folder: usage._replace(free=40_000))
    monkeypatch.setattr(svd_animate.animate, "load_detector", lambda *a, **k: pytest.fail("poses were extracted"))
    out = tmp_path / "out.mp4"
    code, _, stderr = run(capsys, "--ref", shared_data / REF, "--pose", shared_data / CLIP, "--preset", "tiny",
                          "--stride", "1", "--max-frames", "60", "-o", out)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    # 64 KiB of container + 60 frames x 64 x 64 x 3 / 8 bytes = 157696 bytes
    assert "39.1 KiB free in" in stderr and "the video needs about 154.0 KiB" in stderr and not out.exists()


def test_a_poses_file_is_measured_once_its_length_is_known(files, tmp_path, capsys, monkeypatch):
    import svd_common.video

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(svd_common.video.shutil, "disk_usage", lambda folder: usage._replace(free=1000))
    code, _, stderr = run(capsys, "--ref", files["ref"], "--pose", files["poses"], "--preset", "tiny",
                          "-o", tmp_path / "out.mp4")
    assert code == 2 and "1000 B free in" in stderr and "needs about 68.5 KiB" in stderr, stderr  # 65536 + 3 x 1536
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poses.npz", "ref.png"]


def test_sigterm_stops_the_web_page_server_with_143(tmp_path):
    pytest.importorskip("gradio")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "svd_animate", "-q", "ui", "--preset", "tiny", "--port",
                                str(port), "--output-dir", str(tmp_path / "ui")], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "GRADIO_TEMP_DIR": str(tmp_path)})
    try:
        assert f"http://127.0.0.1:{port}" in process.stdout.readline()  # printed once the server listens
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143 and stderr.strip().splitlines()[-1].startswith("svd-animate: terminated"), stderr
