"""The CPU attention path that reads paged K/V contiguously, against vLLM's CPU_ATTN kernel.

No engine: one layer's cache written by vLLM's own writer, read back by
`gather_kv`, and both kernels run on the same scattered, non-causal rows.
"""

from __future__ import annotations

import pytest
import torch
from vllm import _custom_ops as ops

from surelock_vllm.engine.attention_cpu import (
    CONTIGUOUS_ISA,
    SureLockCPUAttentionMetadata,
    contiguous_attention,
    gather_kv,
)
from surelock_vllm.engine.rows import padded_rows_layout

BLOCK = 32


def _paged_cache(canvas_lens, heads, dim, dtype, seed=0, fill=float("nan")):
    """A cache filled with `fill`, each sequence's K/V written to shuffled blocks by vLLM's writer."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // BLOCK) for n in canvas_lens]
    num_blocks = sum(blocks_per_seq) + 3
    cache = torch.full((num_blocks, heads, BLOCK, 2 * dim), fill, dtype=dtype)
    order = torch.randperm(num_blocks, generator=gen)
    width = max(blocks_per_seq)
    table = torch.zeros((len(canvas_lens), width), dtype=torch.int32)
    keys, values, start = [], [], 0
    for i, (n, nb) in enumerate(zip(canvas_lens, blocks_per_seq)):
        table[i, :nb] = order[start : start + nb]
        start += nb
        keys.append(torch.randn((n, heads, dim), generator=gen).to(dtype))
        values.append(torch.randn((n, heads, dim), generator=gen).to(dtype))
    slots = torch.cat([
        table[i, torch.arange(n) // BLOCK].long() * BLOCK + torch.arange(n) % BLOCK for i, n in enumerate(canvas_lens)
    ])
    view = cache.view(num_blocks, heads, 2 * BLOCK, dim)
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        torch.cat(keys), torch.cat(values), key_cache, value_cache, slots, CONTIGUOUS_ISA,
        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )
    return cache, table, keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_kv_reads_what_vllms_writer_wrote(dtype):
    lens = [70, 33, 64]
    cache, table, keys, values = _paged_cache(lens, heads=4, dim=32, dtype=dtype)
    k, v = gather_kv(cache, table.long(), max(lens))
    for i, n in enumerate(lens):
        assert torch.equal(k[i, :, :n], keys[i].transpose(0, 1))
        assert torch.equal(v[i, :, :n], values[i].transpose(0, 1))


def _metadata(cache, table, canvas_lens, query_lens):
    """The metadata `SureLockCPUMetadataBuilder.build` makes, from the same `padded_rows_layout`."""
    query_start = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(canvas_lens, dtype=torch.int32)
    max_q, max_len = max(query_lens), max(canvas_lens)
    rows, mask = padded_rows_layout(query_start, seq_lens, max_q, max_len)
    return SureLockCPUAttentionMetadata(
        num_actual_tokens=int(query_start[-1]), max_query_len=max_q, query_start_loc=query_start,
        max_seq_len=max_len, seq_lens=seq_lens, block_table=table, slot_mapping=torch.zeros(0, dtype=torch.long),
        scheduler_metadata=None, causal=False,
        kv_blocks=table[:, : -(-max_len // BLOCK)].long(), query_rows=rows, key_mask=mask,
    )


def test_padded_rows_layout():
    # three sequences: 2, 4 and 1 computed rows of canvases 5, 7 and 6 keys long
    rows, mask = padded_rows_layout(torch.tensor([0, 2, 6, 7]), torch.tensor([5, 7, 6]), 4, 7)
    assert rows.tolist() == [0, 1, 4, 5, 6, 7, 8]
    assert mask.shape == (3, 1, 1, 7)
    assert mask[:, 0, 0].sum(-1).tolist() == [5, 7, 6]
    assert mask[0, 0, 0].tolist() == [True] * 5 + [False] * 2
    # whole canvases of one length: nothing to pad or mask
    assert padded_rows_layout(torch.tensor([0, 3, 6]), torch.tensor([3, 3]), 3, 3) == (None, None)


def _vllm_kernel(query, cache, meta, heads, dim, scale):
    num_blocks = cache.shape[0]
    key_cache, value_cache = cache.view(num_blocks, heads, 2 * BLOCK, dim).chunk(2, dim=2)
    scheduler = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=meta.seq_lens.shape[0], num_heads=heads, num_kv_heads=heads, head_dim=dim, seq_lens=meta.seq_lens,
        dtype=query.dtype, query_start_loc=meta.query_start_loc, causal=False, sliding_window_size=-1,
        isa=CONTIGUOUS_ISA, enable_kv_split=False, dynamic_causal=None, kv_cache_dtype="auto",
    )
    out = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens, scale=scale, causal=False,
        alibi_slopes=None, sliding_window=-1, block_table=meta.block_table, softcap=0,
        scheduler_metadata=scheduler, s_aux=None, dynamic_causal=None, k_scale=1.0, v_scale=1.0,
        kv_cache_dtype="auto",
    )
    return out


@pytest.mark.parametrize(
    "canvas_lens,query_lens",
    [
        ([96, 96, 96], [96, 96, 96]),  # no-lock: whole canvases, nothing padded or masked
        ([90, 41, 128], [7, 41, 60]),  # SureLock: scattered rows, canvases of different lengths
        ([50], [1]),
    ],
)
def test_contiguous_attention_matches_vllms_kernel(canvas_lens, query_lens):
    heads, dim = 4, 32
    query = torch.randn((sum(query_lens), heads, dim), generator=torch.Generator().manual_seed(2))
    # slots no sequence wrote hold another request's K/V: large values that must not leak in
    cache, table, _, _ = _paged_cache(canvas_lens, heads, dim, torch.float32, seed=1, fill=1e3)
    meta = _metadata(cache, table, canvas_lens, query_lens)
    theirs = _vllm_kernel(query, cache, meta, heads, dim, dim**-0.5)
    ours = contiguous_attention(query, cache, meta, dim**-0.5)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and it is attention over the canvas: one row by hand
    k, v = gather_kv(cache, meta.kv_blocks, meta.max_seq_len)
    last = len(canvas_lens) - 1
    row = query[-1]
    n = canvas_lens[last]
    weights = torch.softmax((row[:, None, :] * k[last, :, :n]).sum(-1) * dim**-0.5, dim=-1)
    torch.testing.assert_close(ours[-1], (weights[:, :, None] * v[last, :, :n]).sum(1), rtol=1e-5, atol=1e-5)
