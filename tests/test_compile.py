"""`--compile` (issue: a faster default on the GPU), checked on the CPU with torch.compile's `eager` backend (dynamo's
tracing and guards, which decide graph breaks and recompiles, are the same for every backend): the compiled UNet
(with the control and DeepCache hooks) and VAE decoder give the eager frames, and more windows or steps trace nothing
new."""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from svd_animate.animate import pipeline_arguments, prepare_pipeline
from svd_animate.config import load_preset, with_fast_sampling
from svd_controlnext.decode import iter_decoded_frames
from svd_controlnext.pipeline import ControlNeXtSVDPipeline
from svd_controlnext.schedules import ays_sigmas
from svd_controlnext.tiny import tiny_components
from tests.test_pipeline import pose_frames, reference_image


def sample_and_decode(pipe, frames: int, steps: int, chunk: int = 3):
    config = with_fast_sampling(load_preset("tiny")).replace(window=4, overlap=1)
    arguments = {**pipeline_arguments(config), "sigmas": ays_sigmas(steps)}
    result = pipe(reference_image(), pose_frames(frames), num_frames=frames, output_type="latent",
                  generator=torch.Generator().manual_seed(0), **arguments)
    decoded = np.stack(list(iter_decoded_frames(pipe.vae, result.frames, chunk, progress=False)))
    return result, decoded


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_fast_sampling_and_decoding_equal_eager_and_do_not_retrace_for_more_windows_or_steps(fresh_dynamo):
    eager = ControlNeXtSVDPipeline(**tiny_components(0))
    eager.set_progress_bar_config(disable=True)
    expected, expected_frames = sample_and_decode(eager, frames=7, steps=4)

    pipe = ControlNeXtSVDPipeline(**tiny_components(0))
    pipe.set_progress_bar_config(disable=True)
    prepare_pipeline(pipe, "cpu", compile=True, compile_backend="eager")
    result, frames = sample_and_decode(pipe, frames=7, steps=4)
    assert result.counts == expected.counts and result.counts.cached_calls > 0 and result.counts.guided_steps > 0
    scale = expected.frames.abs().max().item()
    torch.testing.assert_close(result.frames, expected.frames, rtol=1e-5, atol=1e-5 * scale)
    assert np.abs(frames.astype(int) - expected_frames.astype(int)).max() <= 1  # uint8 rounding of the same floats
    assert not counters["graph_break"]
    # UNet: full guided, full unguided, cached; decoder: a chunk of 3 and the last one of 1
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 5, graphs

    longer, _ = sample_and_decode(pipe, frames=10, steps=6)  # 3 windows, 6 steps, chunks 3 3 3 1
    assert longer.counts.cached_calls > result.counts.cached_calls
    assert counters["stats"]["unique_graphs"] == graphs  # nothing traced again
