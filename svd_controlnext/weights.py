"""Checkpoint loading: the published ControlNeXt-SVD-v2 files and our diffusers-style folders.

Safe by construction: safetensors first; `.bin` / `.pt` only through `torch.load(weights_only=True)`,
which refuses pickles that carry code. A file whose keys or shapes do not fit the model is reported
by name before anything is loaded into it.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from pathlib import Path

import torch

from pose.errors import InputError

from .encoder import PoseEncoder

logger = logging.getLogger(__name__)

HUB_REPO = "Pbihao/ControlNeXt"
HUB_SUBFOLDER = "ControlNeXt-SVD/v2"
CONTROLNET_FILE = "controlnet.bin"
UNET_FILE = "unet.bin"
BASE_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a safetensors file or a plain pickled tensor dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - any failure to parse means "not safetensors": try the pickle path
        pass
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).rsplit("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0] if str(e) else ""
        if "Unsupported global" in detail:
            detail = detail.split(" was not an allowed global")[0]  # drop torch's advice to allow-list it
            raise InputError(f"{path}: refused, the pickle carries code or objects, not just tensors "
                             f"({detail}); nothing was executed") from None
        raise InputError(f"{path}: not a safetensors or PyTorch checkpoint ({detail or 'unreadable pickle'})") from None
    except Exception as e:  # noqa: BLE001 - zip/pickle/EOF errors all mean "not a checkpoint"
        raise InputError(f"{path}: not a safetensors or PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise InputError(f"{path}: not a plain {{name: tensor}} checkpoint")
    return state


def key_problems(model: torch.nn.Module, state: dict[str, torch.Tensor], allow_missing: bool = False) -> list[str]:
    """Human-readable mismatches between a checkpoint and a model (empty when it fits)."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing and not allow_missing:
        problems.append(f"missing {len(missing)} keys ({_some(missing)})")
    if extra:
        problems.append(f"unexpected {len(extra)} keys ({_some(extra)})")
    for key in shapes[:5]:
        problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}")
    return problems


def _some(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def resolve_file(source, filename: str) -> Path:
    """A local file, a local folder holding `filename`, or `filename` in the hub's published folder."""
    if source is not None and Path(source).is_file():
        return Path(source)
    if source is not None and Path(source).is_dir():
        return Path(source) / filename
    if source is not None and Path(source).suffix:
        raise InputError(f"{source}: no such checkpoint file")
    from huggingface_hub import hf_hub_download

    repo = source or HUB_REPO
    try:
        return Path(hf_hub_download(repo, filename, subfolder=HUB_SUBFOLDER))
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: all unavailable here
        raise InputError(f"{filename} could not be fetched from {repo}/{HUB_SUBFOLDER} ({type(e).__name__}); "
                         "download it and pass the local file") from None


def load_pose_encoder(source, **config) -> PoseEncoder:
    """From a folder written by `save_pretrained` / `convert`, or from a published `controlnet.bin`."""
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        return PoseEncoder.from_pretrained(path)
    if path.is_dir() and (path / "pose_encoder" / "config.json").is_file():
        return PoseEncoder.from_pretrained(path / "pose_encoder")
    file = resolve_file(source, CONTROLNET_FILE)
    state = load_state_dict_file(file)
    encoder = PoseEncoder(**config)
    problems = key_problems(encoder, state)
    if problems:
        raise InputError(f"{file}: not a ControlNeXt-SVD-v2 control encoder checkpoint: {'; '.join(problems)}")
    encoder.load_state_dict(state, strict=True)
    return encoder


def load_unet_checkpoint(file, base=BASE_MODEL):
    """The published `unet.bin` (a full UNet state dict) into the base model's UNet architecture."""
    from diffusers import UNetSpatioTemporalConditionModel

    try:
        config = UNetSpatioTemporalConditionModel.load_config(str(base), subfolder="unet")
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read the UNet config of the base model {base} ({type(e).__name__}); "
                         "pass --base with a local SVD folder") from None
    unet = UNetSpatioTemporalConditionModel.from_config(config)
    state = load_state_dict_file(file)
    problems = key_problems(unet, state, allow_missing=True)
    if problems:
        raise InputError(f"{file}: does not fit the SVD UNet of {base}: {'; '.join(problems)}")
    missing = [k for k in unet.state_dict() if k not in state]
    if missing:  # published loading is strict=False: keep the base's values there, but say so
        logger.warning("%s: %d UNet tensors not in the checkpoint keep their initial values (%s)", file,
                       len(missing), _some(missing))
    unet.load_state_dict(state, strict=False)
    return unet


def convert(controlnet, output_dir, unet=None, base=BASE_MODEL, embedding_padding: int = 0) -> Path:
    """Write `output_dir/pose_encoder/` (and `output_dir/unet/`) as safetensors diffusers folders.

    Each folder is written beside its target first and renamed into place, so an interrupted run
    leaves the previous folders (if any) intact.
    """
    output_dir = Path(output_dir)
    if not output_dir.parent.is_dir():
        raise InputError(f"{output_dir}: folder {output_dir.parent} does not exist")
    encoder = load_pose_encoder(controlnet, embedding_padding=embedding_padding)
    unet_model = load_unet_checkpoint(resolve_file(unet, UNET_FILE), base) if unet is not None else None
    output_dir.mkdir(exist_ok=True)
    models = {"pose_encoder": encoder, **({"unet": unet_model} if unet_model is not None else {})}
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=output_dir) as staging:
        for name, model in models.items():
            model.save_pretrained(Path(staging) / name, safe_serialization=True)
        for name in models:
            target = output_dir / name
            if target.exists():
                old = Path(staging) / f"{name}.old"
                os.replace(target, old)
            os.replace(Path(staging) / name, target)
    return output_dir
