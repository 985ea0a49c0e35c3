"""Attention that never writes out a huge attention matrix by surprise: diffusers' `AttnProcessor2_0` wrapped so that
on CUDA it runs with torch's fused SDPA kernels only, and a call no fused kernel accepts runs the unfused ("math")
kernel in batch pieces whose attention matrices fit a memory budget.

Why: left to itself, `F.scaled_dot_product_attention` silently takes the math kernel when no fused kernel applies,
and the math kernel writes out batch x heads x query x key scores and their softmax. At the level 0 spatial
self-attention of the full-size SVD-XT UNet (576x1024, a 24-frame window with guidance: 48 x 5 heads x 9216^2
tokens) that is 75.9 GiB per matrix in fp32, more than an 80 GB GPU holds. Self- and cross-attention are
independent per batch element, and the processor's group norm and residual are per sample, so splitting the call
along the batch changes no value; only the peak.

On other devices the wrapped processor runs as before, same kernel, same bits (the CPU takes torch's CPU
flash-attention kernel, which writes no full matrix either), unless splitting is forced.

    apply_bounded_attention(pipe.unet)     # every default AttnProcessor2_0 wrapped; idempotent
    remove_bounded_attention(pipe.unet)    # the original processors back
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import NamedTuple

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from svd_common.errors import InvalidValue

logger = logging.getLogger(__name__)

# The written-out matrices of one piece of a math-kernel call. 1 GiB is small next to the ~25 GiB a full-size fp32
# step takes with fused attention, and leaves the pieces few: the level 1 spatial self-attention of the full-size
# UNet takes 24 pieces, level 2 three, level 3 one. A single batch element may need more than the budget (level 0:
# 3.2 GiB in fp32); it is then run alone, the smallest piece a batch split can make.
DEFAULT_BUDGET_BYTES = 1 << 30

# The math kernel computes scores = q k^T and then softmax(scores): both are alive while the softmax runs.
# Not counted: q, k, v and the output (head_dim wide, O(tokens) not O(tokens^2)) and an attention mask.
MATRIX_COPIES = 2

FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
NO_FUSED_KERNEL = ("No available kernel", "No viable backend")  # torch's RuntimeError when every backend refuses


class AttentionShape(NamedTuple):
    """One SDPA call: query (batch, heads, query_len, head_dim) against keys (batch, heads, key_len, head_dim)."""

    batch: int
    heads: int
    query_len: int
    key_len: int
    head_dim: int


def attention_matrix_bytes(shape: AttentionShape, itemsize: int, batch: int | None = None) -> int:
    """Bytes of the math kernel's written-out matrices (`MATRIX_COPIES` of batch x heads x query_len x key_len) for
    `batch` elements (default: the whole batch). head_dim does not enter."""
    batch = shape.batch if batch is None else batch
    return MATRIX_COPIES * batch * shape.heads * shape.query_len * shape.key_len * itemsize


def batch_pieces(shape: AttentionShape, itemsize: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """How many batch pieces keep each piece's written-out matrices within `budget_bytes`: 1 when the whole batch
    fits, at most `shape.batch` (one element per piece, even when one element alone is over the budget).
    Pieces of `torch.tensor_split(x, pieces)` hold at most `budget_bytes // per_element` elements each."""
    if budget_bytes <= 0:
        raise InvalidValue(f"the attention budget must be positive, got {budget_bytes} bytes")
    if shape.batch <= 1:
        return 1
    per_piece = max(1, budget_bytes // max(1, attention_matrix_bytes(shape, itemsize, batch=1)))
    return min(shape.batch, math.ceil(shape.batch / per_piece))


def math_itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of the math kernel's matrices: it computes fp16 and bf16 inputs in fp32 unless
    `torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)` was set."""
    if dtype in (torch.float16, torch.bfloat16) and not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed():
        return 4
    return torch.empty((), dtype=dtype).element_size()


class BoundedAttnProcessor:
    """Wraps an attention processor (diffusers' `AttnProcessor2_0`) without changing its maths.

    On the devices in `device_types` (CUDA) the wrapped processor runs under `sdpa_kernel(FUSED_BACKENDS)`, so the
    math kernel is never taken silently. When torch raises because no fused kernel applies, one warning per distinct
    call (shapes, dtype) names torch's reasons, and that call (and every later one like it) runs under the math
    kernel split along the batch into `batch_pieces(...)` pieces. Elsewhere the processor runs as it would unwrapped.
    `force_split`: split into budget pieces on every device and call (tests; the device's own kernel choice stays).
    `seen`: the calls already found without a fused kernel, shared by the wrappers of one model.
    """

    def __init__(self, processor=None, budget_bytes: int = DEFAULT_BUDGET_BYTES, force_split: bool = False,
                 device_types: tuple[str, ...] = ("cuda",), seen: set | None = None):
        if budget_bytes <= 0:
            raise InvalidValue(f"the attention budget must be positive, got {budget_bytes} bytes")
        self.processor = AttnProcessor2_0() if processor is None else processor
        self.budget_bytes = budget_bytes
        self.force_split = force_split
        self.device_types = tuple(device_types)
        self.seen = set() if seen is None else seen

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        inputs = (hidden_states, encoder_hidden_states, attention_mask, temb)
        if hidden_states.device.type not in self.device_types or torch.compiler.is_compiling():
            return self._run(self._pieces(attn, *inputs) if self.force_split else 1, attn, inputs, args, kwargs)
        key = _call_key(attn, *inputs)
        if key not in self.seen:
            try:
                with sdpa_kernel(FUSED_BACKENDS):
                    return self._run(self._pieces(attn, *inputs) if self.force_split else 1, attn, inputs, args,
                                     kwargs)
            except RuntimeError as error:
                if isinstance(error, torch.OutOfMemoryError) or not any(s in str(error) for s in NO_FUSED_KERNEL):
                    raise
                self.seen.add(key)
                self._warn(attn, inputs, args, kwargs, error)
        with sdpa_kernel(SDPBackend.MATH):
            return self._run(self._pieces(attn, *inputs), attn, inputs, args, kwargs)

    def _pieces(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb) -> int:
        shape = call_shape(attn, hidden_states, encoder_hidden_states)
        return batch_pieces(shape, math_itemsize(hidden_states.dtype), self.budget_bytes)

    def _run(self, pieces: int, attn, inputs: tuple, args: tuple, kwargs: dict) -> torch.Tensor:
        """The wrapped processor on `pieces` batch pieces of the inputs (hidden states, encoder states, mask and temb
        split alike), outputs concatenated."""
        if pieces == 1:
            return self.processor(attn, *inputs, *args, **kwargs)
        batch = inputs[0].shape[0]
        sizes = [batch // pieces + (i < batch % pieces) for i in range(pieces)]  # as torch.tensor_split
        parts = [_split(x, batch, sizes) for x in inputs]
        return torch.cat([self.processor(attn, *piece, *args, **kwargs) for piece in zip(*parts)])

    def _warn(self, attn, inputs: tuple, args: tuple, kwargs: dict, error: RuntimeError) -> None:
        shape = call_shape(attn, *inputs[:2])
        itemsize = math_itemsize(inputs[0].dtype)
        pieces = batch_pieces(shape, itemsize, self.budget_bytes)
        peak = attention_matrix_bytes(shape, itemsize, batch=math.ceil(shape.batch / pieces))
        logger.warning(
            "attention %s in %s: no fused SDPA kernel applies (%s); running the math kernel in %d batch piece(s), "
            "%.3g GiB of attention matrices at a time", tuple(shape), inputs[0].dtype,
            self._refusal_reasons(attn, inputs, args, kwargs, error), pieces, peak / 2**30)

    def _refusal_reasons(self, attn, inputs: tuple, args: tuple, kwargs: dict, error: RuntimeError) -> str:
        """Torch's reasons, as the warnings its kernel checks emit, from the same call on one batch element
        (torch checks dtypes, head dims, strides and hardware, none of which depend on the batch size)."""
        batch = inputs[0].shape[0]
        first = [_split(x, batch, [1, batch - 1])[0] if batch > 1 else x for x in inputs]
        with warnings.catch_warnings(record=True) as caught, torch.no_grad(), sdpa_kernel(FUSED_BACKENDS):
            warnings.simplefilter("always")
            try:
                self.processor(attn, *first, *args, **kwargs)
            except RuntimeError:
                pass
            else:
                return f"{_first_line(error)} for a batch of {batch}, though one element runs fused"
        reasons = [_first_line(w.message) for w in caught if issubclass(w.category, UserWarning)]
        text = ""
        for reason in filter(None, reasons):  # "Flash attention kernel not used because:" then its reasons
            text += reason if not text else (" " if text.endswith(":") else "; ") + reason
        return text or _first_line(error)


def call_shape(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> AttentionShape:
    """The SDPA shape `AttnProcessor2_0` makes of a call to `attn` (images (b, c, h, w) attend over h*w tokens)."""
    batch = hidden_states.shape[0]
    query_len = math.prod(hidden_states.shape[2:]) if hidden_states.ndim == 4 else hidden_states.shape[1]
    key_len = query_len if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    return AttentionShape(batch, attn.heads, query_len, key_len, attn.inner_dim // attn.heads)


def apply_bounded_attention(model: torch.nn.Module, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                            force_split: bool = False) -> int:
    """Wraps every default `AttnProcessor2_0` of a diffusers model (`attn_processors` / `set_attn_processor`) in a
    `BoundedAttnProcessor`; other processors are left as they are. Applying again rewraps the same originals with
    the new settings. Returns how many processors are wrapped."""
    seen: set = set()
    processors = {}
    for name, processor in model.attn_processors.items():
        original = processor.processor if isinstance(processor, BoundedAttnProcessor) else processor
        if type(original) is AttnProcessor2_0:
            processor = BoundedAttnProcessor(original, budget_bytes, force_split, seen=seen)
        processors[name] = processor
    wrapped = sum(isinstance(p, BoundedAttnProcessor) for p in processors.values())
    model.set_attn_processor(processors)  # (empties the dict)
    return wrapped


def remove_bounded_attention(model: torch.nn.Module) -> int:
    """Puts back the processors `apply_bounded_attention` wrapped. Returns how many."""
    processors = model.attn_processors
    unwrapped = {name: p.processor if isinstance(p, BoundedAttnProcessor) else p for name, p in processors.items()}
    model.set_attn_processor(unwrapped)
    return sum(isinstance(p, BoundedAttnProcessor) for p in processors.values())


def _call_key(attn, hidden_states, encoder_hidden_states, attention_mask, temb) -> tuple:
    shapes = tuple(None if x is None else tuple(x.shape) for x in (hidden_states, encoder_hidden_states,
                                                                     attention_mask))
    return (attn.heads, *shapes, hidden_states.dtype)


def _split(x, batch: int, sizes: list[int]) -> tuple:
    """A per-sample tensor cut along dim 0 into pieces of `sizes` samples (a mask may hold several rows per sample,
    e.g. one per head); anything else is passed whole to every piece."""
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] % batch:
        return (x,) * len(sizes)
    rows = x.shape[0] // batch
    return x.split([size * rows for size in sizes])


def _first_line(message) -> str:
    """A torch message's first line, without its "(Triggered internally at file:line)" tail."""
    lines = str(message).split("(Triggered internally", 1)[0].strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""
