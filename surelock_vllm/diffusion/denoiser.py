"""One request's canvas and LLaDA's unmasking rule, one step at a time.

The vLLM executor keeps one `CanvasDenoiser` per request. Each diffusion step
it asks the denoiser which canvas rows to run through the transformer
(`query_positions`) and which rows' logits the step needs (`logit_positions`),
runs the model on exactly those rows, and hands the logits back to `step`.
Without locking every canvas row is a query row; SureLock shrinks that list.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surelock_vllm.diffusion.options import DiffusionOptions
from surelock_vllm.diffusion.surelock import LockState, SureLockOptions


def transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """How many positions each step unmasks: an even split, earlier steps +1."""
    base, remainder = divmod(num_masked, steps)
    return [base + 1 if i < remainder else base for i in range(steps)]


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """LLaDA's sampling: argmax at T=0, Gumbel-max on float64 logits above."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    return (logits.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)


class CanvasDenoiser:
    """`prompt + gen_length` masks, denoised block by block.

    Random numbers come from a generator seeded per request, drawn for the
    still-masked rows of the current block in position order (the same
    convention as `surelock_vllm.reference.sampler`).
    """

    def __init__(
        self,
        prompt_ids: list[int],
        options: DiffusionOptions,
        mask_id: int,
        seed: int,
        surelock: SureLockOptions | None = None,
    ):
        self.options = options
        self.mask_id = mask_id
        self.prompt_len = len(prompt_ids)
        self.canvas = torch.full(
            (self.prompt_len + options.gen_length,), mask_id, dtype=torch.long
        )
        self.canvas[: self.prompt_len] = torch.tensor(prompt_ids, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)
        self.block = 0
        self.step_in_block = 0
        self.num_steps_done = 0
        self._schedule = transfer_schedule(options.block_length, options.steps_per_block)
        # Without locking there is no lock state at all: the no-lock path is
        # the plain LLaDA sampler, untouched.
        self.lock = (
            LockState(self.canvas_len, self.prompt_len, surelock)
            if surelock is not None and surelock.enabled
            else None
        )

    # -- geometry ---------------------------------------------------------
    @property
    def canvas_len(self) -> int:
        return self.canvas.shape[0]

    @property
    def finished(self) -> bool:
        return self.block >= self.options.num_blocks

    def block_bounds(self, block: int | None = None) -> tuple[int, int]:
        block = self.block if block is None else block
        start = self.prompt_len + block * self.options.block_length
        return start, start + self.options.block_length

    # -- what the next step needs -------------------------------------------
    def query_positions(self) -> torch.Tensor:
        """Canvas rows the transformer computes this step: the unlocked ones."""
        if self.lock is None:
            return torch.arange(self.canvas_len)
        return (~self.lock.locked).nonzero().squeeze(-1)

    def _block_masked(self) -> torch.Tensor:
        start, end = self.block_bounds()
        rows = torch.zeros(self.canvas_len, dtype=torch.bool)
        rows[start:end] = self.canvas[start:end] == self.mask_id
        return rows

    def logit_positions(self) -> torch.Tensor:
        """Rows whose logits this step reads: the current block's masked rows
        (to unmask) and, with locking, the lock candidates Z (to test)."""
        rows = self._block_masked()
        if self.lock is not None:
            rows |= self.lock.candidates(self.canvas == self.mask_id)
        return rows.nonzero().squeeze(-1)

    # -- one step -------------------------------------------------------------
    def step(self, logits: torch.Tensor, logp: torch.Tensor | None = None) -> list[int] | None:
        """Unmask this step's positions, given logits of `logit_positions()`
        (and optionally their log-softmax, for the lock test).

        Returns the block's final tokens when this step completes a block,
        else None.
        """
        assert not self.finished, "denoiser already finished"
        positions = self.logit_positions()
        assert logits.shape[0] == positions.shape[0], (logits.shape, positions.shape)
        if self.lock is not None:
            # Z as it stood during the forward pass, before this step unmasks.
            lock_candidates = self.lock.candidates(self.canvas == self.mask_id)
            all_logits, all_positions = logits, positions
            sampled_rows = self._block_masked()[positions]
            logits, positions = logits[sampled_rows], positions[sampled_rows]
        k = self._schedule[self.step_in_block]
        if positions.numel() > 0:
            # Draw even when k == 0 so the random stream matches the reference.
            x0 = gumbel_argmax(logits, self.options.temperature, self.generator)
            if self.options.remasking == "low_confidence":
                probs = F.softmax(logits.float(), dim=-1)
                confidence = torch.gather(probs, -1, x0[:, None]).squeeze(-1)
            else:
                confidence = torch.rand(x0.shape, generator=self.generator)
            if k > 0:
                _, chosen = torch.topk(confidence.to(torch.float64), k=k)
                self.canvas[positions[chosen]] = x0[chosen]
        if self.lock is not None:
            self.lock.observe(all_positions, all_logits, lock_candidates, self.num_steps_done, logp)
        self.num_steps_done += 1
        self.step_in_block += 1
        if self.step_in_block < self.options.steps_per_block:
            return None
        start, end = self.block_bounds()
        self.block += 1
        self.step_in_block = 0
        return self.canvas[start:end].tolist()
