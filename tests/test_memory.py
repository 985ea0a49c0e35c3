import pytest
import torch

from pose.errors import InputError
from svd_controlnext.memory import FrameCost, check_frames_fit, frame_cost, max_frames_that_fit


def test_frame_cost_hand_computed():
    # 576x1024: pose frame 576*1024*3 = 1,769,472 B; latents 3 copies * 4 ch * 72 * 128 * 2 B = 221,184 B.
    assert frame_cost(576, 1024, 2, "cuda") == FrameCost(1_769_472, 221_184)
    assert frame_cost(576, 1024, 2, "cuda", side_by_side=True).host == 2 * 1_769_472
    assert frame_cost(576, 1024, 4, "cpu") == FrameCost(1_769_472 + 442_368, 0)  # all in RAM on the CPU


def test_half_of_the_free_memory_is_for_frames():
    cost = FrameCost(host=100, device=10)
    assert max_frames_that_fit(cost, free_host=10_000, free_device=10**9) == 50  # host-bound
    assert max_frames_that_fit(cost, free_host=10**9, free_device=400) == 20  # device-bound
    assert max_frames_that_fit(FrameCost(100, 0), free_host=10_000, free_device=0) == 50


def test_too_many_frames_refused_with_the_length_that_fits():
    per_frame = frame_cost(64, 64, 4, "cpu").host  # 12,288 + 3*4*8*8*4 = 15,360 B
    free = (per_frame * 20, 0)  # half of it: 10 frames
    check_frames_fit(10, 64, 64, torch.float32, "cpu", free=free)
    with pytest.raises(InputError, match=r"11 frames at 64x64 need about .* GiB .* at most 10 frames fit here: "
                                         r"use --max-frames 10"):
        check_frames_fit(11, 64, 64, torch.float32, "cpu", free=free)


def test_decode_chunk_sized_to_free_memory():
    from svd_controlnext.memory import decode_chunk_for

    # 576x1024 fp16: 0.19 GiB x 9 (pixels vs 256x256) x 0.5 (half precision) = 0.855 GiB a frame;
    # half of 20 GiB free / 0.855 = 11.7 -> 11 frames.
    assert decode_chunk_for(20 * 2**30, 576, 1024, 2) == 11
    assert decode_chunk_for(2**30, 256, 256, 4) == 2  # 0.5 GiB / 0.19 GiB
    assert decode_chunk_for(10**6, 1024, 1024, 4) == 1  # never below one frame
    assert decode_chunk_for(2**40, 64, 64, 4) == 16  # nor above 16
