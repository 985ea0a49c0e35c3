import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from svd_common.errors import InvalidValue
from svd_controlnext.attention import (DEFAULT_BUDGET_BYTES, AttentionShape, BoundedAttnProcessor,
                                       apply_bounded_attention, attention_matrix_bytes, batch_pieces, math_itemsize,
                                       remove_bounded_attention)
from svd_controlnext.tiny import tiny_unet

GIB = 2**30
FRAMES = 3  # the tiny UNet's spatial attention then sees an odd batch of 3


# --- the choice of pieces, against hand-computed values ---

def test_a_batch_that_fits_is_one_piece():
    # 2 copies x 2 batch x 1 head x 4 x 4 x 4 bytes = 256 bytes
    shape = AttentionShape(batch=2, heads=1, query_len=4, key_len=4, head_dim=64)
    assert attention_matrix_bytes(shape, 4) == 256
    assert batch_pieces(shape, 4, budget_bytes=256) == 1
    assert batch_pieces(shape, 4, budget_bytes=255) == 2  # one element (128 bytes) per piece


def test_an_odd_batch_is_cut_into_pieces_of_what_fits():
    # one element: 2 copies x 2 heads x 8 x 8 x 8 bytes = 2048; a 5000-byte budget holds 2 elements -> 7 in 4 pieces
    shape = AttentionShape(batch=7, heads=2, query_len=8, key_len=8, head_dim=4)
    assert attention_matrix_bytes(shape, 8, batch=1) == 2048
    assert batch_pieces(shape, 8, budget_bytes=5000) == 4
    assert [len(p) for p in torch.arange(7).tensor_split(4)] == [2, 2, 2, 1]  # no piece over 2 elements
    assert batch_pieces(shape, 8, budget_bytes=1) == 7  # never more pieces than elements
    assert batch_pieces(AttentionShape(1, 2, 8, 8, 4), 8, budget_bytes=1) == 1


def test_full_size_svd_xt_level_0_self_attention_in_fp32():
    # 576x1024 -> latent 72x128 = 9216 tokens; 24 frames x 2 (guidance) = batch 48; 320 channels = 5 heads of 64.
    # One matrix of the whole batch: 48 x 5 x 9216^2 x 4 = 81,537,269,760 bytes = 75.94 GiB (the H100 report).
    # One element, scores + softmax: 2 x 5 x 84,934,656 x 4 = 3,397,386,240 bytes = 3.16 GiB > 1 GiB,
    # so 1 GiB // 3.16 GiB = 0 -> one element per piece -> 48 pieces, each 3.16 GiB (the floor of a batch split).
    shape = AttentionShape(batch=48, heads=5, query_len=9216, key_len=9216, head_dim=64)
    assert attention_matrix_bytes(shape, 4) == 2 * 81_537_269_760
    assert attention_matrix_bytes(shape, 4, batch=1) == 3_397_386_240
    assert DEFAULT_BUDGET_BYTES == GIB
    assert batch_pieces(shape, 4) == 48


def test_full_size_svd_xt_other_levels_in_fp32():
    # level 1: 36x64 = 2304 tokens, 10 heads: one element 2 x 10 x 2304^2 x 4 = 424,673,280 bytes;
    #   1 GiB // that = 2 elements a piece -> 48 / 2 = 24 pieces
    assert batch_pieces(AttentionShape(48, 10, 2304, 2304, 64), 4) == 24
    # level 2: 18x32 = 576 tokens, 20 heads: 2 x 20 x 576^2 x 4 = 53,084,160; 1,073,741,824 // 53,084,160 = 20
    #   -> ceil(48 / 20) = 3 pieces
    assert batch_pieces(AttentionShape(48, 20, 576, 576, 64), 4) == 3
    # level 3 (mid block): 9x16 = 144 tokens: 2 x 20 x 144^2 x 4 = 3,317,760 x 48 = 159 MB -> 1 piece
    assert batch_pieces(AttentionShape(48, 20, 144, 144, 64), 4) == 1
    # level 0 temporal: batch 2 x 9216, sequence 24 frames, 5 heads: 2 x 18432 x 5 x 576 x 4 = 424,673,280 -> 1
    assert batch_pieces(AttentionShape(18432, 5, 24, 24, 64), 4) == 1
    # level 0 cross-attention on the one CLIP token: 2 x 48 x 5 x 9216 x 1 x 4 = 17.7 MB -> 1
    assert batch_pieces(AttentionShape(48, 5, 9216, 1, 64), 4) == 1


def test_half_precision_counts_the_math_kernels_fp32_upcast():
    assert math_itemsize(torch.float32) == 4 and math_itemsize(torch.float64) == 8
    assert math_itemsize(torch.float16) == 4 and math_itemsize(torch.bfloat16) == 4
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        assert math_itemsize(torch.float16) == 2
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)


def test_a_budget_must_be_positive():
    with pytest.raises(InvalidValue):
        batch_pieces(AttentionShape(2, 1, 4, 4, 4), 4, budget_bytes=0)
    with pytest.raises(InvalidValue):
        BoundedAttnProcessor(budget_bytes=-1)


# --- one Attention module: the split path equals the unsplit one ---

def attention_case(kind, dtype, batch=5, seed=0):
    """(module, hidden_states, encoder_hidden_states, attention_mask) for an odd batch of 5."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "self":
        attn = Attention(32, heads=4, dim_head=8)
        inputs = (torch.randn(batch, 64, 32, generator=g), None, None)
    elif kind == "cross":  # with a mask over 6 encoder tokens, one row per sample
        attn = Attention(32, heads=4, dim_head=8, cross_attention_dim=16)
        mask = torch.zeros(batch, 1, 6).masked_fill(torch.rand(batch, 1, 6, generator=g) < 0.3, -1e4)
        inputs = (torch.randn(batch, 64, 32, generator=g), torch.randn(batch, 6, 16, generator=g), mask)
    else:  # "image": (b, c, h, w) in, group norm and a residual, as in the VAE's attention
        attn = Attention(32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True, bias=True,
                         upcast_softmax=True, _from_deprecated_attn_block=True)
        inputs = (torch.randn(batch, 32, 8, 8, generator=g), None, None)
    attn = attn.to(dtype).eval()
    return (attn, *(None if x is None else x.to(dtype) for x in inputs))


def close(a, b, dtype):
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    return torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["self", "cross", "image"])
@torch.no_grad()
def test_split_attention_equals_the_whole_batch(kind, dtype, monkeypatch):
    attn, hidden, encoder, mask = attention_case(kind, dtype)
    expected = attn(hidden, encoder, mask)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, *args, **kwargs):
        calls.append(q.shape[0])
        return sdpa(q, *args, **kwargs)

    one = attention_matrix_bytes(AttentionShape(1, attn.heads, 64, 64 if encoder is None else 6, 8), 8 if
                                 dtype == torch.float64 else 4)
    attn.set_processor(BoundedAttnProcessor(budget_bytes=2 * one, force_split=True))
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    got = attn(hidden, encoder, mask)
    assert calls == [2, 2, 1]  # 5 elements, 2 a piece: ceil(5 / 2) = 3 pieces
    assert got.shape == expected.shape
    # Exact in SDPA; the projections' GEMMs may round the last bit differently for fewer rows on this CPU.
    assert close(got, expected, dtype)


@torch.no_grad()
def test_a_mask_with_one_row_per_head_is_split_with_its_samples():
    attn, hidden, encoder, mask = attention_case("cross", torch.float64)
    per_head = mask.repeat_interleave(attn.heads, dim=0)  # (batch x heads, 1, 6), as prepare_attention_mask makes
    expected = attn(hidden, encoder, per_head)
    attn.set_processor(BoundedAttnProcessor(budget_bytes=1, force_split=True))
    assert close(attn(hidden, encoder, per_head), expected, torch.float64)


@torch.no_grad()
def test_on_cpu_the_wrapper_changes_nothing():
    attn, hidden, encoder, mask = attention_case("cross", torch.float32)
    expected = attn(hidden, encoder, mask)
    attn.set_processor(BoundedAttnProcessor(budget_bytes=1))  # a budget nothing fits: not used off CUDA
    assert torch.equal(attn(hidden, encoder, mask), expected)


# --- the CUDA path's fallback, on the CPU with torch's refusal injected ---

@pytest.fixture
def no_fused_kernel(monkeypatch):
    """SDPA as torch behaves on CUDA when no fused kernel applies: with the math kernel disabled it warns its
    reasons and raises; with math allowed it runs. Records the batch of every call that ran and every refusal."""
    sdpa = F.scaled_dot_product_attention
    log = {"ran": [], "refused": 0, "backends": []}

    def refusing_sdpa(q, *args, **kwargs):
        if not torch.backends.cuda.math_sdp_enabled():
            log["refused"] += 1
            warnings.warn("Memory efficient kernel not used because:")
            warnings.warn("Mem efficient attention requires last dimension of inputs to be divisible by 4. "
                          "(Triggered internally at /pytorch/aten/src/ATen/native/transformers/cuda/sdp_utils.cpp)")
            raise RuntimeError("No available kernel. Aborting execution.")
        log["ran"].append(q.shape[0])
        log["backends"].append(torch.backends.cuda.flash_sdp_enabled())
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", refusing_sdpa)
    return log


@torch.no_grad()
def test_no_fused_kernel_warns_once_and_runs_math_in_pieces(no_fused_kernel, caplog):
    attn, hidden, encoder, mask = attention_case("self", torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        expected = attn(hidden)  # the math kernel on the whole batch
    no_fused_kernel["ran"].clear()
    one = attention_matrix_bytes(AttentionShape(1, 4, 64, 64, 8), 8)
    attn.set_processor(BoundedAttnProcessor(budget_bytes=2 * one, device_types=("cpu",)))
    with caplog.at_level(logging.WARNING, logger="svd_controlnext.attention"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = attn(hidden), attn(hidden)
    # refused twice on the first call (the call, then its one-element rerun for the reasons), never again
    assert no_fused_kernel["refused"] == 2
    assert no_fused_kernel["ran"] == [2, 2, 1, 2, 2, 1]  # both calls in 3 pieces, math kernel only
    assert not any(no_fused_kernel["backends"])
    assert close(first, expected, torch.float64) and torch.equal(second, first)
    [record] = caplog.records
    assert "no fused SDPA kernel applies" in record.message
    assert "Memory efficient kernel not used because: Mem efficient attention requires last dimension" in record.message
    assert "Triggered internally" not in record.message and "3 batch piece(s)" in record.message


@torch.no_grad()
def test_each_distinct_call_warns_once(no_fused_kernel, caplog):
    attn, hidden, _, _ = attention_case("self", torch.float32)
    attn.set_processor(BoundedAttnProcessor(device_types=("cpu",)))
    with caplog.at_level(logging.WARNING, logger="svd_controlnext.attention"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x in (hidden, hidden, hidden[:3], hidden[:3], hidden.double()):
            attn.to(x.dtype)(x)
    assert len(caplog.records) == 3
    assert no_fused_kernel["ran"] == [5, 5, 3, 3, 5]  # the default budget: each in one piece


@torch.no_grad()
def test_other_errors_are_not_taken_for_a_missing_kernel(monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    attn, hidden, _, _ = attention_case("self", torch.float32)
    attn.set_processor(BoundedAttnProcessor(device_types=("cpu",)))
    monkeypatch.setattr(F, "scaled_dot_product_attention", failing)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        attn(hidden)


@torch.no_grad()
def test_where_a_fused_kernel_applies_it_runs_whole():
    attn, hidden, encoder, mask = attention_case("cross", torch.float32)
    expected = attn(hidden, encoder, mask)  # the CPU's default, its flash kernel
    attn.set_processor(BoundedAttnProcessor(budget_bytes=1, device_types=("cpu",)))
    assert torch.equal(attn(hidden, encoder, mask), expected)


# --- a tiny real UNetSpatioTemporalConditionModel ---

def unet_inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(1, FRAMES, 8, 16, 16, generator=g).to(dtype), timestep=torch.tensor(0.5),
                encoder_hidden_states=torch.randn(1, 1, 32, generator=g).to(dtype),
                added_time_ids=torch.tensor([[6.0, 127.0, 0.02]], dtype=dtype))


def fresh_unet(dtype=torch.float32):
    torch.manual_seed(0)
    return tiny_unet().to(dtype).eval()


@torch.no_grad()
def test_unet_output_on_cpu_is_bit_identical_when_wrapped():
    unet = fresh_unet()
    expected = unet(**unet_inputs()).sample
    assert apply_bounded_attention(unet) == len(unet.attn_processors) == 24
    assert all(isinstance(p, BoundedAttnProcessor) for p in unet.attn_processors.values())
    assert torch.equal(unet(**unet_inputs()).sample, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@torch.no_grad()
def test_unet_split_in_pieces_equals_the_whole(dtype, monkeypatch):
    # 30 kB: every attention is split (spatial: batch 3 -> 3 pieces; temporal: batch 256 of 3 frames -> 5 to 10)
    unet = fresh_unet(dtype)
    expected = unet(**unet_inputs(dtype)).sample
    apply_bounded_attention(unet, budget_bytes=30_000, force_split=True)
    batches = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: batches.append(q.shape[0]) or
                        sdpa(q, *a, **k))
    got = unet(**unet_inputs(dtype)).sample
    assert len(batches) >= 3 * 24 and max(batches) < 256  # each of the 24 attentions in 3 pieces or more
    assert close(got, expected, dtype)


@torch.no_grad()
def test_apply_is_idempotent_and_removable():
    unet = fresh_unet()
    originals = dict(unet.attn_processors)
    expected = unet(**unet_inputs()).sample
    assert apply_bounded_attention(unet) == 24
    assert apply_bounded_attention(unet, budget_bytes=12345) == 24
    wrapped = unet.attn_processors
    assert all(p.processor is originals[name] and p.budget_bytes == 12345 for name, p in wrapped.items())
    assert len({id(p.seen) for p in wrapped.values()}) == 1  # one warning per call shape for the whole model
    assert torch.equal(unet(**unet_inputs()).sample, expected)
    assert remove_bounded_attention(unet) == 24
    assert all(p is originals[name] for name, p in unet.attn_processors.items())
    assert remove_bounded_attention(unet) == 0


def test_other_processors_are_left_alone():
    unet = fresh_unet()

    class Custom(AttnProcessor2_0):  # a subclass may compute something else: not ours to wrap
        pass

    names = list(unet.attn_processors)
    others = {names[0]: AttnProcessor(), names[5]: Custom()}
    unet.set_attn_processor({name: others.get(name, p) for name, p in unet.attn_processors.items()})
    assert apply_bounded_attention(unet) == 22
    after = unet.attn_processors
    assert all(after[name] is processor for name, processor in others.items())
    assert remove_bounded_attention(unet) == 22
    assert all(unet.attn_processors[name] is processor for name, processor in others.items())
