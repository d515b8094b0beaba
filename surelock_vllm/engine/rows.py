"""The row layout of one diffusion step, in plain torch (no vLLM import).

A step computes, for each scheduled request, a list of canvas rows (query
positions). Their K/V go to their own slots of the request's paged KV blocks;
their queries attend non-causally over the request's whole canvas. This module
turns "request -> rows, blocks" into the flat tensors every attention kernel
takes: token ids, positions, slot mapping, query start offsets, sequence
lengths and a block table. The CPU and CUDA paths use the same layout; only
the kernel that consumes it differs.

A platform may run the model on more rows than the step computes
(`RecentRowCounts`, `pad_rows`): padded rows read token 0 at position 0,
write no K/V (slot `PAD_SLOT_ID`) and are not attention queries
(`num_actual_tokens` counts the step's rows only), so they change nothing
the step reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# vLLM's "no slot" value: its KV writers skip these rows
# (vllm.v1.attention.backends.utils.PAD_SLOT_ID; checked in tests/test_vllm_internals.py).
PAD_SLOT_ID = -1


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


class RecentRowCounts:
    """The row count a step's model runs at: a recently used one, if close enough.

    Why: vLLM's CPU linear layers (oneDNN) build a matmul primitive for each
    new row count and keep the last 32 per layer. No-lock repeats its count
    (whole canvases), but SureLock's count changes almost every step, and a
    new count cost 1.3 to 2.1 ms per linear layer at a d_model-256 LLaDA's
    shapes on this CPU (16 linear layers: about 20 ms of a 130 ms step).
    Padding a step to a count used in the last `capacity` steps, at most
    `max_padding` more rows, makes most of those builds cache hits; a count
    that repeats is never padded. `capacity` stays below oneDNN's 32 so the
    count picked is still cached.
    """

    def __init__(self, max_padding: float, capacity: int = 16):
        if not 0 <= max_padding <= 1 or capacity < 1:
            raise ValueError(f"max_padding must be in [0, 1] and capacity >= 1, got {max_padding}, {capacity}")
        self.max_padding = max_padding
        self.capacity = capacity
        self._recent: list[int] = []  # least recently used first

    def __call__(self, num_rows: int) -> int:
        limit = num_rows + int(num_rows * self.max_padding)
        fits = [count for count in self._recent if num_rows <= count <= limit]
        count = min(fits) if fits else num_rows
        if fits:
            self._recent.remove(count)
        self._recent.append(count)
        del self._recent[: -self.capacity]
        return count


def pad_rows(
    input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, num_input_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's rows followed by padding rows up to `num_input_rows` (see the module docstring)."""
    pad = num_input_rows - input_ids.shape[0]
    if pad < 0:
        raise ValueError(f"cannot pad {input_ids.shape[0]} rows to {num_input_rows}")
    if pad == 0:
        return input_ids, positions, slot_mapping
    return (
        F.pad(input_ids, (0, pad)),
        F.pad(positions, (0, pad)),
        F.pad(slot_mapping, (0, pad), value=PAD_SLOT_ID),
    )
