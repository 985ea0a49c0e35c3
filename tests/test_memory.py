import pytest
import torch

from svd_animate.memory import FrameCost, check_frames_fit, frame_cost, max_frames_that_fit
from svd_common.errors import ResourceError


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
    with pytest.raises(ResourceError, match=r"11 frames at 64x64 need about .* GiB .* at most 10 frames fit here: "
                                         r"use --max-frames 10"):
        check_frames_fit(11, 64, 64, torch.float32, "cpu", free=free)


def test_decode_chunk_sized_to_free_memory():
    from svd_animate.memory import decode_chunk_for

    # 576x1024 fp16: 2.33 GiB x 0.5 (half precision) = 1.165 GiB a frame; half of 20 GiB free / 1.165 = 8.6 -> 8.
    assert decode_chunk_for(20 * 2**30, 576, 1024, 2) == 8
    assert decode_chunk_for(2**30, 256, 256, 4) == 1  # 0.5 GiB / (2.33 GiB / 9 = 0.259 GiB) = 1.9
    assert decode_chunk_for(2 * 2**30, 256, 256, 4) == 3  # 1 GiB / 0.259 GiB = 3.9
    assert decode_chunk_for(10**6, 1024, 1024, 4) == 1  # never below one frame
    assert decode_chunk_for(2**40, 64, 64, 4) == 16  # nor above 16


def test_free_cuda_memory_counts_the_allocators_unused_cache(monkeypatch):
    """After sampling, the caching allocator keeps the activations' blocks: the driver calls them used,
    but the decoder's tensors can take them."""
    from svd_animate import memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**30, 24 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 12 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5 * 2**30)
    host, device = memory.free_memory("cuda")
    assert device == (3 + 12 - 5) * 2**30 and host > 0


def test_fake_tensor_tracker_counts_the_live_bytes_of_repeated_calls():
    """bench/memory.py's instrument: on fake tensors (no storage), the activation peak is the bytes of
    the tensors alive together, here two (500, 2000) fp32 outputs; a module called again is not refused."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.memory import GIB, tracked

    with FakeTensorMode():
        layer = torch.nn.Linear(1000, 2000)
        inputs = torch.zeros(500, 1000)
        with tracked([layer]) as run:
            first, second = layer(inputs), layer(inputs)
            del first, second
            layer(inputs)
    assert run.activations * GIB == 2 * 500 * 2000 * 4
