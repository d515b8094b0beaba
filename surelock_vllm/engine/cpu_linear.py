"""vLLM's CPU linear layers at row counts that change every step.

vLLM's CPU linear layers (`dispatch_cpu_unquantized_gemm`, its oneDNN branch)
build a oneDNN matmul primitive per row count and keep the last 32 in each
layer. A no-lock step computes the same rows at every step of a batch, so its
primitives are built once. A SureLock step's row count changes at nearly every
step (rows lock): in a batch-8, gen-256 run on the d_model-256 checkpoint, all
256 steps had a row count of their own, so every step built a new primitive in
each of the 16 linear layers (about 0.4 ms each on this CPU).

`RowBucketedLinear` runs such a layer on row counts from a small set: the rows
in whole chunks of `CHUNK_ROWS` (one oneDNN call, written straight into the
output) and the rest padded up to a multiple of `TAIL_ROWS` (a second call,
through a copy of at most `CHUNK_ROWS` rows). A layer then sees at most
max_rows / CHUNK_ROWS + CHUNK_ROWS / TAIL_ROWS row counts: within its 32
primitives for steps of up to about 3,000 rows. A call with the same row count as the layer's
previous call (no-lock's steady state) runs unchanged. Each row's output is the
same matmul of the same inputs; the engine tests check tokens against the
plain-torch reference with it in place.

Measured (replaying the row counts of one SureLock and one no-lock run through
the 16 linear layers of the d_model-256 body, 2 threads, three alternations):
SureLock's linear layers 34.2 vs 35.5 ms a step, no-lock's 71.7 vs 72.0. The
LM head is left alone: at a 126k vocabulary a second call re-reads its 129 MB
of weights, which costs more than the primitives it saves (SureLock's step was
11% slower in the engine with the head bucketed too).

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


class RowBucketedLinear:
    """A layer's `cpu_linear`: oneDNN on whole chunks of rows plus a padded tail."""

    def __init__(self, handler, plain):
        self.handler = handler
        self.plain = plain  # vLLM's closure, for a repeated row count
        self.last_rows = -1

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        h = self.handler
        rows = x.numel() // h.k
        repeated, self.last_rows = rows == self.last_rows, rows
        if repeated or rows <= TAIL_ROWS:
            return self.plain(x, weight, bias)
        leading = x.shape[:-1]
        x = x.reshape(rows, h.k)
        out = torch.empty((rows, h.n), dtype=x.dtype, device=x.device)
        whole = rows - rows % CHUNK_ROWS
        if whole:
            torch.ops._C.onednn_mm(out[:whole], x[:whole], bias, h.handler_tensor)
        tail = rows - whole
        if tail:
            padded_rows = -(-tail // TAIL_ROWS) * TAIL_ROWS
            if padded_rows == tail:
                torch.ops._C.onednn_mm(out[whole:], x[whole:], bias, h.handler_tensor)
            else:
                padded = x.new_zeros((padded_rows, h.k))
                padded[:tail] = x[whole:]
                result = torch.empty((padded_rows, h.n), dtype=x.dtype, device=x.device)
                torch.ops._C.onednn_mm(result, padded, bias, h.handler_tensor)
                out[whole:] = result[:tail]
        return out.view(*leading, h.n)


def bucket_linear_rows(model: torch.nn.Module) -> int:
    """Install `RowBucketedLinear` on the model's oneDNN linear layers (not the LM head); how many."""
    from vllm.model_executor.layers.linear import LinearBase

    count = 0
    for module in model.modules():
        if not isinstance(module, LinearBase) or isinstance(getattr(module, "cpu_linear", None), RowBucketedLinear):
            continue
        handler = onednn_handler(module)
        if handler is None:
            continue
        module.cpu_linear = RowBucketedLinear(handler, module.cpu_linear)
        count += 1
    logger.info("oneDNN linear layers on bucketed row counts: %d", count)
    return count
