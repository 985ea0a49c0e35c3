"""Which SDPA kernel the full-size SVD-XT UNet's attentions can take, and what the unfused one would write out.

For the spatial self-attention of each UNet level (0-2 in the down/up blocks, 3 in the mid block) and the temporal
self-attention of each level, at 576x1024 with a 24-frame window and classifier-free guidance, and for fp32, fp16
and bf16: the call's shape (derived from the UNet's config: block_out_channels, num_attention_heads; latent 72x128
halved per level; spatial batch = 2 x frames over h x w tokens, temporal batch = 2 x h x w over the frames), which
backends torch says it can use, the written-out attention matrix of the math kernel, and the batch pieces
`svd_controlnext.attention.batch_pieces` picks for the budget.

- CUDA (`--device cuda`): `torch._fused_sdp_choice` (what SDPA picks by default) and `can_use_flash_attention` /
  `can_use_efficient_attention` / `can_use_cudnn_attention` with debug=True, their reasons captured. The checks run on
  q/k/v of ONE batch element in the layout diffusers' AttnProcessor2_0 makes (torch's checks look at dtype, head dim,
  strides and hardware, not the batch size), so nothing large is allocated. `--run` then runs each fused backend on
  the whole batch (q/k/v/out only: ~2.3 GiB at level 0 in fp32; the math kernel is never run) and records its
  error or its time, which catches a limit the checks do not see.
- CPU: torch's CUDA checks do not apply; the entry says what SDPA runs on the CPU (`_fused_sdp_choice`).

No model weights: the UNet is built on the meta device for its config only.
Run: .venv/bin/python bench/attention.py                    (CPU, a few seconds)
     .venv/bin/python bench/attention.py --device cuda --run
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fullsize import full_unet  # noqa: E402
from svd_controlnext.attention import (DEFAULT_BUDGET_BYTES, FUSED_BACKENDS, AttentionShape,  # noqa: E402
                                       attention_matrix_bytes, batch_pieces, math_itemsize)

GIB = 2**30
VAE_SCALE = 8
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def attention_shapes(config, height: int, width: int, frames: int, guidance: bool = True) -> dict:
    """{name: AttentionShape} of the spatial and temporal self-attention at each level that has attention."""
    batch = (2 if guidance else 1) * frames
    h, w = height // VAE_SCALE, width // VAE_SCALE
    levels = len(config.block_out_channels)
    shapes = {}
    for level, (channels, heads) in enumerate(zip(config.block_out_channels, config.num_attention_heads)):
        if "CrossAttn" not in config.down_block_types[level] and level != levels - 1:  # the last: the mid block
            continue
        tokens = (h >> level) * (w >> level)
        shapes[f"level{level}_spatial"] = AttentionShape(batch, heads, tokens, tokens, channels // heads)
        shapes[f"level{level}_temporal"] = AttentionShape(batch // frames * tokens, heads, frames, frames,
                                                          channels // heads)
    return shapes


def qkv(shape: AttentionShape, dtype: torch.dtype, device: str, batch: int) -> torch.Tensor:
    """A query in AttnProcessor2_0's layout: (b, L, heads*d) viewed as (b, L, heads, d) and transposed."""
    x = torch.randn(batch, shape.query_len, shape.heads * shape.head_dim, device=device, dtype=dtype)
    return x.view(batch, shape.query_len, shape.heads, shape.head_dim).transpose(1, 2)


def captured(check, *args) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = bool(check(*args))
    reasons = [" ".join(str(w.message).split("(Triggered internally", 1)[0].split()) for w in caught]
    return {"ok": ok, "reasons": reasons}


def cuda_backends(shape: AttentionShape, dtype: torch.dtype) -> dict:
    q = qkv(shape, dtype, "cuda", batch=1)
    k, v = qkv(shape, dtype, "cuda", 1), qkv(shape, dtype, "cuda", 1)
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
    return {"default_choice": SDPBackend(torch._fused_sdp_choice(q, k, v)).name,
            "flash": captured(torch.backends.cuda.can_use_flash_attention, params, True),
            "efficient": captured(torch.backends.cuda.can_use_efficient_attention, params, True),
            "cudnn": captured(torch.backends.cuda.can_use_cudnn_attention, params, True)}


def cuda_runs(shape: AttentionShape, dtype: torch.dtype) -> dict:
    """Each fused backend alone on the whole batch: 'ok <ms>' or its error's first line."""
    q, k, v = (qkv(shape, dtype, "cuda", shape.batch) for _ in range(3))
    results = {}
    for backend in FUSED_BACKENDS:
        try:
            with sdpa_kernel([backend]), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
                torch.cuda.synchronize()
                start = time.perf_counter()
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
                torch.cuda.synchronize()
            results[backend.name] = f"ok {1000 * (time.perf_counter() - start):.1f} ms"
        except Exception as e:  # noqa: BLE001 - the probe reports any kernel's failure
            results[backend.name] = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            torch.cuda.synchronize()
    del q, k, v
    torch.cuda.empty_cache()
    return results


def cpu_backend(shape: AttentionShape, dtype: torch.dtype) -> dict:
    q = qkv(shape, dtype, "cpu", batch=1)
    return {"cpu": SDPBackend(torch._fused_sdp_choice(q, q, q)).name}


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "device": device,
           "sdp_enabled": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                           "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                           "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                           "math": torch.backends.cuda.math_sdp_enabled()},
           "math_fp16_bf16_reduction": torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed(),
           "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--budget-gib", type=float, default=DEFAULT_BUDGET_BYTES / GIB)
    parser.add_argument("--run", action="store_true", help="CUDA: run each fused backend on the whole batch")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    budget = int(args.budget_gib * GIB)

    with torch.device("meta"):
        config = full_unet().config
    shapes = attention_shapes(config, args.height, args.width, args.frames)
    results = {}
    for name, shape in shapes.items():
        entry = {"shape": dict(shape._asdict())}
        for label, dtype in DTYPES.items():
            itemsize = math_itemsize(dtype)
            pieces = batch_pieces(shape, itemsize, budget)
            row = {"matrix_gib": round(attention_matrix_bytes(shape, itemsize) / 2 / GIB, 3),  # one matrix
                   "math_peak_gib": round(attention_matrix_bytes(shape, itemsize) / GIB, 3),  # scores + softmax
                   "pieces": pieces,
                   "piece_peak_gib": round(attention_matrix_bytes(shape, itemsize, -(-shape.batch // pieces)) / GIB,
                                           3)}
            row.update(cuda_backends(shape, dtype) if args.device == "cuda" else cpu_backend(shape, dtype))
            if args.run and args.device == "cuda":
                row["run"] = cuda_runs(shape, dtype)
            entry[label] = row
        results[name] = entry
    print(json.dumps({"environment": environment(args.device), "resolution": [args.height, args.width],
                      "frames": args.frames, "guidance": True, "budget_gib": args.budget_gib,
                      "cpu_note": "on the CPU, SDPA's FLASH_ATTENTION is torch's CPU flash kernel: no full matrix",
                      "matrix_note": "math kernel: fp16/bf16 computed in fp32 unless the fp16/bf16 reduction is "
                                     "allowed; math_peak = scores + softmax", "attention": results}))


if __name__ == "__main__":
    main()
