"""vLLM's CPU linear layers at row counts that change every step.

vLLM's CPU linear layers (`dispatch_cpu_unquantized_gemm`, its oneDNN branch)
build a oneDNN matmul primitive per row count. The primitives are kept in an
LRU of 32 per weight shape (all layers with the same in/out features share
one), each holding about 160-290 KB here. A no-lock step computes the same
rows at every step of a batch, so its primitives are built once. A SureLock
step's row count changes at nearly every step (rows lock): in a batch-8,
gen-256 run on the d_model-256 checkpoint all 256 steps had a row count of
their own, so every step built a new primitive for each of the body's four
weight shapes and the LM head's. Building one costs about 0.5-1 ms on this
CPU: a call on a new row count took 0.6-0.9 ms for 140 rows of the
vocabulary-262 head (0.13-0.17 ms cached) and 2.3-3.3 ms for about 1,000 rows
of a 256 x 768 projection (1.9 ms cached).

`RowBucketedLinear` runs a layer on row counts from a small set: the rows in
whole chunks of `CHUNK_ROWS` (one oneDNN call), then the last rows rounded up
to a multiple of `TAIL_ROWS` (a second call over a window that ends at the
last row and overlaps the chunks by less than `TAIL_ROWS` rows); both write
straight into the output. Only a call of fewer rows than its tail bucket
goes through a padded copy. Every call is bucketed, a
repeated row count too, so a layer only ever sees the `TAIL_ROWS` multiples up
to `CHUNK_ROWS` and the `CHUNK_ROWS` multiples up to the step's rows.
`bucket_linear_rows` builds those primitives when the model loads (as many as
fit in the 32), so that a server's memory does not grow while requests first
reach each bucket: with the buckets built lazily, and a repeated row count
passed through unbucketed, the soak test's worker heap grew by 4.5 KB a
request over 800 requests (the shared LRUs filling up, 160-290 KB an entry),
where unbucketed layers fill theirs within the first steps. Each row's output is
the same matmul of the same inputs (`tests/test_cpu_linear.py` checks it is
bit-identical); the engine tests check tokens against the plain-torch
reference with it in place.

The LM head is left alone: at a 126k vocabulary a second call re-reads its
129 MB of weights, which costs more than the primitives it saves (SureLock's
step was 11% slower in the engine with the head bucketed too).

Which layers: those whose `cpu_linear` is vLLM's oneDNN closure
(`onednn_handler`); the sgl-kernel and torch fallbacks are left alone. The
closure and `torch.ops._C.onednn_mm` are listed in `vllm_internals.py`.
"""

from __future__ import annotations

import torch

from surelock_vllm.log import get_logger

logger = get_logger(__name__)

CHUNK_ROWS = 128
TAIL_ROWS = 16
# vLLM's per-weight-shape LRU of oneDNN primitives (`create_onednn_mm(..., 32)`)
PRIMITIVES_PER_SHAPE = 32


def onednn_handler(layer: torch.nn.Module):
    """The oneDNN handler vLLM's CPU dispatch closed `layer.cpu_linear` over, or None."""
    from vllm._custom_ops import CPUDNNLGEMMHandler

    for cell in getattr(getattr(layer, "cpu_linear", None), "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, CPUDNNLGEMMHandler):
            return value
    return None


def bucket_row_counts(max_rows: int) -> list[int]:
    """The row counts a bucketed layer calls oneDNN with for steps of up to `max_rows` rows,
    smallest first, as many as fit in a weight shape's primitive LRU."""
    tails = list(range(TAIL_ROWS, CHUNK_ROWS + 1, TAIL_ROWS))
    chunks = list(range(2 * CHUNK_ROWS, max(max_rows, 0) + 1, CHUNK_ROWS))
    return (tails + chunks)[:PRIMITIVES_PER_SHAPE]


class RowBucketedLinear:
    """A layer's `cpu_linear`: oneDNN on whole chunks of rows plus a padded tail."""

    def __init__(self, handler):
        self.handler = handler

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        h = self.handler
        rows = x.numel() // h.k
        leading = x.shape[:-1]
        x = x.reshape(rows, h.k)
        out = torch.empty((rows, h.n), dtype=x.dtype, device=x.device)
        whole = rows - rows % CHUNK_ROWS
        if whole:
            torch.ops._C.onednn_mm(out[:whole], x[:whole], bias, h.handler_tensor)
        tail = rows - whole
        if tail:
            window = -(-tail // TAIL_ROWS) * TAIL_ROWS
            if window <= rows:
                # the last `window` rows, some of them the chunks' again: the
                # same matmul of the same row gives the same values, written
                # straight into the output
                torch.ops._C.onednn_mm(out[rows - window:], x[rows - window:], bias, h.handler_tensor)
            else:  # fewer rows than one tail bucket: through a padded copy
                padded = x.new_zeros((window, h.k))
                padded[:rows] = x
                result = torch.empty((window, h.n), dtype=x.dtype, device=x.device)
                torch.ops._C.onednn_mm(result, padded, bias, h.handler_tensor)
                out.copy_(result[:rows])
        return out.view(*leading, h.n)

    def build_primitives(self, row_counts: list[int], bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        """Have oneDNN build (and cache) the primitive of each row count now."""
        h = self.handler
        for rows in row_counts:
            torch.ops._C.onednn_mm(torch.empty((rows, h.n), dtype=dtype), torch.zeros((rows, h.k), dtype=dtype),
                                   bias, h.handler_tensor)


def bucket_linear_rows(model: torch.nn.Module, max_rows: int) -> int:
    """Install `RowBucketedLinear` on the model's oneDNN linear layers (not the LM head)
    and build their primitives for steps of up to `max_rows` rows; how many layers."""
    from vllm.model_executor.layers.linear import LinearBase

    count = 0
    built: set[tuple] = set()
    row_counts = bucket_row_counts(max_rows)
    for module in model.modules():
        if not isinstance(module, LinearBase) or isinstance(getattr(module, "cpu_linear", None), RowBucketedLinear):
            continue
        handler = onednn_handler(module)
        if handler is None:
            continue
        module.cpu_linear = bucketed = RowBucketedLinear(handler)
        bias = getattr(module, "bias", None)
        dtype = module.params_dtype if hasattr(module, "params_dtype") else torch.get_default_dtype()
        shape = (handler.k, handler.n, bias is not None, dtype)
        if shape not in built:  # layers of one weight shape share their primitives
            bucketed.build_primitives(row_counts, bias, dtype)
            built.add(shape)
        count += 1
    logger.info("oneDNN linear layers on bucketed row counts: %d (%d row counts built for each of %d weight shapes)",
                count, len(row_counts), len(built))
    return count
