"""Core attention kernels agree; masks; incremental decoding with the KV cache.

Runs on one gloo rank (the modules resolve their tensor-parallel group). The two kernels
(torch SDPA and the explicit path) sum in different orders: fp32 tolerance 1e-5.
"""

import pytest
import torch

from megacore import device
from megacore import parallel_state as ps
from megacore.models.gpt import GPTModel, get_llama_layer_local_spec, llama_config_kwargs
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import (
    AttnBackend,
    AttnMaskType,
    DotProductAttention,
    StaticInferenceContext,
    TransformerConfig,
)
from tests.multirank import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)


def _config(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, attention_dropout=0.0,
                hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _naive(q, k, v, mask):
    """softmax(q k^T / sqrt(d) masked) v with per-head loops; q [s, b, n, d]."""
    groups = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("qbnd,kbnd->bnqk", q, k) / q.size(-1) ** 0.5
    scores = scores.masked_fill(mask, float("-inf"))
    out = torch.einsum("bnqk,kbnd->qbnd", scores.softmax(-1), v)
    return out.reshape(q.size(0), q.size(1), -1)


def _core_attention_cases():
    ps.initialize_model_parallel()
    g = torch.Generator().manual_seed(0)
    dev = device.current_device()
    for ng in (4, 2, 1):
        q = torch.randn(6, 2, 4, 8, generator=g).to(dev)
        k = torch.randn(6, 2, ng, 8, generator=g).to(dev)
        v = torch.randn(6, 2, ng, 8, generator=g).to(dev)
        causal = torch.ones(6, 6, dtype=torch.bool, device=dev).triu(1)
        padding = torch.zeros(2, 1, 6, 6, dtype=torch.bool, device=dev)
        padding[1, ..., 4:] = True  # batch row 1: the last two keys are padding
        expected = {AttnMaskType.causal: _naive(q, k, v, causal),
                    AttnMaskType.padding: _naive(q, k, v, padding),
                    AttnMaskType.padding_causal: _naive(q, k, v, padding | causal)}
        for backend in (AttnBackend.auto, AttnBackend.unfused):
            for scaling in (False, True):
                cfg = _config(num_query_groups=ng, kv_channels=8, attention_backend=backend,
                              apply_query_key_layer_scaling=scaling)
                attn = DotProductAttention(cfg, layer_number=3)
                for mask_type, want in expected.items():
                    got = attn(q, k, v, padding, attn_mask_type=mask_type)
                    torch.testing.assert_close(got, want, **TOL,
                                               msg=f"{backend} ng={ng} {mask_type}")
        # Decoding: the last 2 queries against all 6 keys (bottom-right aligned causal).
        for backend in (AttnBackend.auto, AttnBackend.unfused):
            attn = DotProductAttention(_config(num_query_groups=ng, attention_backend=backend),
                                       layer_number=1)
            got = attn(q[4:], k, v, None)
            torch.testing.assert_close(got, expected[AttnMaskType.causal][4:], **TOL)
        _check_sliding_window(q, k, v, ng)
    return True


def _check_sliding_window(q, k, v, ng):
    """window (2, 0): query i sees keys i-2 .. i, in the prefill and when decoding the
    last 1 or 2 queries against all 6 keys; (1, 1) is a symmetric band (no mask type)."""
    pos = torch.arange(6, device=q.device)
    offset = pos.view(1, 6) - pos.view(6, 1)  # key - query
    bands = {(2, 0): (offset > 0) | (offset < -2), (1, 1): offset.abs() > 1}
    for backend in (AttnBackend.auto, AttnBackend.unfused):
        for window, outside in bands.items():
            attn = DotProductAttention(_config(num_query_groups=ng, attention_backend=backend,
                                               window_size=window), layer_number=1)
            mask_type = AttnMaskType.causal if window[1] == 0 else AttnMaskType.no_mask
            want = _naive(q, k, v, outside)
            for first in (0, 4, 5):  # prefill, then 2 and 1 decode queries
                got = attn(q[first:], k, v, None, attn_mask_type=mask_type)
                torch.testing.assert_close(got, want[first:], **TOL,
                                           msg=f"{backend} ng={ng} window {window} q{first}:")


def test_core_attention_kernels_and_masks():
    assert run_distributed(_core_attention_cases, 1) == [True]


def _decode_with_cache(window_size=None):
    ps.initialize_model_parallel()
    cfg = _config(**llama_config_kwargs(num_query_groups=2), window_size=window_size)
    model_parallel_manual_seed(3)
    model = GPTModel(cfg, get_llama_layer_local_spec(), 40, 16, position_embedding_type="rope",
                     rope_scaling=window_size is not None,
                     rope_scaling_original_max_position_embeddings=8).eval()
    dev = device.current_device()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1)).to(dev)
    pos = torch.arange(7, device=dev).expand(2, 7)
    with torch.no_grad():
        full = model(ids, pos, None)  # [b, s, V]
        ctx = StaticInferenceContext(max_batch_size=2, max_sequence_length=16)
        steps = [model(ids[:, :4], pos[:, :4], None, inference_context=ctx)]
        for t in range(4, 7):
            ctx.sequence_len_offset = t
            steps.append(model(ids[:, t:t + 1], None, None, inference_context=ctx))
    return full.cpu(), torch.cat(steps, dim=1).cpu()


def test_kv_cache_decoding_matches_full_forward():
    full, incremental = run_distributed(_decode_with_cache, 1)[0]
    torch.testing.assert_close(incremental, full, **TOL)


def test_kv_cache_decoding_with_sliding_window_and_rope_scaling():
    # 7 tokens, window (2, 0): every decode step's query has keys outside the window.
    (full, incremental), (unwindowed, _) = [
        run_distributed(_decode_with_cache, 1, args=(w,))[0] for w in ((2, 0), None)]
    torch.testing.assert_close(incremental, full, **TOL)
    assert not torch.allclose(full[:, 3:], unwindowed[:, 3:], atol=1e-3)  # the window matters


def test_sliding_window_config_errors():
    with pytest.raises(ValueError, match=r"window_size \(3, 0\).*context_parallel_size 2"):
        _config(window_size=(3, 0), context_parallel_size=2)
    with pytest.raises(ValueError, match="window_size must be a pair"):
        _config(window_size=(3,))
    assert _config(window_size=[3, 0]).window_size == (3, 0)
