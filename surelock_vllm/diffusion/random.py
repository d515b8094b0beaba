"""Counter-based random numbers: one stream per request, drawn in any batch.

LLaDA's sampler draws Gumbel noise (temperature > 0) and, for `random`
remasking, one score per masked row. A stateful generator per request would
tie the numbers to the order of draws, so a batched step would have to loop
over requests. Here every number is a hash of (request seed, step, canvas
position, vocabulary index, stream): the same value whichever batch computes
it, on any device, with no state to carry. The plain-torch samplers use the
same function, so sampled runs compare token for token.

The hash is Chris Wellons' `lowbias32` integer mixer, in int64 arithmetic kept
below 2**63 (32-bit products are split in 16-bit halves), so it is exact and
identical on CPU and CUDA.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF

#: stream ids: what a number is used for
GUMBEL = 1
REMASK_SCORE = 2


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32), with every intermediate below 2**49."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, stream: int) -> torch.Tensor:
    """One 32-bit key per row from (seed, step, position, stream); int64 tensors."""
    seed = seed.to(torch.int64)
    key = _mix32((seed & _M32) ^ stream)
    key = _mix32(key ^ ((seed >> 32) & _M32))
    key = _mix32(key ^ (step.to(torch.int64) & _M32))
    return _mix32(key ^ (position.to(torch.int64) & _M32))


def _to_unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit integers to float64 in (0, 1): never 0, so -log(u) is finite."""
    return (h.to(torch.float64) + 0.5) * (1.0 / 2**32)


def uniform_rows(seed, step, position, stream: int) -> torch.Tensor:
    """One uniform number per row: [rows] float64."""
    return _to_unit(_mix32(row_keys(seed, step, position, stream)))


def uniform_matrix(seed, step, position, num_cols: int, stream: int) -> torch.Tensor:
    """A row of `num_cols` uniform numbers per row: [rows, num_cols] float64."""
    keys = row_keys(seed, step, position, stream)
    cols = _mix32(torch.arange(num_cols, device=keys.device, dtype=torch.int64) ^ 0x9E3779B9)
    return _to_unit(_mix32(keys[:, None] ^ cols[None, :]))


def request_seed(seed: int) -> int:
    """A request's seed as the 64-bit pattern the hash consumes (int64 range)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed
