"""The row layout of one diffusion step, in plain torch (no vLLM import).

A step computes, for each scheduled request, a list of canvas rows (query
positions). Their K/V go to their own slots of the request's paged KV blocks;
their queries attend non-causally over the request's whole canvas. This module
turns "request -> rows, blocks" into the flat tensors every attention kernel
takes: token ids, positions, slot mapping, query start offsets, sequence
lengths and a block table. The CPU and CUDA paths use the same layout; only
the kernel that consumes it differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RequestRows:
    """One request's part of a step."""

    canvas: torch.Tensor  # [canvas_len] token ids, masks included
    query_positions: torch.Tensor  # [rows] canvas positions computed this step
    logit_positions: torch.Tensor  # [k] positions whose logits the step reads
    block_ids: list[int]  # the request's KV blocks, in canvas order


@dataclass
class StepLayout:
    input_ids: torch.Tensor  # [num_rows]
    positions: torch.Tensor  # [num_rows]
    slot_mapping: torch.Tensor  # [num_rows]
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32, full canvas lengths
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    logit_rows: torch.Tensor  # [num_logits] indices into the flat rows
    max_query_len: int
    max_seq_len: int

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])


def slot_mapping_for(positions: torch.Tensor, block_ids: list[int], block_size: int) -> torch.Tensor:
    """KV slot of each canvas position: block_ids[pos // bs] * bs + pos % bs."""
    blocks = torch.tensor(block_ids, dtype=torch.long)
    return blocks[positions // block_size] * block_size + positions % block_size


def build_step_layout(requests: list[RequestRows], block_size: int) -> StepLayout:
    input_ids, positions, slots, logit_rows = [], [], [], []
    query_start = [0]
    seq_lens = []
    max_blocks = max(len(r.block_ids) for r in requests)
    block_table = torch.zeros((len(requests), max_blocks), dtype=torch.int32)
    for i, req in enumerate(requests):
        canvas_len = req.canvas.shape[0]
        if len(req.block_ids) * block_size < canvas_len:
            raise ValueError(
                f"request has {len(req.block_ids)} KV blocks of {block_size} "
                f"slots for a canvas of {canvas_len}"
            )
        q = req.query_positions
        blocks = torch.tensor(req.block_ids, dtype=torch.long)
        input_ids.append(req.canvas[q])
        positions.append(q)
        slots.append(blocks[q // block_size] * block_size + q % block_size)
        # Row index (within this step's flat rows) of each logit position;
        # both position lists are ascending.
        local = torch.searchsorted(q, req.logit_positions)
        if local.numel() and (int(local[-1]) >= q.shape[0] or not torch.equal(q[local], req.logit_positions)):
            raise ValueError("a logit position is not among the query rows")
        logit_rows.append(local + query_start[-1])
        query_start.append(query_start[-1] + q.shape[0])
        seq_lens.append(canvas_len)
        block_table[i, : len(req.block_ids)] = blocks
    query_lens = [b - a for a, b in zip(query_start, query_start[1:])]
    return StepLayout(
        input_ids=torch.cat(input_ids),
        positions=torch.cat(positions),
        slot_mapping=torch.cat(slots),
        query_start_loc=torch.tensor(query_start, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=block_table,
        logit_rows=torch.cat(logit_rows),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )


def padded_rows_layout(
    query_start: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, max_seq_len: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Where each computed row sits in a padded query batch, and which keys each sequence has.

    Kernels that take one query tensor per batch (torch's
    `scaled_dot_product_attention`) pad every sequence's rows to the longest.
    `query_start` [seqs + 1] and `seq_lens` [seqs] (host tensors: the
    padding is decided on the host) give each sequence's rows and canvas
    length. Returns `query_rows` [tokens] (row `t`'s index in
    `[seqs * max_query_len]`; None when every sequence has `max_query_len`
    rows) and `key_mask` [seqs, 1, 1, max_seq_len] (None when every canvas is
    `max_seq_len` long), on the host.
    """
    query_start, seq_lens = query_start.long(), seq_lens.long()
    query_lens = query_start[1:] - query_start[:-1]
    seqs = query_lens.shape[0]
    query_rows = key_mask = None
    if seqs and int(query_lens.min()) != max_query_len:
        seq_of_row = torch.repeat_interleave(torch.arange(seqs), query_lens)
        query_rows = torch.arange(int(query_start[-1])) - query_start[seq_of_row] + seq_of_row * max_query_len
    if seqs and int(seq_lens.min()) != max_seq_len:
        key_mask = (torch.arange(max_seq_len) < seq_lens[:, None])[:, None, None, :]
    return query_rows, key_mask
