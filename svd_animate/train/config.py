"""Training configuration: one dataclass with every default; YAML files (configs/train/) and CLI flags
override it. Unknown keys and wrong types are refused, naming the key, before any model loads."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from pathlib import Path

from svd_common.errors import InputError

from ..config import CONFIG_DIR, config_from_mapping, read_yaml
from .objective import SigmaDistribution

TRAINABLE_MODES = ("encoder", "encoder+unet-subset", "encoder+unet", "lora")
MIXED_PRECISION = ("no", "fp16", "bf16")
# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = {"max_steps", "output_dir", "data", "validate_every", "checkpoint_every", "checkpoints_to_keep",
                     "log_every", "num_workers", "validation_reference", "validation_poses"}


@dataclasses.dataclass
class TrainConfig:
    # Model: the SVD base ("tiny": random tiny components), the UNet weights laid over its UNet, and where the
    # pose encoder starts from. The released encoder was trained with the released UNet (unet.bin), so the two
    # start together; with `unet_weights: null` the base's own UNet is used.
    base_model: str = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"
    unet_weights: str | None = "Pbihao/ControlNeXt"  # published unet.bin: hub repo, folder, file, or null
    # The encoder keeps its own `embedding_padding`: 0 for the published controlnet.bin and for a fresh one, i.e.
    # the published *inference* variant (the published training copy pads by 1: same weights, control 128x72
    # instead of 127x71 at 1024x576, both pooled to the injection size). Training with 0 trains the encoder
    # exactly as `svd-animate` runs it.
    pose_encoder: str | None = "Pbihao/ControlNeXt"  # published weights, a folder, a file, or null (fresh)
    temporal_layers: bool = False  # zero-initialised: starts exactly as the loaded weights
    # What trains. Default: the encoder only, which fits one GPU. The published v2 run trained the encoder AND
    # the whole UNet (encoder+unet; 8 GPUs, DeepSpeed ZeRO-2, configs/accelerate/deepspeed_zero2.yaml).
    trainable: str = "encoder"  # encoder | encoder+unet-subset | encoder+unet | lora
    unet_trainable: list[str] = dataclasses.field(default_factory=lambda: ["attn1.to_out", "attn2.to_out"])
    lora_rank: int = 16
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # Data
    data: str | None = None
    num_frames: int = 14
    interval: int = 3
    width: int = 576
    height: int = 1024
    num_workers: int = 2
    # Optimisation (published: AdamW 1e-5, constant LR with no warm-up, bf16, gradient checkpointing, gradient
    # norm clipped at 1.0: script.sh launches train_svd.py with deepspeed.yaml, whose `gradient_clipping: 1.0`
    # DeepSpeed applies; the clip call commented out in train_svd.py changes nothing)
    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit
    # 0: constant LR from the first step, as published (train_svd.py's default lr_scheduler "constant" ignores
    # the --lr_warmup_steps 500 that script.sh passes); N > 0: a linear warm-up over N steps, then constant.
    warmup_steps: int = 0
    max_steps: int = 3000
    batch_size: int = 1
    gradient_accumulation: int = 1
    # Gradient norm clipped at this, as published; under DeepSpeed, its own config's `gradient_clipping` applies
    # instead (accelerate leaves clipping to DeepSpeed; 1.0 in configs/accelerate/deepspeed_zero2.yaml)
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    ema: bool = False
    ema_decay: float = 0.9999
    # SVD's micro-conditioning, told to the UNet (added_time_ids) as train_svd.py tells it: fps_id - 1 = 6, motion
    # bucket 127, and the noise added to the reference before encoding (0.02). Same keys as the inference config
    # (svd_animate/config.py), which conditions on motion bucket 128, as the published pipeline does.
    fps_id: int = 7  # the UNet sees fps_id - 1
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02  # std of the noise added to the reference image, and its time id
    # Objective (published)
    sigma_min: float = SigmaDistribution.sigma_min
    sigma_max: float = SigmaDistribution.sigma_max
    sigma_data: float = SigmaDistribution.sigma_data
    image_d: float = SigmaDistribution.image_d
    noise_d_low: float = SigmaDistribution.noise_d_low
    noise_d_high: float = SigmaDistribution.noise_d_high
    hand_loss_weight: float = 4.2  # inside confident hand boxes (1 + 4 x 0.8 as published); 1 turns it off
    drop_image_embedding: float = 0.2  # CLIP embedding zeroed when u < this
    drop_reference_from: float = 0.1  # reference latent zeroed when from <= u < to
    drop_reference_to: float = 0.3
    # Run
    output_dir: str = "runs/svd-animate"
    seed: int = 42
    log_every: int = 10
    checkpoint_every: int = 2000
    checkpoints_to_keep: int = 3
    validate_every: int = 500
    validation_reference: str | None = None
    validation_poses: str | None = None  # driving video or poses .npz
    validation_frames: int = 14
    validation_steps: int = 25

    def replace(self, **changes) -> "TrainConfig":
        """A copy with `changes` (a None sets the field to None, as `dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def with_given(self, **values) -> "TrainConfig":
        """A copy with the values a user gave: a None is "not given" (a flag left out), as `AnimateConfig.with_given`."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def check(self) -> "TrainConfig":
        """Values that are the right type but cannot work, refused before any model loads."""
        if self.trainable not in TRAINABLE_MODES:
            raise InputError(f"trainable must be one of {', '.join(TRAINABLE_MODES)}, got {self.trainable!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise InputError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                             f"got {self.mixed_precision!r}")
        if self.width % 64 or self.height % 64:
            raise InputError(f"width/height must be multiples of 64, got {self.width}x{self.height}")
        for key in ("num_frames", "interval", "max_steps", "batch_size", "gradient_accumulation", "log_every",
                    "checkpoint_every", "validate_every", "lora_rank", "fps_id"):
            if getattr(self, key) < 1:
                raise InputError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("motion_bucket_id", "noise_aug_strength"):
            if getattr(self, key) < 0:
                raise InputError(f"{key} must be 0 or more, got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise InputError(f"warmup_steps must be 0 (constant LR, as published) or more, got {self.warmup_steps}")
        if self.data is None:
            raise InputError("no training data: pass --data DATASET (from `svd-animate prepare-data`)")
        if self.use_8bit_adam:
            try:
                importlib.import_module("bitsandbytes")
            except ImportError:
                raise InputError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return self

    def sigma_distribution(self) -> SigmaDistribution:
        return SigmaDistribution(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SigmaDistribution)})

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed with this config."""
        kept = {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUMABLE_CHANGES}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def load_train_config(name_or_path: str) -> TrainConfig:
    """`tiny`, `controlnext-svd-v2` (configs/train/) or a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / "train" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "train").glob("*.yaml")))
        raise InputError(f"{name_or_path}: no such training config (built in: {known})")
    return config_from_mapping(TrainConfig, read_yaml(path), str(path))
