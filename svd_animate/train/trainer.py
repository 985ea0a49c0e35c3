"""`svd-animate train`: the published SVD EDM objective through accelerate (one process or many).

What trains is configuration (`trainable`): the pose encoder (the default: fits one GPU); the encoder
and the UNet parameters whose names contain one of `unet_trainable`; the encoder and the whole UNet
(what the published v2 run trained, train_svd.py); or the encoder and LoRA adapters on the UNet (peft).
The VAE and CLIP are frozen (and cast to the mixed-precision dtype). The UNet is the base's with
`unet_weights` (the published unet.bin) laid over it, as train_svd.py's --unet_model_name_or_path does.
The LR is constant from the first step unless `warmup_steps` > 0 (published: constant, no warm-up).

Every random draw of a step comes from a generator seeded by (seed, step, micro-step, process), and
samples from (seed, epoch, index) with a seeded sampler, so `--resume latest` continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from svd_common.errors import InputError

from svd_controlnext.encoder import PoseEncoder
from svd_controlnext.injection import ControlInjector
from svd_controlnext.weights import load_unet
from .config import RESUMABLE_CHANGES, TrainConfig
from .data import PoseVideoDataset
from .objective import conditioning_dropout, edm_loss, latent_weights, sample_sigmas, unet_inputs

logger = logging.getLogger(__name__)

ADDED_TIME_IDS = (6.0, 127.0, 0.02)  # fps 7 - 1, motion bucket 127, noise augmentation 0.02 (published)
REFERENCE_NOISE = 0.02
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
        raise InputError(f"cannot load the base model {base} ({type(e).__name__}); no weights are reachable "
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
        raise InputError(f"unet_weights {config.unet_weights}: no such file or folder (base_model tiny takes a "
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


def clip_embeddings(image_encoder, feature_extractor, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> CLIP image embeddings (B, 1, D), prepared as diffusers' SVD
    pipeline prepares the reference (anti-aliased resize in [-1, 1], then CLIP's normalisation)."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    size = image_encoder.config.image_size
    x = (_resize_with_antialiasing(images.float(), (size, size)) + 1) / 2
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
        noisy_reference = (reference + REFERENCE_NOISE * randn(reference.shape)).to(vae.dtype)
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
    time_ids = torch.tensor([ADDED_TIME_IDS] * batch_size, device=device)
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


def make_lr_scheduler(config: TrainConfig, optimizer):
    """Constant LR (published: train_svd.py's default "constant", which ignores its warm-up argument), after
    a linear warm-up over `warmup_steps` when there is one (0, the default: none)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.warmup_steps)


def step_generator(seed: int, step: int, micro_step: int, process: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro_step, process])
                                             .generate_state(1)[0]))


# ---- checkpoints -----------------------------------------------------------------------------------

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


def check_same_config(checkpoint: Path, config: TrainConfig) -> int:
    """The checkpoint's step, after checking it was made by the same training config."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    if state["fingerprint"] != config.fingerprint():
        saved = state.get("config", {})
        differing = sorted(k for k, v in dataclasses.asdict(config).items()  # a key it lacks is newer than it
                           if (k not in saved or saved[k] != v) and k not in RESUMABLE_CHANGES)
        raise InputError(f"{checkpoint}: made with another training config (differs in: "
                         f"{', '.join(differing) or 'unknown keys'}); resume with the same config or start a new run")
    return int(state["step"])


# ---- the loop ------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    steps: int
    losses: list[float]  # per optimiser step of this process, this invocation
    export_dir: Path | None
    loop_seconds: float = 0.0  # the training loop alone (no model loading, no export)


def train(config: TrainConfig, resume: str | None = None, progress: bool = True) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    config.check()
    run = Path(config.output_dir)
    resume_dir = find_resume_dir(run, resume) if resume else None
    start_step = check_same_config(resume_dir, config) if resume_dir else 0
    dataset = PoseVideoDataset(config.data, config.num_frames, config.interval, config.width, config.height,
                               config.seed, config.hand_loss_weight)

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation,
        log_with="tensorboard", cpu=not torch.cuda.is_available(),
        project_config=ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    models = load_models(config)
    vae, image_encoder, unet, encoder = (models[k] for k in ("vae", "image_encoder", "unet", "pose_encoder"))
    vae.requires_grad_(False), image_encoder.requires_grad_(False)
    vae.to(accelerator.device, weight_dtype), image_encoder.to(accelerator.device, weight_dtype)
    parameters = select_trainable(config, unet, encoder)
    unet_trains = any(p.requires_grad for p in unet.parameters())
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if not unet_trains:
        unet.to(accelerator.device, weight_dtype)
    injector = ControlInjector(unet, encoder.config.injection_site, encoder.config.control_strength)

    optimizer_class = torch.optim.AdamW
    if config.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    optimizer = optimizer_class(parameters, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                weight_decay=config.weight_decay, eps=config.adam_epsilon)
    lr_scheduler = make_lr_scheduler(config, optimizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         num_workers=config.num_workers,
                                         generator=torch.Generator().manual_seed(config.seed))
    prepared = accelerator.prepare(*([encoder, unet] if unet_trains else [encoder]), optimizer, loader)
    encoder = prepared[0]
    if unet_trains:
        unet = prepared[1]
    optimizer, loader = prepared[-2], prepared[-1]
    trained = [encoder, unet] if unet_trains else [encoder]  # the wrapped models: no_sync while accumulating
    ema = None
    if config.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(parameters, decay=config.ema_decay)
        ema.to(accelerator.device)
    if len(loader) == 0:
        raise InputError(f"{config.data}: fewer clips ({len(dataset)}) than one batch per process "
                         f"({config.batch_size} x {accelerator.num_processes})")

    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        load_extra_state(resume_dir, lr_scheduler, ema)
        logger.info("resumed from %s at step %d", resume_dir, start_step)
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
        accelerator.init_trackers("train")

    batches_per_epoch = len(loader)
    step, losses = start_step, []
    last_checkpoint = resume_dir
    bar = tqdm(total=config.max_steps, initial=start_step, desc="train", unit="step",
               disable=not progress or not accelerator.is_main_process)
    consumed = start_step * config.gradient_accumulation
    loop_started = time.perf_counter()
    while step < config.max_steps:
        epoch, skip = divmod(consumed, batches_per_epoch)
        dataset.epoch = epoch
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            encoder.train()
            if unet_trains:
                unet.train()
            generator = step_generator(config.seed, step, consumed % config.gradient_accumulation,
                                       accelerator.process_index)
            with accelerator.accumulate(*trained):
                with accelerator.autocast():
                    loss = training_loss(batch, models, unet, encoder, injector, config, generator)
                if not torch.isfinite(loss):
                    names = ", ".join(str(dataset.clips[int(i)].video.name) for i in batch["index"])
                    raise InputError(f"loss is {loss.item()} at step {step + 1} (batch: {names}); stopped, "
                                     f"the last good checkpoint is {last_checkpoint or 'none'}")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            consumed += 1
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            if ema is not None:
                ema.step(parameters)
            step += 1
            value = accelerator.reduce(loss.detach(), reduction="mean").item()
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if step % config.log_every == 0:
                accelerator.log({"loss": value, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                last_checkpoint = save_checkpoint(accelerator, run, step, config, lr_scheduler, ema)
            if step % config.validate_every == 0 and accelerator.is_main_process:
                write_validation(run, step, models, accelerator.unwrap_model(encoder), accelerator.unwrap_model(unet),
                                 dataset, config, ema, parameters)
            if step >= config.max_steps:
                break
    bar.close()
    loop_seconds = time.perf_counter() - loop_started
    accelerator.wait_for_everyone()
    export_dir = None
    if accelerator.is_main_process:
        export_dir = export_weights(run / "final", accelerator.unwrap_model(encoder), accelerator.unwrap_model(unet),
                                    unet_trains, config, ema, parameters)
    accelerator.end_training()
    injector.remove()
    return TrainResult(step, losses, export_dir, loop_seconds)


def save_checkpoint(accelerator, run: Path, step: int, config: TrainConfig, lr_scheduler, ema=None) -> Path:
    """accelerate's state (models as safetensors; optimiser and RNG states load with weights_only), plus
    the LR schedule as JSON and the EMA weights as safetensors: nothing in a checkpoint can run code."""
    from safetensors.torch import save_file

    folder = run / "checkpoints" / f"step-{step:06d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / "lr_scheduler.json").write_text(json.dumps(lr_scheduler.state_dict()))
        if ema is not None:
            state = ema.state_dict()
            shadow = state.pop("shadow_params")
            save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, folder / "ema.safetensors")
            (folder / "ema.json").write_text(json.dumps(state))
        state = {"step": step, "fingerprint": config.fingerprint(), "config": dataclasses.asdict(config)}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))  # written last: marks the folder complete
        for old in checkpoint_dirs(run)[:-config.checkpoints_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


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


def write_validation(run: Path, step: int, models: dict, encoder, unet, dataset: PoseVideoDataset,
                     config: TrainConfig, ema=None, parameters=None) -> Path:
    """A short video (skeleton | sample) from a fixed reference and pose clip: the configured ones, or
    the dataset's first sample at epoch 0."""
    from PIL import Image

    from svd_common.video import VideoWriter

    from svd_controlnext.decode import iter_decoded_frames
    from svd_controlnext.pipeline import ControlNeXtSVDPipeline

    reference, poses = validation_inputs(dataset, config)
    pipe = ControlNeXtSVDPipeline(vae=models["vae"], image_encoder=models["image_encoder"], unet=unet,
                                  scheduler=models["scheduler"], feature_extractor=models["feature_extractor"],
                                  pose_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    encoder.eval(), unet.eval()
    with _with_ema(ema, parameters), torch.no_grad():
        try:
            latents = pipe(Image.fromarray(reference), poses, height=config.height, width=config.width,
                           num_frames=len(poses), num_inference_steps=config.validation_steps,
                           generator=torch.Generator().manual_seed(config.seed), output_type="latent").frames
        finally:  # the training UNet must not keep the validation's control hook
            pipe.detach_control()
        path = run / "validation" / f"step-{step:06d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        with VideoWriter(path, fps=7) as writer:
            for index, frame in enumerate(iter_decoded_frames(models["vae"], latents.to(models["vae"].dtype), 4,
                                                              progress=False)):
                writer.write(np.concatenate([poses[index], frame], axis=1))
    encoder.train()
    return path


def validation_inputs(dataset: PoseVideoDataset, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(reference RGB uint8 (H, W, 3), pose frames uint8 (F, H, W, 3))."""
    if config.validation_reference and config.validation_poses:
        from pose.skeleton import PoseSequence
        from svd_common.video import read_image

        from ..animate import crop_poses, crop_reference, render_frames

        poses = PoseSequence.load(config.validation_poses).select(slice(0, config.validation_frames))
        reference = crop_reference(read_image(config.validation_reference), config.width, config.height)
        frames = render_frames(crop_poses(poses, config.width, config.height), config.height, config.width)
        return reference, frames
    epoch, dataset.epoch = dataset.epoch, 0
    sample = dataset[0]
    dataset.epoch = epoch
    reference = ((sample["reference"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    frames = (sample["poses"].permute(0, 2, 3, 1) * 255).round().byte().numpy()
    return reference, frames


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


def count_parameters(parameters) -> int:
    return sum(math.prod(p.shape) for p in parameters)
