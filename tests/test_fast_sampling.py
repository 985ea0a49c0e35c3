"""The fast-sampling pieces: prediction-space window fusion with one scheduler step, Align Your Steps sigmas, other
diffusers schedulers, limited-interval guidance and DeepCache."""

import numpy as np
import pytest
import torch

from svd_controlnext.deep_cache import HOOK_NAME, DeepCache
from svd_controlnext.pipeline import ControlNeXtSVDPipeline
from svd_controlnext.schedules import ays_sigmas, guidance_applies, make_scheduler
from svd_controlnext.tiny import tiny_components, tiny_unet
from tests.test_pipeline import call_kwargs, pose_frames, reference_image

WINDOWED = dict(num_frames=6, window_size=4, window_overlap=2, num_inference_steps=4, output_type="latent")


@pytest.fixture(scope="module")
def components():
    parts = tiny_components()
    for name in ("unet", "vae", "image_encoder", "pose_encoder"):
        parts[name].eval()
    return parts


def run(components, **overrides):
    pipe = ControlNeXtSVDPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(reference_image(), pose_frames(6), **call_kwargs(**{**WINDOWED, **overrides})).frames
    return pipe, frames


def svd_scheduler():
    return tiny_components()["scheduler"]


def test_one_euler_step_of_fused_predictions_is_the_fusion_of_the_steps():
    """Why fusing predictions reproduces fusing the stepped windows: Euler's step is affine in the prediction
    with coefficients that depend on the shared sample and sigma only (fp64, weights summing to 1)."""
    sample = torch.randn(1, 3, 4, 8, 8, dtype=torch.float64)
    first, second = torch.randn(2, *sample.shape, dtype=torch.float64)
    weight = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64).view(1, 3, 1, 1, 1)

    def step(prediction):
        scheduler = svd_scheduler()
        scheduler.set_timesteps(5)
        return scheduler.step(prediction, scheduler.timesteps[1], sample).prev_sample

    fused_steps = weight * step(first) + (1 - weight) * step(second)
    torch.testing.assert_close(step(weight * first + (1 - weight) * second), fused_steps, rtol=1e-12, atol=1e-12)


def test_ays_sigmas_are_nvidias_at_ten_steps_and_log_linear_between():
    from diffusers.schedulers import AysSchedules

    np.testing.assert_allclose(ays_sigmas(10), AysSchedules["StableDiffusionVideoSigmas"], rtol=1e-12)
    # 6 steps: log-linear interpolation of the 11 levels (0.002 last), by hand at position 1/6 of the way:
    # between levels 1 (54.5) and 2 (15.886) at fraction 2/3 of that interval in log space
    sigmas = ays_sigmas(6)
    assert len(sigmas) == 7 and sigmas[0] == pytest.approx(700.0, rel=1e-12) and sigmas[-1] == 0.0
    assert sigmas[1] == pytest.approx(np.exp(np.log(54.5) + 2 / 3 * (np.log(15.886) - np.log(54.5))), rel=1e-12)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))


def test_ays_sigmas_reach_the_unet_as_svds_continuous_timesteps(components):
    scheduler = svd_scheduler()
    scheduler.set_timesteps(sigmas=ays_sigmas(10))
    np.testing.assert_allclose(scheduler.timesteps.numpy(), 0.25 * np.log(ays_sigmas(10)[:-1]), rtol=1e-6)
    pipe, latents = run(components, sigmas=ays_sigmas(3), num_inference_steps=None)
    assert torch.isfinite(latents).all() and pipe.scheduler.sigmas[0] == pytest.approx(700.0)


@pytest.mark.parametrize("name", ["dpm++2m", "dpm++2m-sde"])
def test_edm_dpm_solvers_see_svds_sigmas_timesteps_and_input_scale(name):
    euler, dpm = svd_scheduler(), make_scheduler(name, svd_scheduler().config)
    euler.set_timesteps(25)
    dpm.set_timesteps(25)
    np.testing.assert_allclose(dpm.sigmas.numpy(), euler.sigmas.numpy(), rtol=1e-5)
    np.testing.assert_allclose(dpm.timesteps.numpy(), euler.timesteps.numpy(), rtol=1e-5, atol=1e-6)
    sample = torch.randn(1, 2, 4, 8, 8)
    torch.testing.assert_close(dpm.scale_model_input(sample, dpm.timesteps[0]),
                               euler.scale_model_input(sample, euler.timesteps[0]), rtol=1e-5, atol=1e-6)


def test_a_stochastic_scheduler_draws_its_noise_from_the_generator_once_per_step(components):
    parts = {**components, "scheduler": make_scheduler("dpm++2m-sde", components["scheduler"].config)}
    _, first = run(parts)
    _, again = run(parts)
    _, other = run(parts, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert torch.isfinite(first).all()


def test_guidance_interval_guides_only_inside_it():
    assert guidance_applies(3.0, None) and guidance_applies(5.42, (0.28, 5.42))
    assert not guidance_applies(0.28, (0.28, 5.42)) and not guidance_applies(6.0, (0.28, 5.42))


def test_limited_interval_guidance_runs_the_unconditional_half_only_inside_the_interval(components):
    pipe, everywhere = run(components)
    assert pipe.guided_steps == 4
    pipe, wide = run(components, guidance_interval=(0.0, float("inf")))
    assert pipe.guided_steps == 4 and torch.equal(wide, everywhere)
    # no step inside: every step is the conditional half alone, as with no guidance at all
    pipe, never = run(components, guidance_interval=(1e6, 1e7))
    assert pipe.guided_steps == 0
    _, unguided = run(components, min_guidance_scale=1.0, max_guidance_scale=1.0)
    torch.testing.assert_close(never, unguided, rtol=1e-6, atol=1e-6 * unguided.abs().max().item())
    sigmas = make_scheduler("euler", components["scheduler"].config)
    sigmas.set_timesteps(4)
    middle = (float(sigmas.sigmas[2]) - 1e-3, float(sigmas.sigmas[1]) + 1e-3)  # steps 1 and 2
    pipe, limited = run(components, guidance_interval=middle)
    assert pipe.guided_steps == 2 and not torch.allclose(limited, everywhere)


def unet_call_inputs(rows=2, frames=3):
    torch.manual_seed(1)
    return dict(sample=torch.randn(rows, frames, 8, 16, 16), timestep=1.0,
                encoder_hidden_states=torch.randn(rows, 1, 32), added_time_ids=torch.randn(rows, 3))


def test_deep_cache_full_steps_are_exact_and_detach_leaves_the_unet_as_it_was():
    unet = tiny_unet().eval()
    inputs = unet_call_inputs()
    with torch.no_grad():
        plain = unet(**inputs).sample
        cache = DeepCache(unet, interval=1).attach()
        assert not cache.prepare("window", step=3, rows=6)  # interval 1: every step is a full one
        hooked = unet(**inputs).sample
        cache.detach()
        after = unet(**inputs).sample
    assert torch.equal(hooked, plain) and torch.equal(after, plain)
    assert all(not getattr(m, "_diffusers_hook", None) or HOOK_NAME not in m._diffusers_hook.hooks
               for m in unet.modules())


def test_a_cached_step_reuses_the_deep_feature_and_a_guided_one_serves_the_conditional_half():
    unet = tiny_unet().eval()
    guided, later = unet_call_inputs(rows=2), unet_call_inputs(rows=1)
    later["timestep"] = 0.9
    with torch.no_grad():
        cache = DeepCache(unet, interval=2).attach()
        calls = []
        handle = unet.mid_block.resnets[0].register_forward_hook(lambda *args: calls.append(1))  # deep: runs or not
        assert not cache.prepare(0, step=0, rows=6)
        unet(**guided)
        assert len(calls) == 1
        assert cache.prepare(0, step=1, rows=3)  # unguided after guided: the conditional half of the kept rows
        cached = unet(**later).sample
        assert len(calls) == 1  # the deep blocks did not run
        assert not cache.prepare(0, step=1, rows=12)  # more rows than were kept: a full step
        handle.remove()
        cache.detach()
        full = unet(**later).sample
    assert cached.shape == full.shape and torch.isfinite(cached).all() and not torch.equal(cached, full)


def test_deep_cache_in_the_pipeline_skips_the_encoder_on_cached_steps_and_detaches(components):
    pipe, uncached = run(components)
    encoder_calls = pipe.control_calls
    pipe, cached = run(components, cache_interval=2)
    assert pipe.cached_calls == 2 * 2  # steps 1 and 3, in both windows
    assert pipe.control_calls == encoder_calls // 2
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in pipe.unet.modules())
    difference = (cached - uncached).abs()
    assert torch.isfinite(cached).all() and 0 < difference.max() <= uncached.abs().max()
    _, every_step = run(components, cache_interval=1)
    assert torch.equal(every_step, uncached)
