"""The settings of a whole run, beyond the generation config: which weights, which device, where poses are cached,
where DWPose lives, whether progress is shown, whether this process shares each video with others. Built once by
each front end (`RunSettings.from_values` on the CLI's flags, batch, the web page) and handed to the `Animator` as
one object."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from svd_controlnext.parallel import WindowParallel


@dataclasses.dataclass(frozen=True)
class RunSettings:
    weights: Path | None = None  # a folder from `convert` or training (pose_encoder/, unet/)
    device: str | None = None  # None: the GPU when there is one, else the CPU
    cache_dir: Path | None = None  # the pose cache (None: $SVD_ANIMATE_CACHE or ~/.cache/svd-animate/poses)
    use_cache: bool = True
    dwpose_dir: Path | None = None  # yolox_l.onnx and dw-ll_ucoco_384.onnx (None: the hub's)
    progress: bool = True
    parallel: "WindowParallel | None" = None  # this process's share of each video (`launch.window_parallel_run`)

    @classmethod
    def from_values(cls, values: dict, **overrides) -> "RunSettings":
        """From the options' values (argparse's namespace as a dict: `weights`, `device`, `cache_dir`, `no_cache`,
        `dwpose_dir`, `quiet`); a missing key keeps the default."""
        settings = dict(weights=values.get("weights"), device=values.get("device"),
                        cache_dir=values.get("cache_dir"), use_cache=not values.get("no_cache"),
                        dwpose_dir=values.get("dwpose_dir"), progress=not values.get("quiet"))
        return cls(**{**settings, **overrides})

    def pose_cache(self):
        from pose.cache import PoseCache

        return PoseCache(self.cache_dir) if self.use_cache else None

    def resolved_device(self) -> str:
        """The device checked (one line when it cannot be used), the default one when none was named."""
        from svd_common.devices import check_device

        return check_device(self.device)
