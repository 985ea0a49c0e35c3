"""`ControlNeXtSVDPipeline`: Stable Video Diffusion driven by pose frames through a `PoseEncoder`.

A sibling of diffusers' `StableVideoDiffusionPipeline`, whose helpers it reuses (image embedding,
VAE conditioning latent, time ids, latents, decoding). What it adds to the denoising loop:
- pose control: at each step the encoder runs on the conditional frames only, once per frame (frames
  shared by overlapping windows are not encoded twice), and its features are added at the configured
  UNet site (see `injection.py`); `control_scale` really scales;
- long videos: overlapping windows planned by `windows.py`, each stepped from the same sigma, fused
  with position weights (or the published uniform mean), one noise tensor for the whole video.
With no encoder (or `control_scale=0`) and a single window it computes exactly what the diffusers
pipeline computes.
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
import torch
from diffusers import StableVideoDiffusionPipeline
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    StableVideoDiffusionPipelineOutput, retrieve_timesteps)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from .deep_cache import DeepCache
from .encoder import PoseEncoder
from .injection import ControlInjector
from .schedules import guidance_applies
from .windows import fusion_weights, plan_windows


class ControlNeXtSVDPipeline(StableVideoDiffusionPipeline):
    model_cpu_offload_seq = "image_encoder->pose_encoder->unet->vae"
    _optional_components = ["pose_encoder"]

    def __init__(self, vae, image_encoder, unet, scheduler: EulerDiscreteScheduler, feature_extractor,
                 pose_encoder: PoseEncoder | None = None):
        super().__init__(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                         feature_extractor=feature_extractor)
        self.register_modules(pose_encoder=pose_encoder)
        self._injector = None
        self._do_classifier_free_guidance = True
        self.control_calls = 0  # pose-encoder calls of the last run (at most one per step and window)
        self.control_frames = 0  # frames those calls encoded
        self.guided_steps = 0  # steps of the last run that ran the unconditional half too
        self.cached_calls = 0  # UNet calls of the last run that reused deep features (DeepCache)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Decided once per call from the scales: diffusers asks the per-frame guidance tensor
        (`.max() > 1`), a device-to-host sync at every use, twice per window and step."""
        return self._do_classifier_free_guidance

    def detach_control(self) -> None:
        """Take the control hook off the UNet. It stays between calls (inactive), so a compiled UNet is not
        traced again for every video; detach it before the UNet is used on its own, e.g. by a training loop."""
        if self._injector is not None:
            self._injector.remove()
            self._injector = None

    def _control_injector(self) -> ControlInjector | None:
        if self.pose_encoder is None:
            return None
        config = self.pose_encoder.config
        if self._injector is None or self._injector.site != config.injection_site:
            if self._injector is not None:
                self._injector.remove()
            self._injector = ControlInjector(self.unet, config.injection_site, config.control_strength)
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
    ):
        """`reference_pose_in_every_window` reproduces the published quirk: pose frame 0 (the reference's
        pose) is fed at position 0 of every window, and those slots get no fusion weight.
        `guidance_interval=(low, high)`: classifier-free guidance only for σ in (low, high], the conditional half
        alone elsewhere (limited-interval guidance). `cache_interval=N`: DeepCache, the deep UNet blocks
        recomputed every N steps only (1: every step, exact). Any diffusers scheduler set as `self.scheduler`
        works: the windows' predictions are fused and the scheduler steps once per step on the whole video."""
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
        self._guidance_scale = max_guidance_scale
        self._do_classifier_free_guidance = max(min_guidance_scale, max_guidance_scale) > 1
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

        # 4. Windows, their fusion weights and per-position guidance
        windows = plan_windows(num_frames, window_size or num_frames, window_overlap)
        length = windows[0][1] - windows[0][0]
        # Fusion in fp32 whatever the model dtype: fp16 weights of three overlapping windows sum to 1 - 2.4e-4,
        # an error that compounds over the steps.
        fusion_dtype = torch.promote_types(latents.dtype, torch.float32)
        weights = [torch.as_tensor(w, device=device, dtype=fusion_dtype).view(1, -1, 1, 1, 1)
                   for w in fusion_weights(windows, num_frames, fusion, drop_first=reference_pose_in_every_window)]
        guidance = torch.linspace(min_guidance_scale, max_guidance_scale, length, device=device, dtype=latents.dtype)
        self._guidance_scale = guidance.view(1, length, *[1] * (latents.ndim - 2))  # per frame, broadcast
        conditions = self._conditions(image_embeddings, image_latents, added_time_ids, length)
        injector = self._control_injector()
        deep_cache = DeepCache(self.unet, cache_interval).attach() if cache_interval > 1 else None
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        self.control_calls = self.control_frames = self.guided_steps = self.cached_calls = 0

        # 5. Denoising loop: each window's guided prediction, fused over the windows; one scheduler step per step
        # (for Euler, affine in the prediction, the same as stepping each window and fusing the latents)
        self._num_timesteps = len(timesteps)
        try:
            with self.progress_bar(total=len(timesteps) * len(windows)) as progress_bar:
                for i, t in enumerate(timesteps):
                    guided = self.do_classifier_free_guidance and guidance_applies(
                        float(self.scheduler.sigmas[i]), guidance_interval)
                    self.guided_steps += guided
                    embeddings, window_image_latents, time_ids = conditions[guided]
                    scaled = self.scheduler.scale_model_input(latents, t)
                    prediction = torch.zeros_like(latents, dtype=fusion_dtype)
                    previous = {}  # this step's control features of the previous window, by frame
                    for index, ((start, end), weight) in enumerate(zip(windows, weights)):
                        window = scaled[:, start:end]
                        cached = deep_cache is not None and deep_cache.prepare(index, i, (1 + guided) * length)
                        if injector is not None:
                            control = None
                            if not cached:  # (a cached step skips every block the control reaches)
                                control, previous = self._window_control(poses, start, end, t,
                                                                         reference_pose_in_every_window, previous)
                            injector.set(control, control_scale)
                        model_input = torch.cat([window] * 2) if guided else window
                        model_input = torch.cat([model_input, window_image_latents], dim=2)
                        noise_pred = self.unet(model_input, t, encoder_hidden_states=embeddings,
                                               added_time_ids=time_ids, return_dict=False)[0]
                        if guided:
                            uncond, cond = noise_pred.chunk(2)
                            noise_pred = uncond + self.guidance_scale * (cond - uncond)
                        prediction[:, start:end] += weight * noise_pred.to(fusion_dtype)
                        progress_bar.update()
                    latents = self.scheduler.step(prediction, t, latents.to(fusion_dtype), **step_kwargs
                                                  ).prev_sample.to(latents.dtype)
                    if callback_on_step_end is not None:
                        values = {"latents": latents, "image_latents": image_latents}
                        outputs = callback_on_step_end(self, i, t, {k: values[k] for k in callback_on_step_end_tensor_inputs})
                        latents = outputs.pop("latents", latents)
        finally:
            if injector is not None:
                injector.clear()
            if deep_cache is not None:
                self.cached_calls = deep_cache.cached_steps
                deep_cache.detach()

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
        return StableVideoDiffusionPipelineOutput(frames=frames)

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
        """The window's control features, and them by frame for the next window. Without temporal
        layers each frame's features depend on that frame and `t` only, so frames shared with the
        previous window (the overlap) are not encoded again."""
        if poses is None:
            return None, {}
        frames = list(range(start, end))
        if reference_first and start > 0:
            frames[0] = 0
        reuse = previous if not self.pose_encoder.config.temporal_layers else {}
        missing = [frame for frame in frames if frame not in reuse]
        encoded = {}
        if missing:
            window = poses[:, missing].to(device=self._execution_device)
            window = window.float() / 255.0 if window.dtype == torch.uint8 else window
            features = self.pose_encoder(window.to(self.pose_encoder.dtype), t)
            encoded = dict(zip(missing, features))
            self.control_calls += 1
            self.control_frames += len(missing)
        by_frame = {frame: encoded[frame] if frame in encoded else reuse[frame] for frame in frames}
        return torch.stack([by_frame[frame] for frame in frames]), by_frame
