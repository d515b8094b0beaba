"""One request's canvas and LLaDA's unmasking rule, one step at a time.

The vLLM executor keeps one `CanvasDenoiser` per request. Each diffusion step
it asks the denoiser which canvas rows to run through the transformer
(`query_positions`) and which rows' logits the step needs (`logit_positions`),
runs the model on exactly those rows, and hands the logits back to `step`.
Without locking every canvas row is a query row; SureLock shrinks that list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surelock_vllm.diffusion.block_cache import rows_for
from surelock_vllm.diffusion.lock_rule import LockState
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.diffusion.random import request_seed
from surelock_vllm.diffusion.sampling import (
    ban_token,
    hold_back_tokens,
    threshold_num_transfer,
    top_k_per_group,
    transfer_schedule,
    x0_and_score,
)


@dataclass
class StepPlan:
    """What one step computes, fixed before the forward pass."""

    query_positions: torch.Tensor  # canvas rows the transformer runs
    logit_positions: torch.Tensor  # rows whose logits the step reads
    # over logit_positions: the rows the sampler reads (the block's masked
    # rows); None when those are all of them (no locking)
    sampled: torch.Tensor | None
    lock_candidates: torch.Tensor | None  # Z over the canvas, before unmasking
    computed: torch.Tensor | None = None  # bool over the canvas: query_positions (with locking)


class CanvasDenoiser:
    """`prompt + gen_length` masks, denoised block by block.

    Random numbers come from the request's counter-based stream (random.py),
    keyed by step and position, as in `surelock_vllm.reference.sampler`.

    It is the one-request oracle of the engine's batched step
    (`batch.DiffusionBatch`): tests feed both the same logits and compare.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        options: DiffusionOptions,
        mask_id: int,
        seed: int,
        surelock: SureLockOptions | None = None,
        eos_id: int | None = None,
        eot_id: int | None = None,
    ):
        if options.cfg_scale > 0:
            # guidance combines two canvases' logits: DiffusionBatch and the reference sampler
            raise ValueError("CanvasDenoiser takes one canvas's logits; cfg_scale must be 0")
        self.options = options
        self.eos_id, self.eot_id = eos_id, eot_id
        self.mask_id = mask_id
        self.prompt_len = len(prompt_ids)
        self.canvas = torch.full(
            (self.prompt_len + options.gen_length,), mask_id, dtype=torch.long
        )
        self.canvas[: self.prompt_len] = torch.tensor(prompt_ids, dtype=torch.long)
        self.masked = self.canvas == mask_id
        self.seed = request_seed(seed)
        self.block = 0
        self.step_in_block = 0
        self.num_steps_done = 0
        self._schedule = transfer_schedule(options.block_length, options.steps_per_block)
        self._plan: StepPlan | None = None
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
    def plan(self) -> StepPlan:
        """This step's rows (computed once, until `step` consumes them)."""
        if self._plan is not None:
            return self._plan
        start, end = self.block_bounds()
        block_masked = start + self.masked[start:end].nonzero().squeeze(-1)
        # the rows a block cache computes (all without one; block_cache.py)
        computed = rows_for(self.options.kv_cache, self.canvas_len, start, self.options.block_length,
                            refresh=self.step_in_block == 0)
        if self.lock is None:
            self._plan = StepPlan(computed.nonzero().squeeze(-1), block_masked, None, None)
            return self._plan
        # With locking: the unlocked rows run; logits are read for the
        # block's masked rows (to unmask) and the lock candidates Z (to test).
        computed &= ~self.lock.locked
        z = self.lock.candidates(self.masked) & computed
        read = z.clone()
        read[block_masked] = True
        logit_positions = read.nonzero().squeeze(-1)
        self._plan = StepPlan(
            query_positions=computed.nonzero().squeeze(-1),
            logit_positions=logit_positions,
            # Z holds no masked row, so the masked rows read are the block's.
            sampled=self.masked[logit_positions],
            lock_candidates=z,
            computed=computed,
        )
        return self._plan

    def query_positions(self) -> torch.Tensor:
        """Canvas rows the transformer computes this step: the unlocked ones."""
        return self.plan().query_positions

    def logit_positions(self) -> torch.Tensor:
        """Rows whose logits this step reads: the current block's masked rows
        (to unmask) and, with locking, the lock candidates Z (to test)."""
        return self.plan().logit_positions

    # -- one step -------------------------------------------------------------
    def step(self, logits: torch.Tensor) -> list[int] | None:
        """Unmask this step's positions, given logits of `logit_positions()`.

        Returns the block's final tokens when this step completes a block,
        else None.
        """
        assert not self.finished, "denoiser already finished"
        plan = self.plan()
        self._plan = None
        positions = plan.logit_positions
        assert logits.shape[0] == positions.shape[0], (logits.shape, positions.shape)
        all_logits = logits
        if plan.sampled is not None:
            logits, positions = logits[plan.sampled], positions[plan.sampled]
        k = self._schedule[self.step_in_block]
        if positions.numel() > 0:
            x0, chosen = llada_transfer(
                logits.float(), positions, self.options, self.seed, self.num_steps_done, k,
                steps_left=self.options.steps_per_block - self.step_in_block, eos_id=self.eos_id, eot_id=self.eot_id,
            )
            unmasked = positions[chosen]
            self.canvas[unmasked] = x0[chosen]
            # (a sampled mask token stays masked, as in the reference loop)
            self.masked[unmasked] = x0[chosen] == self.mask_id
        if self.lock is not None:
            z = plan.lock_candidates
            if self.lock.options.after_unmask:
                z = self.lock.candidates(self.masked) & plan.computed  # Algorithm 1: this step's unmasked too
            self.lock.observe(plan.logit_positions, all_logits, z, self.num_steps_done)
        self.num_steps_done += 1
        self.step_in_block += 1
        start, end = self.block_bounds()
        # a block ends after its steps; with a confidence threshold, also once nothing in it is masked
        done_early = self.options.confidence_threshold is not None and not bool(self.masked[start:end].any())
        if self.step_in_block < self.options.steps_per_block and not done_early:
            return None
        self.block += 1
        self.step_in_block = 0
        return self.canvas[start:end].tolist()


def llada_transfer(
    logits: torch.Tensor, positions: torch.Tensor, options: DiffusionOptions, seed: int, step: int, k: int,
    steps_left: int = 1, eos_id: int | None = None, eot_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's x0 for the masked `positions` (float32 `logits`), and which transfer:
    the k most confident (fixed schedule), or as many as the confidence threshold
    takes with `steps_left` steps left in the block."""
    n = positions.shape[0]

    def per_row(value, dtype):
        return torch.full((n,), value, dtype=dtype)

    seeds, steps = per_row(seed, torch.long), per_row(step, torch.long)
    random = options.remasking == "random"
    if options.logits_eos_inf:
        logits = ban_token(logits, None, eos_id)
    x0, score = x0_and_score(
        logits, per_row(options.temperature, torch.float64), per_row(random, torch.bool),
        seeds, steps, positions, options.temperature > 0, random,
    )
    if options.confidence_eos_eot_inf:
        score = hold_back_tokens(score, x0, None, (eos_id, eot_id))
    group = per_row(0, torch.long)
    if options.confidence_threshold is not None:
        k = int(threshold_num_transfer(
            score, group, torch.tensor([options.confidence_threshold], dtype=torch.float64), torch.tensor([steps_left])
        ))
    chosen = top_k_per_group(score, group, torch.tensor([k]))
    return x0, chosen
