"""The fast-sampling pieces: prediction-space window fusion with one scheduler step, Align Your Steps sigmas, other
diffusers schedulers, limited-interval guidance and DeepCache."""

import dataclasses

import numpy as np
import pytest
import torch

from svd_controlnext.deep_cache import HOOK_NAME, DeepCacheConfig, apply_deep_cache, remove_deep_cache, reuses_feature
from svd_controlnext.guidance import GuidancePolicy, guidance_applies
from svd_controlnext.pipeline import ControlNeXtSVDPipeline
from svd_controlnext.schedules import ays_sigmas, make_scheduler
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
    """(the pipeline, the call's result: `.frames`, `.counts`)."""
    pipe = ControlNeXtSVDPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe(reference_image(), pose_frames(6), **call_kwargs(**{**WINDOWED, **overrides}))


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
    pipe, result = run(components, sigmas=ays_sigmas(3), num_inference_steps=None)
    assert torch.isfinite(result.frames).all() and pipe.scheduler.sigmas[0] == pytest.approx(700.0)


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
    first, again, other = (run(parts, **extra)[1].frames for extra in (
        {}, {}, {"generator": torch.Generator().manual_seed(1)}))
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert torch.isfinite(first).all()


def test_guidance_interval_guides_only_inside_it():
    assert guidance_applies(3.0, None) and guidance_applies(5.42, (0.28, 5.42))
    assert not guidance_applies(0.28, (0.28, 5.42)) and not guidance_applies(6.0, (0.28, 5.42))


def test_guidance_policy_decides_once_which_steps_guide_and_scales_each_frame():
    policy = GuidancePolicy(min_scale=1.0, max_scale=2.5, interval=(0.28, 5.42))
    assert policy.enabled and policy.guides(5.42) and not policy.guides(0.28) and not policy.guides(6.0)
    assert not GuidancePolicy(1.0, 1.0).enabled and not GuidancePolicy(1.0, 1.0).guides(3.0)
    assert GuidancePolicy(0.5, 1.5).guides(3.0)  # a scale above 1 on some frame: guided, interval None: every step
    scales = GuidancePolicy(1.0, 2.5).frame_scales(4, ndim=5)
    assert scales.shape == (1, 4, 1, 1, 1)
    torch.testing.assert_close(scales.flatten(), torch.tensor([1.0, 1.5, 2.0, 2.5]), rtol=1e-6, atol=1e-6)


def test_limited_interval_guidance_runs_the_unconditional_half_only_inside_the_interval(components):
    _, everywhere = run(components)
    assert everywhere.counts.guided_steps == 4
    _, wide = run(components, guidance_interval=(0.0, float("inf")))
    assert wide.counts.guided_steps == 4 and torch.equal(wide.frames, everywhere.frames)
    # no step inside: every step is the conditional half alone, as with no guidance at all
    _, never = run(components, guidance_interval=(1e6, 1e7))
    assert never.counts.guided_steps == 0
    unguided = run(components, min_guidance_scale=1.0, max_guidance_scale=1.0)[1].frames
    torch.testing.assert_close(never.frames, unguided, rtol=1e-6, atol=1e-6 * unguided.abs().max().item())
    sigmas = make_scheduler("euler", components["scheduler"].config)
    sigmas.set_timesteps(4)
    middle = (float(sigmas.sigmas[2]) - 1e-3, float(sigmas.sigmas[1]) + 1e-3)  # steps 1 and 2
    _, limited = run(components, guidance_interval=middle)
    assert limited.counts.guided_steps == 2 and not torch.allclose(limited.frames, everywhere.frames)


def unet_call_inputs(rows=2, frames=3):
    torch.manual_seed(1)
    return dict(sample=torch.randn(rows, frames, 8, 16, 16), timestep=1.0,
                encoder_hidden_states=torch.randn(rows, 1, 32), added_time_ids=torch.randn(rows, 3))


def deep_cache_hooks(unet) -> int:
    return sum(HOOK_NAME in module._diffusers_hook.hooks for module in unet.modules()
               if hasattr(module, "_diffusers_hook"))


def test_deep_cache_full_steps_are_exact_and_detach_leaves_the_unet_as_it_was():
    unet = tiny_unet().eval()
    inputs = unet_call_inputs()
    with torch.no_grad():
        plain = unet(**inputs).sample
        cache = apply_deep_cache(unet, DeepCacheConfig(interval=1))
        assert deep_cache_hooks(unet) == len(unet.down_blocks) + len(unet.up_blocks) - 1  # down 1:, mid, up :-1
        assert not cache.prepare("window", step=3, rows=6)  # interval 1: every step is a full one
        hooked = unet(**inputs).sample
        remove_deep_cache(unet)
        after = unet(**inputs).sample
    assert torch.equal(hooked, plain) and torch.equal(after, plain)
    assert deep_cache_hooks(unet) == 0


def test_a_cached_step_reuses_the_deep_feature_and_a_guided_one_serves_the_conditional_half():
    unet = tiny_unet().eval()
    guided, later = unet_call_inputs(rows=2), unet_call_inputs(rows=1)
    later["timestep"] = 0.9
    with torch.no_grad():
        cache = apply_deep_cache(unet, DeepCacheConfig(interval=2))
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
        remove_deep_cache(unet)
        full = unet(**later).sample
    assert cached.shape == full.shape and torch.isfinite(cached).all() and not torch.equal(cached, full)


def test_the_cache_policy_reuses_on_steps_between_full_ones_when_the_kept_rows_cover_the_call():
    assert [reuses_feature(step, 3, 6, 6) for step in range(7)] == [False, True, True, False, True, True, False]
    assert reuses_feature(1, 2, 12, 6)  # a guided full step's feature serves an unguided call (its conditional half)
    assert not reuses_feature(1, 2, 6, 12)  # an unguided feature cannot serve a guided call
    assert not reuses_feature(1, 2, None, 6)  # nothing kept for this window yet
    assert not reuses_feature(5, 1, 6, 6)  # interval 1: every step is a full one
    with pytest.raises(ValueError, match="cache interval must be at least 1, got 0"):
        DeepCacheConfig(interval=0)


def test_deep_cache_in_the_pipeline_skips_the_encoder_on_cached_steps_and_passes_through_after(components):
    _, uncached = run(components)
    pipe, cached = run(components, cache_interval=2)
    assert (uncached.counts.cached_calls, cached.counts.cached_calls) == (0, 2 * 2)  # steps 1 and 3, both windows
    assert cached.counts.control_calls == uncached.counts.control_calls // 2
    difference = (cached.frames - uncached.frames).abs()
    assert torch.isfinite(cached.frames).all() and 0 < difference.max() <= uncached.frames.abs().max()
    _, every_step = run(components, cache_interval=1)
    assert torch.equal(every_step.frames, uncached.frames)
    # The hooks stay (a compiled UNet is not traced again), passing through and keeping nothing between calls; the
    # next cached call starts afresh.
    hooks = deep_cache_hooks(pipe.unet)
    state = apply_deep_cache(pipe.unet, DeepCacheConfig(2))
    assert hooks == len(pipe.unet.down_blocks) + len(pipe.unet.up_blocks) - 1 and deep_cache_hooks(pipe.unet) == hooks
    state.finish()
    assert not state.enabled and not state.features and state.latest is None
    plain = pipe(reference_image(), pose_frames(6), **call_kwargs(**WINDOWED))
    assert torch.equal(plain.frames, uncached.frames) and state.latest is None
    again = pipe(reference_image(), pose_frames(6), **call_kwargs(**WINDOWED, cache_interval=2))
    assert torch.equal(again.frames, cached.frames) and again.counts.cached_calls == 4


# ---- the application: options, --fast, the fast preset --------------------------------------------------------

def test_fast_preset_is_the_published_model_sampled_fast():
    from svd_animate.config import FAST_SAMPLING, load_preset

    fast, published = load_preset("fast"), load_preset("controlnext-svd-v2")
    assert fast.fast_sampling and {key: getattr(fast, key) for key in FAST_SAMPLING} == FAST_SAMPLING
    unchanged = {"base_model", "control_weights", "unet_weights", "width", "height", "window", "overlap", "stride",
                 "motion_bucket_id", "fps_id", "min_guidance", "max_guidance"}
    assert {key: getattr(fast, key) for key in unchanged} == {key: getattr(published, key) for key in unchanged}


def test_fast_flag_keeps_explicit_flags_and_refuses_the_published_path(tmp_path, capsys):
    from svd_animate import cli
    from svd_animate.animate import pipeline_arguments

    args = cli.build_parser().parse_args(["animate", "--ref", "r.png", "--pose", "p.mp4", "--fast", "--steps", "12"])
    config = cli.config_from_args(args)
    assert (config.steps, config.sigma_schedule, config.cache_interval) == (12, "ays", 2)
    arguments = pipeline_arguments(config)
    assert arguments["num_inference_steps"] is None and arguments["sigmas"] == ays_sigmas(12)
    assert arguments["guidance_interval"] == (0.28, 5.42) and arguments["cache_interval"] == 2
    every_step = dataclasses.replace(config, guidance_sigma_max=None, guidance_sigma_min=0.0)
    assert pipeline_arguments(every_step)["guidance_interval"] is None
    base = ["-q", "--ref", str(tmp_path / "r.png"), "--pose", str(tmp_path / "p.mp4"), "--preset", "tiny"]
    for extra, message in [
            (["--fast", "--published-sampling"], "the fast settings and the published sampling exclude each other"),
            (["--sigma-schedule", "ays", "--scheduler", "dpm++2m"],
             "sigma_schedule ays needs scheduler euler (dpm++2m makes its own noise levels)"),
            (["--guidance-sigma-min", "2", "--guidance-sigma-max", "1"],
             "guidance_sigma_max (1) must be above guidance_sigma_min (2)"),
            (["--cache-interval", "0"], "--cache-interval must be at least 1, got 0")]:
        assert cli.main([*base, *extra]) == 2
        assert capsys.readouterr().err == f"svd-animate: error: {message}\n"


def test_fast_run_end_to_end_on_the_tiny_preset(tmp_path, capsys, monkeypatch):
    """`--fast` reaches the pipeline: AYS sigmas, fewer guided steps, cached UNet calls, a DPM++ scheduler swap."""
    import cv2

    from pose.skeleton import PoseSequence
    from svd_animate import cli
    from svd_animate.animate import Animator
    from tests.helpers import make_pose

    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), np.full((64, 64, 3), 128, np.uint8))
    poses = tmp_path / "poses.npz"
    PoseSequence.stack([make_pose({0: (0.5, 0.3), 1: (0.5, 0.4)})] * 3, 64, 64, fps=5).save(poses)
    seen = {}
    original, call = Animator.pipeline, ControlNeXtSVDPipeline.__call__

    def spy(self):
        pipe = original(self)
        seen["pipe"] = pipe
        return pipe

    def recording(self, *args, **kwargs):
        result = call(self, *args, **kwargs)
        seen["counts"] = result.counts
        return result

    monkeypatch.setattr(Animator, "pipeline", spy)
    monkeypatch.setattr(ControlNeXtSVDPipeline, "__call__", recording)
    common = ["-q", "--ref", ref, "--pose", poses, "--preset", "tiny", "-o"]
    assert cli.main([*map(str, common), str(tmp_path / "fast.mp4"), "--fast", "--steps", "4"]) == 0
    pipe = seen["pipe"]
    assert len(pipe.scheduler.sigmas) == 5 and float(pipe.scheduler.sigmas[0]) == pytest.approx(700.0)
    assert seen["counts"].cached_calls == 2 and seen["counts"].guided_steps < 4
    assert cli.main([*map(str, common), str(tmp_path / "dpm.mp4"), "--scheduler", "dpm++2m-sde"]) == 0
    assert type(seen["pipe"].scheduler).__name__ == "EDMDPMSolverMultistepScheduler"
    assert "3 frames" in capsys.readouterr().out
