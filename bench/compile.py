"""torch.compile (inductor) of the UNet with our control hook: same frames as eager fp32, and the cost.

Tiny components (random weights), two windows, control on. Prints one JSON object as its last line:
`max_abs_diff_latents`, `max_abs_diff_frames` (decoded, in [0, 1]), compile time (first run) and the
time of a run eager and compiled. Run: .venv/bin/python bench/compile.py
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svd_controlnext.pipeline import ControlNeXtSVDPipeline  # noqa: E402
from svd_controlnext.tiny import tiny_components  # noqa: E402


def run(pipe) -> tuple[torch.Tensor, float]:
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    poses = torch.rand(6, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    started = time.perf_counter()
    latents = pipe(image, poses, height=32, width=32, num_frames=6, num_inference_steps=4, window_size=4,
                   window_overlap=2, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    return latents, time.perf_counter() - started


def main():
    eager = ControlNeXtSVDPipeline(**tiny_components())
    compiled = ControlNeXtSVDPipeline(**tiny_components())
    for pipe in (eager, compiled):
        pipe.set_progress_bar_config(disable=True)
    compiled.unet.compile(fullgraph=True)  # fullgraph: any graph break from the hook would fail here
    reference, _ = run(eager)
    _, first = run(compiled)
    latents, compiled_s = run(compiled)
    _, eager_s = run(eager)
    frames = [eager.decode_latents(x, 6, 6).clamp(-1, 1) / 2 + 0.5 for x in (reference, latents)]
    print(json.dumps({
        "machine": f"{platform.machine()} CPU", "backend": "inductor", "components": "tiny", "frames": 6,
        "windows": "4 / overlap 2", "steps": 4,
        "max_abs_diff_latents": float((latents - reference).abs().max()),
        "max_abs_diff_frames": float((frames[0] - frames[1]).abs().max()),
        "first_compiled_run_s": round(first, 1), "compiled_run_s": round(compiled_s, 3), "eager_run_s": round(eager_s, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
