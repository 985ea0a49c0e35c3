"""`ControlNeXtSVDPipeline`: Stable Video Diffusion driven by pose frames through a `PoseEncoder`.

A sibling of diffusers' `StableVideoDiffusionPipeline`, whose helpers it reuses (image embedding,
VAE conditioning latent, time ids, latents, decoding). What it adds to the denoising loop:
- pose control: at each step the encoder runs on the conditional frames only, once per frame (frames
  shared by overlapping windows are not encoded twice), and its features are added at the configured
  UNet site (see `injection.py`); `control_scale` really scales;
- long videos: overlapping windows (`windows.WindowPlan`), each predicted at the same sigma, the
  predictions fused with position weights (or the published uniform mean), one noise tensor for the
  whole video;
- the fast-sampling pieces: guidance limited to a σ interval (`guidance.GuidancePolicy`) and DeepCache
  (`deep_cache.apply_deep_cache`, on diffusers' hooks like the control hook).
- window-parallel sampling: with `parallel` (`parallel.WindowParallel`), this process predicts its share of the
  windows and the fused prediction is summed over the processes, which all take the same step.
The call returns diffusers' output with `counts` (`SamplingCounts`): what the call did (encoder calls,
guided steps, cached UNet calls), per call and process, not kept on the pipeline.
With no encoder (or `control_scale=0`) and a single window it computes exactly what the diffusers
pipeline computes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from diffusers import StableVideoDiffusionPipeline
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    StableVideoDiffusionPipelineOutput, retrieve_timesteps)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from .deep_cache import DeepCacheConfig, apply_deep_cache
from .encoder import PoseEncoder
from .guidance import GuidancePolicy
from .injection import ControlConfig, ControlInjector, apply_control, find_control
from .parallel import WindowParallel, shared_control_batches, window_frames
from .windows import WindowPlan


@dataclass
class SamplingCounts:
    """What one call did: the work the fast-sampling options save, read by tests and benchmarks."""

    control_calls: int = 0  # pose-encoder calls (at most one per step and window)
    control_frames: int = 0  # frames those calls encoded
    guided_steps: int = 0  # steps that ran the unconditional half too
    cached_calls: int = 0  # UNet calls that reused deep features (DeepCache)


@dataclass
class ControlNeXtSVDPipelineOutput(StableVideoDiffusionPipelineOutput):
    """diffusers' SVD output (`frames`) and the call's `counts`."""

    counts: SamplingCounts = field(default_factory=SamplingCounts)


class ControlNeXtSVDPipeline(StableVideoDiffusionPipeline):
    model_cpu_offload_seq = "image_encoder->pose_encoder->unet->vae"
    _optional_components = ["pose_encoder"]

    def __init__(self, vae, image_encoder, unet, scheduler: EulerDiscreteScheduler, feature_extractor,
                 pose_encoder: PoseEncoder | None = None):
        super().__init__(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                         feature_extractor=feature_extractor)
        self.register_modules(pose_encoder=pose_encoder)
        self._injector = None  # the UNet's control hook, kept between calls
        self._owns_injector = False  # registered by this pipeline (not found on the UNet)
        self._do_classifier_free_guidance = True

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Decided once per call from the scales: diffusers asks the per-frame guidance tensor
        (`.max() > 1`), a device-to-host sync at every use, twice per window and step."""
        return self._do_classifier_free_guidance

    def detach_control(self) -> None:
        """Take the control hook off the UNet. It stays between calls (inactive), so a compiled UNet is not
        traced again for every video; detach it before the UNet is used on its own. A hook this pipeline found
        on the UNet (a training loop's, for its validation samples) is left to its owner."""
        if self._injector is not None and self._owns_injector:
            self._injector.remove()
        self._injector = None

    def _control_injector(self) -> ControlInjector | None:
        if self.pose_encoder is None:
            return None
        config = ControlConfig(self.pose_encoder.config.injection_site, self.pose_encoder.config.control_strength)
        current = find_control(self.unet, config.site)
        if self._injector is None or current is not self._injector or current.config != config:
            self.detach_control()
            self._owns_injector = find_control(self.unet, config.site) is None
            self._injector = apply_control(self.unet, config)
        return self._injector

    @staticmethod
    def prepare_pose_frames(pose_frames) -> torch.Tensor:
        """(F, H, W, 3) uint8 / (F, 3, H, W) or (1, F, 3, H, W) floats in [0, 1] -> (1, F, 3, H, W).

        uint8 frames stay uint8 on the CPU; each window is converted when it is encoded, so a long
        video never holds all its pose frames as floats on the device.
        """
        if isinstance(pose_frames, np.ndarray):
            if pose_frames.dtype != np.uint8 or pose_frames.ndim != 4:
                raise ValueError("numpy pose frames must be uint8 (F, H, W, 3)")
            pose_frames = torch.from_numpy(pose_frames).permute(0, 3, 1, 2)
        if pose_frames.ndim == 4:
            pose_frames = pose_frames.unsqueeze(0)
        if pose_frames.ndim != 5 or pose_frames.shape[2] != 3:
            raise ValueError(f"pose frames must be (F, 3, H, W) or (1, F, 3, H, W), got {tuple(pose_frames.shape)}")
        return pose_frames

    @torch.no_grad()
    def __call__(
        self,
        image,
        pose_frames=None,
        height: int = 576,
        width: int = 1024,
        num_frames: int | None = None,
        num_inference_steps: int = 25,
        sigmas: list[float] | None = None,
        min_guidance_scale: float = 1.0,
        max_guidance_scale: float = 3.0,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        control_scale: float = 1.0,
        window_size: int | None = None,
        window_overlap: int = 0,
        fusion: str = "ramp",
        reference_pose_in_every_window: bool = False,
        guidance_interval: tuple[float, float] | None = None,
        cache_interval: int = 1,
        decode_chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        return_dict: bool = True,
        parallel: WindowParallel | None = None,
    ):
        """`reference_pose_in_every_window` reproduces the published quirk: pose frame 0 (the reference's
        pose) is fed at position 0 of every window, and those slots get no fusion weight.
        `guidance_interval=(low, high)`: classifier-free guidance only for σ in (low, high], the conditional half
        alone elsewhere (limited-interval guidance). `cache_interval=N`: DeepCache, the deep UNet blocks
        recomputed every N steps only (1: every step, exact). Any diffusers scheduler set as `self.scheduler`
        works: the windows' predictions are fused and the scheduler steps once per step on the whole video.
        `parallel`: this process samples its share of the windows in a group that shares the video (every process
        makes the same call and gets the same latents; see `parallel.py`); None: one process, every window."""
        # 1. Check inputs
        self.check_inputs(image, height, width)
        device = self._execution_device
        poses = None
        if pose_frames is not None and self.pose_encoder is not None and control_scale != 0:
            poses = self.prepare_pose_frames(pose_frames)
        if num_frames is None:
            num_frames = poses.shape[1] if poses is not None else self.unet.config.num_frames
        if poses is not None and poses.shape[1] != num_frames:
            raise ValueError(f"got {poses.shape[1]} pose frames for {num_frames} video frames")
        decode_chunk_size = decode_chunk_size or num_frames
        guidance = GuidancePolicy(min_guidance_scale, max_guidance_scale, guidance_interval)
        self._do_classifier_free_guidance = guidance.enabled
        batch_size = 1

        # 2. Encode the reference image (CLIP embedding, noisy VAE latent) once for the whole video
        image_embeddings = self._encode_image(image, device, 1, self.do_classifier_free_guidance)
        image = self.video_processor.preprocess(image, height=height, width=width).to(device)
        noise = randn_tensor(image.shape, generator=generator, device=device, dtype=image.dtype)
        image = image + noise_aug_strength * noise
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.vae.to(dtype=torch.float32)
        image_latents = self._encode_vae_image(image.to(self.vae.dtype), device, 1, self.do_classifier_free_guidance)
        image_latents = image_latents.to(image_embeddings.dtype)
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        added_time_ids = self._get_add_time_ids(fps - 1, motion_bucket_id, noise_aug_strength,
                                                image_embeddings.dtype, batch_size, 1,
                                                self.do_classifier_free_guidance).to(device)

        # 3. Timesteps and one noise tensor for the whole video
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, None, sigmas)
        latents = self.prepare_latents(batch_size, num_frames, self.unet.config.in_channels, height, width,
                                       image_embeddings.dtype, device, generator, latents)

        # 4. Windows and their fusion weights, per-frame guidance scales, the UNet's conditions
        plan = WindowPlan.make(num_frames, window_size, window_overlap, fusion, reference_pose_in_every_window)
        # Fusion in fp32 whatever the model dtype: fp16 weights of three overlapping windows sum to 1 - 2.4e-4,
        # an error that compounds over the steps.
        fusion_dtype = torch.promote_types(latents.dtype, torch.float32)
        weights = [torch.as_tensor(w, device=device, dtype=fusion_dtype).view(1, -1, 1, 1, 1) for w in plan.weights]
        self._guidance_scale = guidance.frame_scales(plan.length, latents.ndim, device, latents.dtype)
        conditions = self._conditions(image_embeddings, image_latents, added_time_ids, plan.length)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        counts = SamplingCounts()
        own = parallel.windows(len(plan)) if parallel is not None else range(len(plan))

        # 5. Denoising loop: each window's guided prediction, fused over the windows; one scheduler step per step
        # (for Euler, affine in the prediction, the same as stepping each window and fusing the latents)
        self._num_timesteps = len(timesteps)
        injector = self._control_injector()
        cache = apply_deep_cache(self.unet, DeepCacheConfig(cache_interval)) if cache_interval > 1 else None
        try:
            with self.progress_bar(total=len(timesteps) * len(own)) as progress_bar:
                for i, t in enumerate(timesteps):
                    guided = guidance.guides(float(self.scheduler.sigmas[i]))
                    counts.guided_steps += guided
                    scaled = self.scheduler.scale_model_input(latents, t)
                    prediction = torch.zeros_like(latents, dtype=fusion_dtype)
                    previous = {}  # this step's control features of the previous window, by frame
                    for index in own:
                        (start, end), weight = plan.windows[index], weights[index]
                        cached = cache is not None and cache.prepare(index, i, (1 + guided) * plan.length)
                        if injector is not None:
                            control = None
                            if not cached:  # (a cached step skips every block the control reaches)
                                if index == own.start > 0:  # this process's first window: the overlap's features
                                    previous = self._shared_control(poses, plan, index, t,
                                                                    reference_pose_in_every_window, counts)
                                control, previous, encoded = self._window_control(
                                    poses, start, end, t, reference_pose_in_every_window, previous)
                                counts.control_calls += encoded > 0
                                counts.control_frames += encoded
                            injector.set(control, control_scale)
                        noise_pred = self._guided_prediction(scaled[:, start:end], t, conditions[guided], guided)
                        prediction[:, start:end] += weight * noise_pred.to(fusion_dtype)
                        progress_bar.update()
                    if parallel is not None:
                        parallel.fuse(prediction)
                    latents = self.scheduler.step(prediction, t, latents.to(fusion_dtype), **step_kwargs
                                                  ).prev_sample.to(latents.dtype)
                    if callback_on_step_end is not None:
                        values = {"latents": latents, "image_latents": image_latents}
                        outputs = callback_on_step_end(self, i, t, {k: values[k] for k in callback_on_step_end_tensor_inputs})
                        latents = outputs.pop("latents", latents)
        finally:
            if injector is not None:
                injector.clear()
            if cache is not None:
                counts.cached_calls = cache.cached_steps
                cache.finish()

        # 6. Decode
        if output_type == "latent":
            frames = latents
        else:
            if needs_upcasting:
                self.vae.to(dtype=torch.float16)
            frames = self.decode_latents(latents, num_frames, decode_chunk_size)
            frames = self.video_processor.postprocess_video(video=frames, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return frames
        return ControlNeXtSVDPipelineOutput(frames=frames, counts=counts)

    def _guided_prediction(self, window, t, condition, guided: bool) -> torch.Tensor:
        """The UNet's prediction for one window: on the doubled batch, combined with the per-frame scales, when the
        step is guided; on the conditional half alone otherwise."""
        embeddings, image_latents, time_ids = condition
        model_input = torch.cat([window] * 2) if guided else window
        model_input = torch.cat([model_input, image_latents], dim=2)
        noise_pred = self.unet(model_input, t, encoder_hidden_states=embeddings, added_time_ids=time_ids,
                               return_dict=False)[0]
        if not guided:
            return noise_pred
        uncond, cond = noise_pred.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def _conditions(self, image_embeddings, image_latents, added_time_ids, length: int) -> dict[bool, tuple]:
        """What conditions the UNet, by whether the step is guided: the doubled batch [unconditional, conditional]
        prepared for guidance, or its conditional half alone (limited-interval guidance; no guidance at all)."""
        def window(latents):
            return latents.unsqueeze(1).repeat(1, length, 1, 1, 1)

        guided = (image_embeddings, window(image_latents), added_time_ids)
        if not self.do_classifier_free_guidance:
            return {False: guided}
        return {True: guided, False: tuple(tensor[-1:] for tensor in guided)}

    def _window_control(self, poses, start, end, t, reference_first, previous):
        """The window's control features, them by frame for the next window, and how many frames were encoded.
        Without temporal layers each frame's features depend on that frame and `t` only, so frames shared with
        the previous window (the overlap) are not encoded again."""
        if poses is None:
            return None, {}, 0
        frames = window_frames(start, end, reference_first)
        reuse = previous if not self.pose_encoder.config.temporal_layers else {}
        missing = [frame for frame in frames if frame not in reuse]
        encoded = self._encode_poses(poses, missing, t) if missing else {}
        by_frame = {frame: encoded[frame] if frame in encoded else reuse[frame] for frame in frames}
        return torch.stack([by_frame[frame] for frame in frames]), by_frame, len(missing)

    def _encode_poses(self, poses, frames: list[int], t) -> dict[int, torch.Tensor]:
        """The control features of `frames`, encoded together, by frame."""
        window = poses[:, frames].to(device=self._execution_device)
        window = window.float() / 255.0 if window.dtype == torch.uint8 else window
        return dict(zip(frames, self.pose_encoder(window.to(self.pose_encoder.dtype), t)))

    def _shared_control(self, poses, plan: WindowPlan, first: int, t, reference_first, counts) -> dict:
        """Window-parallel: the features of the frames that window `first` shares with the window before it (another
        process's), encoded in one process's batches, so they are its features bit for bit."""
        if poses is None or self.pose_encoder.config.temporal_layers:
            return {}
        features = {}
        for frames in shared_control_batches(plan.windows, first, reference_first):
            features.update(self._encode_poses(poses, frames, t))
            counts.control_calls += 1
            counts.control_frames += len(frames)
        return features
