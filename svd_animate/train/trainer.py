"""`svd-animate train`: the published SVD EDM objective through accelerate (one process or many).

What trains is configuration (`trainable`): the pose encoder (the default: fits one GPU); the encoder
and the UNet parameters whose names contain one of `unet_trainable`; the encoder and the whole UNet
(what the published v2 run trained, train_svd.py); or the encoder and LoRA adapters on the UNet (peft).
The VAE and CLIP are frozen (and cast to the mixed-precision dtype). The UNet is the base's with
`unet_weights` (the published unet.bin) laid over it, as train_svd.py's --unet_model_name_or_path does.
The LR is constant from the first step unless `warmup_steps` > 0 (published: constant, no warm-up).

Every random draw of a step comes from a generator seeded by (seed, step, micro-step, process), and
samples from (seed, epoch, index) with a seeded sampler; a checkpoint records the steps and the batches
drawn (not steps x accumulation: an epoch's end also ends an accumulation), so `--resume latest` continues
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from svd_common.errors import InputError, TrainingError, WeightsError
from svd_controlnext.encoder import PoseEncoder
from svd_controlnext.injection import ControlInjector
from svd_controlnext.weights import load_unet

from .config import RESUMABLE_CHANGES, TrainConfig
from .data import PoseVideoDataset
from .objective import conditioning_dropout, edm_loss, latent_weights, sample_sigmas, unet_inputs

logger = logging.getLogger(__name__)

STATE_FILE = "trainer.json"


# ---- models --------------------------------------------------------------------------------------

def load_models(config: TrainConfig) -> dict:
    """vae, image_encoder, unet, pose_encoder, scheduler, feature_extractor."""
    if config.base_model == "tiny":
        from svd_controlnext.tiny import tiny_components, tiny_pose_encoder

        models = tiny_components(config.seed)
        models["unet"] = _tiny_unet(config, models["unet"])
        if config.pose_encoder is None:
            torch.manual_seed(config.seed)
            models["pose_encoder"] = tiny_pose_encoder(temporal_layers=config.temporal_layers)
        else:
            models["pose_encoder"] = _load_encoder(config)
        return models
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    base = config.base_model
    try:
        models = {
            "vae": AutoencoderKLTemporalDecoder.from_pretrained(base, subfolder="vae"),
            "image_encoder": CLIPVisionModelWithProjection.from_pretrained(base, subfolder="image_encoder"),
            "scheduler": EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"),
            "feature_extractor": CLIPImageProcessor.from_pretrained(base, subfolder="feature_extractor"),
        }
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot load the base model {base} ({type(e).__name__}); no weights are reachable "
                         "here: try --config tiny") from None
    models["unet"] = load_unet(base, config.unet_weights, torch.float32)
    models["pose_encoder"] = _load_encoder(config) if config.pose_encoder else PoseEncoder(
        temporal_layers=config.temporal_layers)
    return models


def _tiny_unet(config: TrainConfig, unet):
    """The tiny random UNet with `unet_weights` (a local file or folder) laid over it, through the same
    `load_unet` as a real base: the tiny UNet is saved as the base, so keys the checkpoint lacks keep its values."""
    if config.unet_weights is None:
        return unet
    if not Path(config.unet_weights).exists():
        raise WeightsError(f"unet_weights {config.unet_weights}: no such file or folder (base_model tiny takes a "
                         "local tiny UNet checkpoint)")
    with tempfile.TemporaryDirectory() as base:
        unet.save_pretrained(Path(base) / "unet")
        return load_unet(base, config.unet_weights, torch.float32)


def _load_encoder(config: TrainConfig) -> PoseEncoder:
    from svd_controlnext.weights import load_pose_encoder

    encoder = load_pose_encoder(config.pose_encoder)
    if config.temporal_layers and not encoder.config.temporal_layers:
        with_temporal = PoseEncoder(**{**encoder.config, "temporal_layers": True})
        with_temporal.load_state_dict(encoder.state_dict(), strict=False)  # temporal layers start at zero
        encoder = with_temporal
    return encoder


def select_trainable(config: TrainConfig, unet, encoder) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze what the config trains; returns the trainable parameters."""
    unet.requires_grad_(False)
    encoder.requires_grad_(True)
    if config.trainable == "encoder+unet":
        unet.requires_grad_(True)
    elif config.trainable == "encoder+unet-subset":
        chosen = [p for name, p in unet.named_parameters() if any(part in name for part in config.unet_trainable)]
        if not chosen:
            raise InputError(f"unet_trainable {config.unet_trainable}: no UNet parameter name contains any of these")
        for parameter in chosen:
            parameter.requires_grad_(True)
    elif config.trainable == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        # In place: the UNet keeps its class, hooks and config; the adapters start as the identity.
        inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank,
                                           target_modules=config.lora_targets), unet)
    return [p for p in [*encoder.parameters(), *unet.parameters()] if p.requires_grad]


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """A normalised 1-D gaussian of odd `size` (sigma in float32, as diffusers computes it)."""
    x = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-x.pow(2) / (2 * torch.tensor(sigma, dtype=torch.float32).pow(2)))
    return kernel / kernel.sum()


def blur_along(images: torch.Tensor, dim: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) along H (dim -2) or W (dim -1), borders reflected."""
    size = int(max(4 * sigma, 3)) | 1  # two sigmas each side, at least 3 taps, odd
    shape = (size, 1) if dim == -2 else (1, size)
    pad = (0, 0, size // 2, size // 2) if dim == -2 else (size // 2, size // 2, 0, 0)
    channels = images.shape[1]
    kernel = gaussian_kernel(size, sigma).to(images).view(1, 1, *shape).expand(channels, 1, *shape)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(images, pad, mode="reflect"), kernel, groups=channels)


def resize_for_clip(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) as SVD's pipeline resizes the reference for CLIP (diffusers'
    `_resize_with_antialiasing`, kornia's recipe): a gaussian blur with skimage's sigma ((factor - 1) / 2),
    then bicubic with `align_corners=True`. Written out because that function is private, and torch's own
    antialiased bicubic gives other pixels: training must feed CLIP what inference feeds it."""
    height, width = images.shape[-2:]
    blurred = blur_along(images, -1, max((width / size - 1) / 2, 0.001))
    blurred = blur_along(blurred, -2, max((height / size - 1) / 2, 0.001))
    return torch.nn.functional.interpolate(blurred, size=(size, size), mode="bicubic", align_corners=True)


def clip_embeddings(image_encoder, feature_extractor, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> CLIP image embeddings (B, 1, D), prepared as diffusers' SVD
    pipeline prepares the reference (anti-aliased resize in [-1, 1], then CLIP's normalisation)."""
    size = image_encoder.config.image_size
    x = (resize_for_clip(images.float(), size) + 1) / 2
    mean = torch.tensor(feature_extractor.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(feature_extractor.image_std, device=x.device).view(1, 3, 1, 1)
    return image_encoder(((x - mean) / std).to(image_encoder.dtype)).image_embeds.unsqueeze(1)


# ---- one step ------------------------------------------------------------------------------------

def training_loss(batch: dict, models: dict, unet, encoder, injector: ControlInjector, config: TrainConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """The EDM loss of one batch (published recipe), with control added through the injector."""
    vae = models["vae"]
    device = next(unet.parameters()).device
    pixels, poses = batch["pixels"].to(device), batch["poses"].to(device)
    reference = batch["reference"].to(device)
    batch_size, frames = pixels.shape[:2]

    def randn(shape):
        return torch.randn(shape, generator=generator).to(device)

    with torch.no_grad():
        encoded = vae.encode(pixels.flatten(0, 1).to(vae.dtype)).latent_dist
        latents = (encoded.mean + encoded.std * randn(encoded.mean.shape)).float() * vae.config.scaling_factor
        latents = latents.unflatten(0, (batch_size, frames))
        noisy_reference = (reference + config.noise_aug_strength * randn(reference.shape)).to(vae.dtype)
        encoded = vae.encode(noisy_reference).latent_dist
        reference_latent = (encoded.mean + encoded.std * randn(encoded.mean.shape)).float()
        image_embeddings = clip_embeddings(models["image_encoder"], models["feature_extractor"], reference).float()
    sigma = sample_sigmas(batch_size, generator, config.sigma_distribution()).to(device)
    noisy, scaled, timestep = unet_inputs(latents, randn(latents.shape), sigma)
    keep_image, keep_reference = conditioning_dropout(torch.rand(batch_size, generator=generator).to(device),
                                                      config.drop_image_embedding, config.drop_reference_from,
                                                      config.drop_reference_to)
    image_embeddings = image_embeddings * keep_image.view(-1, 1, 1)
    reference_latent = reference_latent * keep_reference.view(-1, 1, 1, 1)
    model_input = torch.cat([scaled, reference_latent.unsqueeze(1).expand(-1, frames, -1, -1, -1)], dim=2)
    time_ids = added_time_ids(config, batch_size).to(device)
    dtype = next(p for p in unet.parameters()).dtype
    injector.set(encoder(poses, timestep), 1.0)
    try:
        output = unet(model_input.to(dtype), timestep, image_embeddings.to(dtype), time_ids.to(dtype)).sample
    finally:
        injector.clear()
    weights = None
    if config.hand_loss_weight != 1.0:
        weights = latent_weights(batch["hand_weights"].to(device), tuple(latents.shape[-2:]))
    return edm_loss(output, noisy, latents, sigma, weights)


def added_time_ids(config: TrainConfig, batch_size: int) -> torch.Tensor:
    """SVD's micro-conditioning (B, 3), as the pipeline makes it from the same keys: fps_id - 1, motion bucket,
    noise augmentation (published training: 6, 127, 0.02)."""
    ids = [config.fps_id - 1, config.motion_bucket_id, config.noise_aug_strength]
    return torch.tensor([ids] * batch_size, dtype=torch.float32)


def make_lr_scheduler(config: TrainConfig, optimizer):
    """Constant LR (published: train_svd.py's default "constant", which ignores its warm-up argument), after
    a linear warm-up over `warmup_steps` when there is one (0, the default: none)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.warmup_steps)


def step_generator(seed: int, step: int, micro_step: int, process: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro_step, process])
                                             .generate_state(1)[0]))


# ---- checkpoints -----------------------------------------------------------------------------------

@dataclasses.dataclass
class LoopState:
    """Where the loop is: optimiser steps and micro-batches drawn since the run began (not this invocation;
    an epoch's end also ends an accumulation, so the two do not follow from each other), the checkpoint
    to go back to, and the losses of this invocation."""
    step: int
    consumed: int
    last_checkpoint: Path | None
    losses: list[float] = dataclasses.field(default_factory=list)


def checkpoint_dirs(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def find_resume_dir(run: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise InputError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE})")
        return path
    if not run.is_dir():
        raise InputError(f"--resume latest: the run folder {run} does not exist")
    found = [d for d in checkpoint_dirs(run) if (d / STATE_FILE).is_file()]
    if not found:
        raise InputError(f"--resume latest: no checkpoint in {run / 'checkpoints'}")
    return found[-1]


def resume_state(checkpoint: Path, config: TrainConfig) -> LoopState:
    """Where the loop stood at `checkpoint`, after checking it was made by the same training config."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    if state["fingerprint"] != config.fingerprint():
        saved = state.get("config") or {}
        # A key the checkpoint lacks is newer than it: the code that wrote it behaved as that key's default does (the
        # time ids were constants before they were keys), so only a value other than the default differs.
        known = {**dataclasses.asdict(TrainConfig()), **saved} if saved else {}
        differing = sorted(k for k, v in dataclasses.asdict(config).items()
                           if (k not in known or known[k] != v) and k not in RESUMABLE_CHANGES)
        if differing or not saved:
            raise InputError(f"{checkpoint}: made with another training config (differs in: "
                             f"{', '.join(differing) or 'unknown keys'}); resume with the same config or start a new "
                             f"run")
    step = int(state["step"])
    # Older checkpoints lack the count: step x accumulation, right unless an epoch ended inside an accumulation.
    batches = int(state.get("batches", step * config.gradient_accumulation))
    return LoopState(step=step, consumed=batches, last_checkpoint=checkpoint)


# ---- the run -------------------------------------------------------------------------------------

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # of the frozen models; "no": float32


@dataclasses.dataclass
class TrainResult:
    steps: int
    losses: list[float]  # per optimiser step of this process, this invocation
    export_dir: Path | None
    loop_seconds: float = 0.0  # the training loop alone (no model loading, no export)


@dataclasses.dataclass
class Training:
    """What a run steps with, built once. `encoder` and `unet` are accelerate's wrappers when they train;
    `models` holds them unwrapped, with the frozen VAE, CLIP, scheduler and feature extractor."""
    accelerator: Any
    dataset: PoseVideoDataset
    loader: Any
    models: dict
    encoder: torch.nn.Module
    unet: torch.nn.Module
    unet_trains: bool
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: Any
    injector: ControlInjector

    @property
    def trained(self) -> list[torch.nn.Module]:
        """The wrapped models that train: accelerate skips their gradient sync while accumulating."""
        return [self.encoder, self.unet] if self.unet_trains else [self.encoder]


def train(config: TrainConfig, resume: str | None = None, progress: bool = True) -> TrainResult:
    """Train as `config` says (from the checkpoint `resume` names, if any), then export the weights."""
    config.check()
    run = Path(config.output_dir)
    resume_dir = find_resume_dir(run, resume) if resume else None
    state = resume_state(resume_dir, config) if resume_dir else LoopState(step=0, consumed=0, last_checkpoint=None)
    dataset = PoseVideoDataset(config.data, config.num_frames, config.interval, config.width, config.height,
                               config.seed, config.hand_loss_weight)
    accelerator = make_accelerator(config, run)
    training = build_training(config, accelerator, dataset)
    try:
        if resume_dir is not None:
            restore_checkpoint(training, resume_dir)
            logger.info("resumed from %s at step %d", resume_dir, state.step)
        open_run_folder(accelerator, run, config)
        started = time.perf_counter()
        run_loop(training, state, config, run, progress)
        loop_seconds = time.perf_counter() - started
        export_dir = finish(training, run, config)
    finally:  # the UNet must not keep the control hook
        training.injector.remove()
    return TrainResult(state.step, state.losses, export_dir, loop_seconds)


# ---- setting up ----------------------------------------------------------------------------------

def make_accelerator(config: TrainConfig, run: Path):
    """accelerate owns devices, mixed precision, accumulation and logging; its seedable sampler makes an
    epoch's order depend on the epoch only, so a resumed run sees the batches an uninterrupted one sees."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    return Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation,
        log_with="tensorboard", cpu=not torch.cuda.is_available(),
        project_config=ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


def build_training(config: TrainConfig, accelerator, dataset: PoseVideoDataset) -> Training:
    """The models (frozen and placed as configured), optimiser, LR schedule, EMA and loader, prepared."""
    models = load_models(config)
    unet, encoder = models["unet"], models["pose_encoder"]
    parameters = select_trainable(config, unet, encoder)
    unet_trains = any(p.requires_grad for p in unet.parameters())
    place_models(config, models, unet_trains, accelerator.device)
    injector = ControlInjector(unet, encoder.config.injection_site, encoder.config.control_strength)
    optimizer = make_optimizer(config, parameters)
    lr_scheduler = make_lr_scheduler(config, optimizer)
    trained = {"encoder": encoder, "unet": unet} if unet_trains else {"encoder": encoder}
    prepared = prepare_by_name(accelerator, **trained, optimizer=optimizer, loader=make_loader(config, dataset))
    ema = make_ema(config, parameters, accelerator.device)
    if len(prepared["loader"]) == 0:
        raise InputError(f"{config.data}: fewer clips ({len(dataset)}) than one batch per process "
                         f"({config.batch_size} x {accelerator.num_processes})")
    return Training(accelerator=accelerator, dataset=dataset, loader=prepared["loader"], models=models,
                    encoder=prepared["encoder"], unet=prepared.get("unet", unet), unet_trains=unet_trains,
                    parameters=parameters, optimizer=prepared["optimizer"], lr_scheduler=lr_scheduler, ema=ema,
                    injector=injector)


def place_models(config: TrainConfig, models: dict, unet_trains: bool, device) -> None:
    """The frozen models (VAE, CLIP, and the UNet when it does not train) to the device in the mixed-precision
    dtype, with no gradients; the trained ones stay float32 for accelerate's autocast."""
    weight_dtype = WEIGHT_DTYPES.get(config.mixed_precision, torch.float32)
    for name in ("vae", "image_encoder"):
        models[name].requires_grad_(False)
        models[name].to(device, weight_dtype)
    if config.gradient_checkpointing:
        models["unet"].enable_gradient_checkpointing()
    if not unet_trains:
        models["unet"].to(device, weight_dtype)


def make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as published, or bitsandbytes' 8-bit AdamW (`use_8bit_adam`) to save its state's memory."""
    optimizer_class = torch.optim.AdamW
    if config.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(parameters, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                           weight_decay=config.weight_decay, eps=config.adam_epsilon)


def make_loader(config: TrainConfig, dataset: PoseVideoDataset) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                       num_workers=config.num_workers,
                                       generator=torch.Generator().manual_seed(config.seed))


def make_ema(config: TrainConfig, parameters: list[torch.nn.Parameter], device):
    """An EMA of the trained parameters (`ema`), or None."""
    if not config.ema:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(parameters, decay=config.ema_decay)
    ema.to(device)
    return ema


def prepare_by_name(accelerator, **objects) -> dict:
    """accelerate's `prepare` (which answers in the order it was given), its results by name."""
    prepared = accelerator.prepare(*objects.values())
    return dict(zip(objects, prepared if len(objects) > 1 else (prepared,)))


def restore_checkpoint(training: Training, folder: Path) -> None:
    """accelerate's state (models, optimiser, RNG, sampler), then the LR schedule and the EMA."""
    training.accelerator.load_state(str(folder))
    load_extra_state(folder, training.lr_scheduler, training.ema)


def open_run_folder(accelerator, run: Path, config: TrainConfig) -> None:
    """The run folder with the config it trains with, and the trackers (main process)."""
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
        accelerator.init_trackers("train")


# ---- the loop ------------------------------------------------------------------------------------

def run_loop(training: Training, state: LoopState, config: TrainConfig, run: Path, progress: bool) -> None:
    """Micro-batches until `max_steps` optimiser steps, with logs, checkpoints and validation on the way."""
    bar = tqdm(total=config.max_steps, initial=state.step, desc="train", unit="step",
               disable=not progress or not training.accelerator.is_main_process)
    batches = batches_from(training, state.consumed)
    while state.step < config.max_steps:
        loss = micro_step(training, config, next(batches), state)
        state.consumed += 1
        if not training.accelerator.sync_gradients:
            continue
        value = end_step(training, state, loss)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        after_step(training, config, run, state, value)
    batches.close()
    bar.close()


def batches_from(training: Training, consumed: int) -> Iterator[dict]:
    """The batches from the `consumed`-th on, epoch after epoch, as an uninterrupted run draws them: the
    sampler's order and the samples' own draws depend on the epoch only."""
    epoch, skip = divmod(consumed, len(training.loader))
    while True:
        training.dataset.epoch = epoch
        training.loader.set_epoch(epoch)
        yield from (training.accelerator.skip_first_batches(training.loader, skip) if skip else training.loader)
        epoch, skip = epoch + 1, 0


def micro_step(training: Training, config: TrainConfig, batch: dict, state: LoopState) -> torch.Tensor:
    """Forward and backward of one batch; the optimiser steps on the last batch of an accumulation."""
    accelerator = training.accelerator
    for model in training.trained:
        model.train()  # validation leaves them in eval mode
    generator = step_generator(config.seed, state.step, state.consumed % config.gradient_accumulation,
                               accelerator.process_index)
    with accelerator.accumulate(*training.trained):
        with accelerator.autocast():
            loss = training_loss(batch, training.models, training.unet, training.encoder, training.injector, config,
                                 generator)
        check_finite(loss, batch, training.dataset, state)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(training.parameters, config.max_grad_norm)
        training.optimizer.step()
        training.optimizer.zero_grad(set_to_none=True)
    return loss


def check_finite(loss: torch.Tensor, batch: dict, dataset: PoseVideoDataset, state: LoopState) -> None:
    """Stop at a NaN or infinite loss, naming the step, the batch's clips and the checkpoint to go back to."""
    if not torch.isfinite(loss):
        names = ", ".join(str(dataset.clips[int(i)].video.name) for i in batch["index"])
        raise TrainingError(f"loss is {loss.item()} at step {state.step + 1} (batch: {names}); stopped, "
                         f"the last good checkpoint is {state.last_checkpoint or 'none'}")


def end_step(training: Training, state: LoopState, loss: torch.Tensor) -> float:
    """After an optimiser step: the LR schedule and the EMA move on, the step counts, and its loss (the mean
    over processes) is recorded and returned."""
    training.lr_scheduler.step()
    if training.ema is not None:
        training.ema.step(training.parameters)
    state.step += 1
    value = training.accelerator.reduce(loss.detach(), reduction="mean").item()
    state.losses.append(value)
    return value


def after_step(training: Training, config: TrainConfig, run: Path, state: LoopState, loss: float) -> None:
    """Log every `log_every` steps, checkpoint every `checkpoint_every` and at the last step, write a
    validation video every `validate_every` (main process)."""
    accelerator = training.accelerator
    if state.step % config.log_every == 0:
        accelerator.log({"loss": loss, "lr": training.lr_scheduler.get_last_lr()[0]}, step=state.step)
    if state.step % config.checkpoint_every == 0 or state.step == config.max_steps:
        state.last_checkpoint = save_checkpoint(accelerator, run, state, config, training.lr_scheduler, training.ema)
    if state.step % config.validate_every == 0 and accelerator.is_main_process:
        write_validation(run, state.step, training.models, accelerator.unwrap_model(training.encoder),
                         accelerator.unwrap_model(training.unet), training.dataset, config, training.ema,
                         training.parameters)


def finish(training: Training, run: Path, config: TrainConfig) -> Path | None:
    """Export the weights (main process: the folder; others: None) and close the trackers."""
    accelerator = training.accelerator
    accelerator.wait_for_everyone()
    export_dir = None
    if accelerator.is_main_process:
        export_dir = export_weights(run / "final", accelerator.unwrap_model(training.encoder),
                                    accelerator.unwrap_model(training.unet), training.unet_trains, config,
                                    training.ema, training.parameters)
    accelerator.end_training()
    return export_dir


# ---- checkpoints, validation, export -------------------------------------------------------------

def save_checkpoint(accelerator, run: Path, loop: LoopState, config: TrainConfig, lr_scheduler, ema=None) -> Path:
    """accelerate's state (models as safetensors; optimiser and RNG states load with weights_only), plus
    the LR schedule as JSON and the EMA weights as safetensors: nothing in a checkpoint can run code."""
    folder = run / "checkpoints" / f"step-{loop.step:06d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / "lr_scheduler.json").write_text(json.dumps(lr_scheduler.state_dict()))
        if ema is not None:
            save_ema(folder, ema)
        state = {"step": loop.step, "batches": loop.consumed, "fingerprint": config.fingerprint(),
                 "config": dataclasses.asdict(config)}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))  # written last: marks the folder complete
        for old in checkpoint_dirs(run)[:-config.checkpoints_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def save_ema(folder: Path, ema) -> None:
    """The EMA weights as safetensors and the rest of its state as JSON (no pickle)."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, folder / "ema.safetensors")
    (folder / "ema.json").write_text(json.dumps(state))


def load_extra_state(folder: Path, lr_scheduler, ema=None) -> None:
    from safetensors.torch import load_file

    lr_scheduler.load_state_dict(json.loads((folder / "lr_scheduler.json").read_text()))
    if ema is not None:
        if not (folder / "ema.safetensors").is_file():
            raise InputError(f"{folder}: has no EMA weights (the run did not use ema)")
        shadow = load_file(folder / "ema.safetensors")
        state = json.loads((folder / "ema.json").read_text())
        ema.load_state_dict({**state, "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})


def _with_ema(ema, parameters):
    """A context that swaps the EMA weights in (and back out), or does nothing."""
    import contextlib

    if ema is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def swapped():
        ema.store(parameters)
        ema.copy_to(parameters)
        try:
            yield
        finally:
            ema.restore(parameters)
    return swapped()


@dataclasses.dataclass
class ValidationInputs:
    reference: np.ndarray  # RGB uint8 (H, W, 3) at the training size
    poses: np.ndarray  # skeleton frames uint8 (F, H, W, 3)


def write_validation(run: Path, step: int, models: dict, encoder, unet, dataset: PoseVideoDataset,
                     config: TrainConfig, ema=None, parameters=None) -> Path:
    """RUN/validation/step-N.mp4: a short video (skeleton | sample) from a fixed reference and pose clip,
    sampled with the EMA weights when there are some."""
    inputs = validation_inputs(dataset, config)
    encoder.eval(), unet.eval()
    with _with_ema(ema, parameters), torch.no_grad():
        latents = sample_validation(models, encoder, unet, inputs, config)
        path = run / "validation" / f"step-{step:06d}.mp4"
        write_side_by_side(path, inputs.poses, latents, models["vae"])
    encoder.train()
    return path


def sample_validation(models: dict, encoder, unet, inputs: ValidationInputs, config: TrainConfig) -> torch.Tensor:
    """The clip's latents, sampled by the inference pipeline from the models being trained, told the time ids
    they train with."""
    from PIL import Image

    from svd_controlnext.pipeline import ControlNeXtSVDPipeline

    pipe = ControlNeXtSVDPipeline(vae=models["vae"], image_encoder=models["image_encoder"], unet=unet,
                                  scheduler=models["scheduler"], feature_extractor=models["feature_extractor"],
                                  pose_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    try:
        return pipe(Image.fromarray(inputs.reference), inputs.poses, height=config.height, width=config.width,
                    num_frames=len(inputs.poses), num_inference_steps=config.validation_steps, fps=config.fps_id,
                    motion_bucket_id=config.motion_bucket_id, noise_aug_strength=config.noise_aug_strength,
                    generator=torch.Generator().manual_seed(config.seed), output_type="latent").frames
    finally:  # the training UNet must not keep the validation's control hook
        pipe.detach_control()


def write_side_by_side(path: Path, poses: np.ndarray, latents: torch.Tensor, vae) -> None:
    """An mp4 of each skeleton frame beside its decoded frame."""
    from svd_common.video import VideoWriter
    from svd_controlnext.decode import iter_decoded_frames

    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, fps=7) as writer:
        for index, frame in enumerate(iter_decoded_frames(vae, latents.to(vae.dtype), 4, progress=False)):
            writer.write(np.concatenate([poses[index], frame], axis=1))


def validation_inputs(dataset: PoseVideoDataset, config: TrainConfig) -> ValidationInputs:
    """The configured reference and poses, framed as inference frames them; or the dataset's first sample
    at epoch 0."""
    if config.validation_reference and config.validation_poses:
        from pose.skeleton import PoseSequence
        from svd_common.video import read_image

        from ..animate import render_frames
        from ..framing import crop_poses, crop_reference

        poses = PoseSequence.load(config.validation_poses).select(slice(0, config.validation_frames))
        return ValidationInputs(
            reference=crop_reference(read_image(config.validation_reference), config.width, config.height),
            poses=render_frames(crop_poses(poses, config.width, config.height), config.height, config.width))
    epoch, dataset.epoch = dataset.epoch, 0
    sample = dataset[0]
    dataset.epoch = epoch
    return ValidationInputs(
        reference=((sample["reference"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy(),
        poses=(sample["poses"].permute(0, 2, 3, 1) * 255).round().byte().numpy())


def export_weights(folder: Path, encoder, unet, unet_trained: bool, config: TrainConfig, ema=None,
                   parameters=None) -> Path:
    """FOLDER/pose_encoder (and FOLDER/unet when the UNet was trained; LoRA merged in), loadable by
    `svd-animate --weights FOLDER` and `from_pretrained`."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _with_ema(ema, parameters):
        encoder.save_pretrained(tmp / "pose_encoder")
        if unet_trained:
            (merged_unet(unet) if config.trainable == "lora" else unet).save_pretrained(tmp / "unet")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def merged_unet(unet):
    """A plain UNet with the LoRA adapters merged into its weights (the training UNet is left as it is)."""
    from diffusers import UNetSpatioTemporalConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.merge()
    state = {k.replace(".base_layer.", "."): v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    for layer in layers:
        layer.unmerge()
    plain = UNetSpatioTemporalConditionModel.from_config(unet.config)
    plain.load_state_dict(state, strict=True)
    return plain

