"""Checkpoint loading: the published ControlNeXt-SVD-v2 files and our diffusers-style folders.

Safe by construction: safetensors first; `.bin` / `.pt` only through `torch.load(weights_only=True)`,
which refuses pickles that carry code. A file whose keys or shapes do not fit the model is reported
by name before anything is loaded into it.

The published 6.1 GB `unet.bin` is a pickle; it is converted once into a safetensors file in the
user's cache (in the working dtype) and memory-mapped from there on later runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
import socket
import struct
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import torch

from svd_common.atomic import publish
from svd_common.cache_dirs import weights_cache_dir
from svd_common.errors import WeightsError
from svd_common.hub import hub_local_only, hub_offline

from .encoder import PoseEncoder

logger = logging.getLogger(__name__)

HUB_REPO = "Pbihao/ControlNeXt"
HUB_SUBFOLDER = "ControlNeXt-SVD/v2"
CONTROLNET_FILE = "controlnet.bin"
UNET_FILE = "unet.bin"
BASE_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"

CACHE_FORMAT = 1  # bump when the converted files' layout changes: old entries are then never hit
MIB = 1 << 20
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def load_state_dict_file(path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a safetensors file or a plain pickled tensor dict.

    `mmap=True` maps a zip-format pickle instead of reading it, so a 6 GB checkpoint costs page
    cache (which the kernel can drop), not 6 GB of process memory.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - any failure to parse means "not safetensors": try the pickle path
        pass
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol is not the user's concern
            warnings.simplefilter("ignore")
            state = torch.load(str(path), map_location="cpu", weights_only=True,
                               mmap=mmap and zipfile.is_zipfile(path))  # legacy (non-zip) pickles cannot be mapped
    except pickle.UnpicklingError as e:
        detail = unpickling_reason(str(e))
        if "global" in detail.lower():
            raise WeightsError(f"{path}: refused, the pickle carries code or objects, not just tensors "
                               f"({detail}); nothing was executed") from None
        raise WeightsError(f"{path}: not a safetensors or PyTorch checkpoint ({detail or 'unreadable pickle'})") from None
    except Exception as e:  # noqa: BLE001 - zip/pickle/EOF errors all mean "not a checkpoint"
        raise WeightsError(f"{path}: not a safetensors or PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise WeightsError(f"{path}: not a plain {{name: tensor}} checkpoint")
    return state


# Lines of torch's weights-only error that advise rather than say what was found; one of them advises
# `weights_only=False`, the unsafe load this module exists to avoid, so none of them is passed on.
_TORCH_ADVICE = ("weights only load failed", "weights_only", "trust", "file an issue", "check the documentation",
                 "alternatively", "allowlist", "safe_globals")


def unpickling_reason(message: str) -> str:
    """What torch's weights-only unpickler found (`Unsupported global: GLOBAL builtins.exec`), without its advice."""
    found = message.rsplit("WeightsUnpickler error:", 1)[-1]
    for line in found.splitlines():
        line = line.split(" was not an allowed global")[0].split(". Please use")[0].strip()
        if line and not any(advice in line.lower() for advice in _TORCH_ADVICE):
            return line.removeprefix("Trying to load ").rstrip(".")
    return ""


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


# --- the hub -------------------------------------------------------------------------------------

def _error_chain(error: BaseException) -> list[BaseException]:
    """The error and the ones it was raised from: diffusers re-raises hub errors as OSError."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _is_network_error(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    name, package = type(error).__name__, type(error).__module__.split(".")[0]
    return package in {"httpx", "httpx2", "requests", "urllib3"} and any(
        word in name for word in ("Connect", "Timeout", "Network", "Transport"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def hub_error_message(error: Exception, repo: str) -> str:
    """One actionable line for a failed hub download of `repo` (the error, or one it was raised from,
    is a huggingface_hub error; diffusers wraps them in OSError)."""
    from huggingface_hub import errors as hub

    chain = _error_chain(error)

    def found(*types):
        return next((e for e in chain if isinstance(e, types)), None)

    page = f"https://huggingface.co/{repo}"
    if found(hub.GatedRepoError):
        return (f"{repo} is a gated model: accept its licence at {page} while logged in, then log in here "
                "(set HF_TOKEN or run `hf auth login`)")
    offline = hub_offline()
    if (found(hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled) or any(map(_is_network_error, chain))
            or (offline and not found(hub.HfHubHTTPError))):
        why = "HF_HUB_OFFLINE=1 is set" if offline else "huggingface.co cannot be reached"
        return (f"{repo} is not in the local Hugging Face cache and this machine is offline ({why}): "
                "download it once with internet access, or pass a local file or folder")
    if found(hub.DisabledRepoError):
        return f"{repo} has been disabled on the hub ({page})"
    if found(hub.RevisionNotFoundError):
        return f"{repo}: the requested revision does not exist on the hub ({page})"
    missing_file = found(hub.EntryNotFoundError)
    if missing_file is not None:
        url = getattr(getattr(missing_file, "response", None), "url", None)  # `.request` may raise when unset
        what = f" ({url})" if url else ""
        return f"{repo}: the requested file was not found in this hub repository{what}"
    if found(hub.RepositoryNotFoundError):
        return (f"{repo}: not found on the hub (check the name; if it is private, log in: "
                "HF_TOKEN or `hf auth login`)")
    if found(hub.HFValidationError):
        return f"{repo}: neither an existing local path nor a valid hub repo id"
    http = found(hub.HfHubHTTPError)
    if http is not None and getattr(getattr(http, "response", None), "status_code", None) in (401, 403):
        return (f"{repo}: access refused by the hub; log in (HF_TOKEN or `hf auth login`) with an account "
                "that may read it")
    return f"{repo} could not be loaded ({_first_line(http or error)})"


def resolve_file(source, filename: str) -> Path:
    """A local file, a local folder holding `filename`, or `filename` in the hub's published folder."""
    if source is not None and Path(source).is_file():
        return Path(source)
    if source is not None and Path(source).is_dir():
        return Path(source) / filename
    if source is not None and Path(source).suffix:
        raise WeightsError(f"{source}: no such checkpoint file")
    from huggingface_hub import hf_hub_download

    repo = str(source) if source else HUB_REPO
    try:
        return Path(hf_hub_download(repo, filename, subfolder=HUB_SUBFOLDER, local_files_only=hub_local_only()))
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: all say what to do in one line
        raise WeightsError(f"cannot fetch {HUB_SUBFOLDER}/{filename}: {hub_error_message(e, repo)}") from None


def check_weights_available(base_model: str, control, unet_weights=None) -> None:
    """Fail in seconds, before any pose is extracted, when the weights a run needs cannot be had (offline and not
    cached, a wrong path or repo). The control and UNet checkpoints are resolved as loading resolves them (a
    download now is one that loading would make anyway); the base model by its UNet's config."""
    if _diffusers_folder(control, "pose_encoder") is None:
        resolve_file(control, CONTROLNET_FILE)
    if unet_weights is not None and _diffusers_unet_folder(unet_weights) is None:
        file = resolve_file(unet_weights, UNET_FILE)
        if not file.is_file():
            raise WeightsError(f"{file}: no such checkpoint file")
    _unet_config(base_model)


def _diffusers_folder(source, name: str) -> Path | None:
    """A folder written by save_pretrained (or one holding `name/` from `convert` or training), else None."""
    path = Path(source)
    for folder in (path, path / name):
        if folder.is_dir() and (folder / "config.json").is_file():
            return folder
    return None


# --- the control encoder ---------------------------------------------------------------------------

def load_pose_encoder(source, **config) -> PoseEncoder:
    """From a folder written by `save_pretrained` / `convert`, or from a published `controlnet.bin`."""
    folder = _diffusers_folder(source, "pose_encoder")
    if folder is not None:
        return PoseEncoder.from_pretrained(folder)
    file = resolve_file(source, CONTROLNET_FILE)
    state = load_state_dict_file(file)
    encoder = PoseEncoder(**config)
    problems = key_problems(encoder, state)
    if problems:
        raise WeightsError(f"{file}: not a ControlNeXt-SVD-v2 control encoder checkpoint: {'; '.join(problems)}")
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()  # inference mode, as from_pretrained leaves a model


# --- the conversion cache ----------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def source_key(path, dtype: torch.dtype) -> str:
    """Cache key of a checkpoint converted to `dtype`: its size, a SHA-256 of its first and last MiB,
    the dtype and the cache format.

    Hashing all 6.1 GB would cost tens of seconds on every run, and an mtime would force a new
    conversion after a plain copy. A zip-format torch checkpoint ends with its central directory,
    which holds a CRC-32 of every tensor record, so its last MiB changes whenever any tensor does.
    A legacy (non-zip) pickle has no such index, so its mtime is part of its key.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(MIB))
        if size > MIB:
            f.seek(max(MIB, size - MIB))
            digest.update(f.read(MIB))
    spec = {"size": size, "head_tail": digest.hexdigest(), "dtype": _dtype_name(dtype), "format": CACHE_FORMAT}
    if not zipfile.is_zipfile(path):
        spec["mtime_ns"] = path.stat().st_mtime_ns
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _target_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype


def write_safetensors(state: dict[str, torch.Tensor], path, dtype: torch.dtype, metadata: dict[str, str],
                      progress: bool = True) -> Path:
    """`state` as a safetensors file with floating tensors cast to `dtype`, written one tensor at a time.

    safetensors' own `save_file` takes every tensor at once, so casting 6.1 GB of fp32 to fp16 first
    would hold all the cast copies in memory; here at most one cast tensor exists at any time. The
    layout is the documented safetensors one: an 8-byte little-endian header length, a JSON header
    of {name: dtype, shape, data_offsets}, then each tensor's little-endian bytes.
    """
    if sys.byteorder != "little":  # the raw bytes below are the host's; safetensors wants little-endian
        from safetensors.torch import save_file

        save_file({k: v.to(_target_dtype(v, dtype)).contiguous() for k, v in state.items()}, str(path), metadata)
        return Path(path)
    from tqdm import tqdm

    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, tensor in state.items():
        target = _target_dtype(tensor, dtype)
        size = tensor.numel() * torch.empty((), dtype=target).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[target], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensor data starts 8-byte aligned
    with open(path, "wb") as f, tqdm(total=offset, unit="B", unit_scale=True, desc=f"converting to {Path(path).name}",
                                     disable=not progress or None, leave=False) as bar:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for tensor in state.values():
            data = tensor.to(_target_dtype(tensor, dtype)).contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
            bar.update(data.numel())
    return Path(path)


def _is_safetensors(path: Path) -> bool:
    """True when the file starts like a safetensors file: the length of a JSON header that fits in it."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and struct.unpack("<Q", head[:8])[0] < path.stat().st_size and head[8:] == b"{"


def _converted_metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable or half-written: not a usable entry
        return None


def _drop_stale(directory: Path, keep: Path, source: str, dtype: torch.dtype) -> None:
    """Remove earlier conversions of the same source file in the same dtype (a replaced download
    would otherwise leave 6 GB behind per version), and temporary files of conversions that were
    killed: untouched for an hour, while a running conversion writes to its file every second."""
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink()
    for entry in directory.glob("*.safetensors"):
        if entry == keep:
            continue
        metadata = _converted_metadata(entry)
        if metadata and metadata.get("source") == source and metadata.get("dtype") == _dtype_name(dtype):
            logger.info("removing %s: converted from an earlier version of %s", entry, source)
            entry.unlink(missing_ok=True)


def converted_checkpoint(file, dtype: torch.dtype, cache_dir=None, check=None) -> Path | None:
    """The pickled checkpoint `file` as safetensors in `dtype`: converted on first use into the cache
    (default `weights_cache_dir()`), reused afterwards.

    `check(state)` may refuse the pickle's contents before anything is written. Returns None when
    the cache cannot take the file (read-only, too little space): the caller then reads the pickle.
    """
    file = Path(file)
    directory = Path(cache_dir) if cache_dir else weights_cache_dir()
    key = source_key(file, dtype)
    target = directory / f"{file.stem}-{_dtype_name(dtype)}-{key[:20]}.safetensors"
    if target.is_file():
        if _converted_metadata(target) is not None:
            logger.info("%s: using its converted copy %s", file, target)
            return target
        logger.warning("%s: damaged conversion, converting again", target)
    state = load_state_dict_file(file, mmap=True)
    if check is not None:
        check(state)
    needed = sum(v.numel() * torch.empty((), dtype=_target_dtype(v, dtype)).element_size() for v in state.values())
    tmp = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
        if free < needed + 64 * MIB:
            logger.warning("%s: %.1f GB free, the converted %s needs %.1f GB: reading the pickle directly "
                           "(slower, every run)", directory, free / 1e9, file.name, needed / 1e9)
            return None
        logger.info("converting %s to %s (%s, %.1f GB; once: later runs reuse it)", file, target,
                    _dtype_name(dtype), needed / 1e9)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        source = str(file.resolve())
        write_safetensors(state, tmp, dtype, {"format": "pt", "source": source, "source_key": key,
                                              "dtype": _dtype_name(dtype)})
        publish(tmp, target)
        tmp = None
    except OSError as e:  # a cache that cannot be written must not fail the run
        logger.warning("conversion cache not written (%s): %s; reading %s directly", target, e, file)
        return None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    _drop_stale(directory, target, source, dtype)
    return target


# --- the UNet ------------------------------------------------------------------------------------------

def _unet_class():
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel


def _base_error(error: Exception, base) -> str:
    if Path(base).is_dir():
        return f"{Path(base) / 'unet'}: {_first_line(error)}"
    return hub_error_message(error, str(base))


def _check_base_folder(base) -> None:
    if Path(base).is_dir() and not (Path(base) / "unet" / "config.json").is_file():
        raise WeightsError(f"{base}: no unet/config.json in it (expected an SVD model folder, "
                         f"e.g. a download of {BASE_MODEL})")


def _pretrained_unet(base, dtype: torch.dtype):
    """The base model's own UNet, as the published script loads it (from_pretrained, low_cpu_mem_usage)."""
    _check_base_folder(base)
    try:
        return _unet_class().from_pretrained(str(base), subfolder="unet", dtype=dtype, low_cpu_mem_usage=True,
                                             local_files_only=hub_local_only())
    except Exception as e:  # noqa: BLE001 - hub, file and format errors all become one line
        raise WeightsError(f"cannot load the UNet of the base model {base}: {_base_error(e, base)}") from None


def _unet_skeleton(base):
    """The base's UNet architecture with no memory behind its weights (meta tensors): enough to check a
    checkpoint's keys and shapes, and to take the checkpoint's tensors as they are."""
    from accelerate import init_empty_weights

    config = _unet_config(base)
    with init_empty_weights():
        return _unet_class().from_config(config)


def _unet_config(base) -> dict:
    _check_base_folder(base)
    try:
        return _unet_class().load_config(str(base), subfolder="unet", local_files_only=hub_local_only())
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"cannot read the UNet config of the base model {base}: {_base_error(e, base)}") from None


def _diffusers_unet_folder(source) -> Path | None:
    return _diffusers_folder(source, "unet")


def _checkpoint_state(file: Path, dtype: torch.dtype, cache_dir, use_cache: bool, check) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in `dtype`, memory-mapped where possible, checked by `check` first."""
    from safetensors.torch import load_file

    state = None
    if use_cache and not _is_safetensors(file):
        converted = converted_checkpoint(file, dtype, cache_dir, check)
        if converted is not None:
            state = load_file(str(converted))
    if state is None:
        state = load_state_dict_file(file, mmap=True)
    check(state)
    return {k: v.to(_target_dtype(v, dtype)) for k, v in state.items()}  # one tensor at a time; no-op when cached


def load_unet(base_model: str, unet_weights: str | os.PathLike | None, dtype: torch.dtype = torch.float32,
              cache_dir=None):
    """The SVD UNet to sample with: the base model's pretrained UNet with the fine-tuned weights over it.

    As published (ControlNeXt-SVD-v2/run_controlnext.py: the base's `unet` by from_pretrained, then
    `unet.bin` by load_state_dict(strict=False)), tensors the checkpoint lacks keep the base's
    pretrained values. `unet_weights`: None (the base's UNet), a unet.bin / .safetensors file, a
    folder holding unet.bin, a diffusers UNet folder (or one holding `unet/`), or a hub repo id
    (then `ControlNeXt-SVD/v2/unet.bin` in it). A pickle is converted once into the cache
    (`cache_dir`, default `weights_cache_dir()`).
    """
    return _load_unet(base_model, unet_weights, dtype, cache_dir, use_cache=True)


def _load_unet(base_model, unet_weights, dtype, cache_dir, use_cache: bool):
    if unet_weights is None:
        return _pretrained_unet(base_model, dtype)
    folder = _diffusers_unet_folder(unet_weights)
    if folder is not None:
        try:
            return _unet_class().from_pretrained(str(folder), dtype=dtype, low_cpu_mem_usage=True)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"{folder}: not a loadable diffusers UNet folder ({_first_line(e)})") from None
    file = resolve_file(unet_weights, UNET_FILE)
    if not file.is_file():
        raise WeightsError(f"{file}: no such checkpoint file")
    unet = _unet_skeleton(base_model)
    expected = unet.state_dict()

    def check(state):
        problems = key_problems(unet, state, allow_missing=True)
        if state and not set(state) & set(expected):
            problems.insert(0, "none of its keys is a UNet key")
        if problems or not state:
            raise WeightsError(f"{file}: not an SVD UNet checkpoint for {base_model}: "
                             f"{'; '.join(problems) or 'it holds no tensors'}")

    state = _checkpoint_state(file, dtype, cache_dir, use_cache, check)
    missing = [k for k in expected if k not in state]
    if missing:  # only now is the base's own UNet needed (and, from the hub, downloaded)
        logger.warning("%s: %d of the UNet's %d tensors are not in it and keep the base model's pretrained "
                       "values (%s)", file, len(missing), len(expected), _some(missing))
        unet = _pretrained_unet(base_model, dtype)
    # assign: the parameters become the checkpoint's (mapped) tensors, with no second copy in memory
    unet.load_state_dict(state, strict=not missing, assign=True)
    return unet.eval()


def convert(controlnet, output_dir, unet=None, base=BASE_MODEL, embedding_padding: int = 0) -> Path:
    """Write `output_dir/pose_encoder/` (and `output_dir/unet/`) as safetensors diffusers folders.

    Each folder is written beside its target first and renamed into place, so an interrupted run
    leaves the previous folders (if any) intact. The UNet is written in fp32, from the base's UNet
    with the checkpoint laid over it (`load_unet`), without a copy in the conversion cache.
    """
    output_dir = Path(output_dir)
    if not output_dir.parent.is_dir():
        raise WeightsError(f"{output_dir}: folder {output_dir.parent} does not exist")
    encoder = load_pose_encoder(controlnet, embedding_padding=embedding_padding)
    unet_model = _load_unet(base, unet, torch.float32, None, use_cache=False) if unet is not None else None
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
