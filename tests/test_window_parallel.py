"""Window-parallel sampling: one video's windows shared by 2 processes (gloo on the CPU) give one process's latents,
frames and file."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from svd_controlnext.decode import iter_decoded_frames
from svd_controlnext.parallel import WindowParallel, assign_windows, control_batches, shared_control_batches
from svd_controlnext.pipeline import ControlNeXtSVDPipeline, SamplingCounts
from svd_controlnext.tiny import tiny_components
from svd_controlnext.windows import WindowPlan
from svd_common.errors import InputError
from tests.conftest import ROOT

SIZE, FRAMES, STEPS = 32, 13, 3
WINDOWS = dict(window_size=4, window_overlap=1)  # 4 windows: 0-3, 3-6, 6-9, 9-12
CASES = {
    "default": WINDOWS,
    "fast": dict(WINDOWS, cache_interval=2, guidance_interval=(1.0, 1000.0)),  # σ 700, 2.7: guided; 0.002: not
    "three_windows_a_frame": dict(window_size=4, window_overlap=3),  # sums in another order: rounding only
}


def test_windows_are_dealt_in_contiguous_blocks_the_first_ones_larger():
    assert assign_windows(4, 2) == [range(0, 2), range(2, 4)]
    assert assign_windows(5, 2) == [range(0, 3), range(3, 5)]
    assert assign_windows(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert assign_windows(1, 3) == [range(0, 1), range(1, 1), range(1, 1)]
    for windows, world in ((9, 4), (2, 8), (16, 8)):
        blocks = assign_windows(windows, world)
        assert [i for block in blocks for i in block] == list(range(windows))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(ValueError, match="at least one process"):
        assign_windows(3, 0)


def test_a_process_encodes_its_overlap_in_the_batches_one_process_does():
    windows = WindowPlan.make(FRAMES, 4, 1).windows
    assert control_batches(windows, False) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert shared_control_batches(windows, 2, False) == [[4, 5, 6]]  # frame 6, encoded with 4 and 5
    # published: pose frame 0 fed first in every window, encoded once with window 0
    assert control_batches(windows, True) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert shared_control_batches(windows, 2, True) == [[0, 1, 2, 3]]
    wide = [(0, 4), (1, 5), (2, 6)]  # frames 2 and 3 in all three windows
    assert control_batches(wide, False) == [[0, 1, 2, 3], [4], [5]]
    assert shared_control_batches(wide, 2, False) == [[0, 1, 2, 3], [4]]


def components():
    parts = tiny_components()
    for name in ("unet", "vae", "image_encoder", "pose_encoder"):
        parts[name].eval()
    return parts


def sample(pipe, parallel=None, **kwargs):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    poses = torch.rand(FRAMES, 3, SIZE * 4, SIZE * 4, generator=torch.Generator().manual_seed(7))
    return pipe(image, poses, height=SIZE, width=SIZE, num_inference_steps=STEPS, min_guidance_scale=1.0,
                max_guidance_scale=2.5, output_type="latent", generator=torch.Generator().manual_seed(0),
                parallel=parallel, **kwargs)


def worker(rank, world, folder):
    """One process of the group: every case's latents, the gathered frames, and what `from_main` gives."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        parallel, pipe = WindowParallel(rank, world), ControlNeXtSVDPipeline(**components())
        pipe.set_progress_bar_config(disable=True)
        results = {}
        for name, kwargs in CASES.items():
            output = sample(pipe, parallel, **kwargs)
            results[name], results[f"{name}_counts"] = output.frames, dataclasses.asdict(output.counts)
        results["frames"] = [torch.from_numpy(frame) for frame in parallel.decoded_frames(pipe.vae,
                                                                                          results["default"], 3)]
        results["drawn"] = parallel.from_main(lambda: rank + 100)
        try:
            parallel.from_main(lambda: (_ for _ in ()).throw(InputError("bad --pose on process 0")))
        except InputError as error:
            results["error"] = str(error)
        torch.save(results, folder / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    mp.spawn(worker, args=(2, folder), nprocs=2)
    loaded = [torch.load(folder / f"{rank}.pt", weights_only=True) for rank in range(2)]  # tensors, numbers, text
    return [{key: SamplingCounts(**value) if key.endswith("_counts") else value for key, value in results.items()}
            for results in loaded]


@pytest.fixture(scope="module")
def one_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes
    try:
        pipe = ControlNeXtSVDPipeline(**components())
        pipe.set_progress_bar_config(disable=True)
        results = {}
        for name, kwargs in CASES.items():
            output = sample(pipe, **kwargs)
            results[name], results[f"{name}_counts"] = output.frames, output.counts
        results["frames"] = list(iter_decoded_frames(pipe.vae, results["default"], 3))
        return results
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", ["default", "fast"])
def test_two_processes_give_one_process_latents_bit_for_bit(two_processes, one_process, case):
    for results in two_processes:
        assert torch.equal(results[case], one_process[case])


def test_three_windows_over_a_frame_differ_by_rounding_only(two_processes, one_process):
    expected = one_process["three_windows_a_frame"]
    scale = expected.abs().max().item()
    for results in two_processes:
        torch.testing.assert_close(results["three_windows_a_frame"], expected, rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(two_processes[0]["three_windows_a_frame"], two_processes[1]["three_windows_a_frame"])


def test_each_process_runs_its_windows_and_deep_cache_keeps_their_features(two_processes, one_process):
    """4 windows of 4 frames, 3 steps: 2 windows each. The encoder runs on the 7 frames of process 0's windows, and
    on process 1's 6 new ones and the 3 that one process encodes with frame 6, the overlap (one process: 13); under
    --fast the cached steps are shared out the same way."""
    counts = [results["default_counts"] for results in two_processes]
    assert [c.control_calls for c in counts] == [2 * STEPS, 3 * STEPS]
    assert [c.control_frames for c in counts] == [7 * STEPS, 9 * STEPS]
    assert one_process["default_counts"].control_frames == FRAMES * STEPS
    fast = [results["fast_counts"] for results in two_processes]
    assert sum(c.cached_calls for c in fast) == one_process["fast_counts"].cached_calls > 0
    assert [c.guided_steps for c in fast] == [one_process["fast_counts"].guided_steps] * 2


def test_frames_decoded_in_shared_chunks_reach_process_0_in_order(two_processes, one_process):
    frames = two_processes[0]["frames"]
    assert len(frames) == FRAMES and two_processes[1]["frames"] == []
    assert all(np.array_equal(a, b) for a, b in zip(frames, one_process["frames"]))


def test_work_done_once_reaches_every_process_with_its_error(two_processes):
    assert [results["drawn"] for results in two_processes] == [100, 100]
    assert [results["error"] for results in two_processes] == ["bad --pose on process 0"] * 2


# ---- the command ---------------------------------------------------------------------------------

def animate(ref, pose, output, *extra):
    command = [sys.executable, "-m", "svd_animate", "-q", "--ref", str(ref), "--pose", str(pose), "--preset", "tiny",
               "--window", "6", "--overlap", "2", "-o", str(output), *extra]  # 16 frames: 4 windows of 6
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def one_and_two_processes(tmp_path, ref, pose, *extra):
    """The bytes of the video one process writes and of the one two processes write, and the latter's stdout."""
    one = animate(ref, pose, tmp_path / "one.mp4", *extra)
    assert one.returncode == 0, one.stderr[-2000:]
    two = animate(ref, pose, tmp_path / "two.mp4", "--num-processes", "2", *extra)
    assert two.returncode == 0, two.stderr[-2000:]
    return (tmp_path / "one.mp4").read_bytes(), (tmp_path / "two.mp4").read_bytes(), two.stdout


def test_num_processes_2_writes_the_same_mp4_bytes_poses_extracted_by_process_0(shared_data, tmp_path):
    """The CLI end to end (one test: each run starts torch in 3 processes): a real clip whose poses process 0 extracts
    and sends, --fast (DeepCache's features on each window's process), the skeleton beside."""
    ref, pose = shared_data / "ref_controlnext_v2_01.jpeg", shared_data / "driving_controlnext_v2_01.mp4"
    one, two, stdout = one_and_two_processes(tmp_path, ref, pose, "--detector", "mediapipe", "--fast",
                                             "--side-by-side", "--no-cache", "--max-frames", "16")
    assert two == one and stdout.count("two.mp4: 16 frames") == 1  # printed by process 0 only
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one.mp4", "pose-cache", "two.mp4"]  # no part


def test_a_bad_input_is_one_line_before_any_process_starts(tmp_path):
    result = animate(tmp_path / "missing.png", tmp_path / "dance.npz", tmp_path / "out.mp4", "--num-processes", "2")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"svd-animate: error: {tmp_path / 'missing.png'}: no such file"]
