"""Samplers and noise schedules for SVD beyond its default (Euler on 25 Karras sigmas).

- Align Your Steps (Sabour et al. 2024): NVIDIA's noise levels optimised for SVD at 10 steps, which diffusers ships as
  `AysSchedules["StableDiffusionVideoSigmas"]`; other step counts are interpolated log-linearly, as the authors do
  (their howto page; ComfyUI's `AlignYourStepsScheduler` does the same).
- Schedulers: only `EulerDiscreteScheduler` in SVD's configuration feeds the UNet the continuous timesteps
  (¼ ln σ) it was trained on; diffusers' `DPMSolverMultistepScheduler` and `EulerAncestralDiscreteScheduler` built
  from that configuration do not. `EDMDPMSolverMultistepScheduler` with SVD's σ range, σ_data 1 and v-prediction
  does (same σ, timesteps and input scaling as SVD's Euler), and gives DPM++ 2M and its stochastic SDE variant.
"""

from __future__ import annotations

import numpy as np

from svd_common.errors import InvalidValue

SCHEDULERS = ("euler", "dpm++2m", "dpm++2m-sde")
SIGMA_SCHEDULES = ("karras", "ays")


def ays_sigmas(steps: int, sigma_min: float = 0.002) -> list[float]:
    """`steps` + 1 noise levels ending in 0: AYS for SVD at 10 steps, log-linearly interpolated for other counts
    (between the schedule's levels with its last one at SVD's σ_min, since log 0 is undefined)."""
    from diffusers.schedulers import AysSchedules

    if steps < 1:
        raise InvalidValue(f"steps must be at least 1, got {steps}")
    levels = [*AysSchedules["StableDiffusionVideoSigmas"][:-1], sigma_min]
    log_levels = np.log(np.asarray(levels[::-1], np.float64))
    positions = np.linspace(0.0, 1.0, len(levels))
    sigmas = np.exp(np.interp(np.linspace(0.0, 1.0, steps + 1), positions, log_levels))[::-1]
    return [*sigmas[:-1].tolist(), 0.0]


def make_scheduler(name: str, svd_config):
    """A fresh scheduler for SVD: `euler` (SVD's own, from its config), `dpm++2m`, `dpm++2m-sde` (EDM DPM-Solver++
    on SVD's σ range; the SDE variant draws noise at each step from the pipeline's generator)."""
    from diffusers import EDMDPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "euler":
        return EulerDiscreteScheduler.from_config(svd_config)
    if name not in SCHEDULERS:
        raise InvalidValue(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return EDMDPMSolverMultistepScheduler(
        sigma_min=svd_config["sigma_min"], sigma_max=svd_config["sigma_max"], sigma_data=1.0,
        sigma_schedule="karras", prediction_type="v_prediction", rho=7.0, solver_order=2,
        algorithm_type="sde-dpmsolver++" if name == "dpm++2m-sde" else "dpmsolver++", final_sigmas_type="zero")

