"""Every running request's diffusion state as batched tensors, and one batched step.

The engine's runner keeps one `DiffusionBatch` on the model's device. Each
request owns a slot (a row of every tensor), the way vLLM's input batch keeps
requests: its canvas, which positions are masked and locked, where its block
is, its options and seed. A step for any set of slots is a fixed sequence of
tensor operations over all of them, with no loop over requests:

  plan:   rows to compute (unlocked), rows to read (the block's masked rows,
          and with SureLock the lock candidates Z), laid out flat;
  step:   given the logits of the rows read: x0 and confidence (sampling.py),
          the top-k transfer per request, then for SureLock requests the
          step-wise KL of Z against the previous posteriors, the confidence
          gate, and the new locks.

Only counters and the tokens of the current blocks cross to the host, once per
step (`StepResult`).

Previous posteriors. A position tested at step t (in Z_t) was read at step t-1:
Z_t = (Z_{t-1} minus what locked) + (what was unmasked at t-1), and both were
read at t-1 (Z as candidates, the unmasked ones as the block's masked rows).
So the lock test only ever needs the posteriors of the previous step, and only
for the rows it will test next. The batch keeps exactly those: the
log-probabilities of next step's Z, [|Z|, vocab] over all requests, rebuilt
each step (`prev_logp`, indexed by `prev_index`). Nothing is recomputed, and
no [canvas, vocab] tensor exists; its size is that of the lock test's own
working set (the step computes Z's logits anyway). The decisions are those of
`lock_rule.LockState`, which keeps every row's last posterior: the rows differ
only in ones it never reads again.

The one-request oracle is `denoiser.CanvasDenoiser` (with `LockState`); tests
run both on the same logits and compare tokens and lock steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surelock_vllm.diffusion.lock_rule import stepwise_kl
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.diffusion.random import request_seed
from surelock_vllm.diffusion.sampling import confidence, num_transfer, sample_x0, top_k_per_group


@dataclass
class SlotInfo:
    """What the host knows of a slot (fixed at admission, plus counters)."""

    prompt_len: int
    canvas_len: int
    block_length: int
    num_blocks: int
    sampled: bool  # temperature > 0
    random_remasking: bool
    surelock: bool
    gated: bool
    next_rows: int  # rows its next step computes (the scheduler's charge)
    blocks_done: int = 0


@dataclass
class BatchPlan:
    """One step's rows, for the scheduled slots in order (b = index in `slots`)."""

    slots: list[int]
    slot_index: torch.Tensor  # [B] slot of each scheduled request
    width: int  # canvas columns spanned (longest canvas of the step)
    query_b: torch.Tensor  # [R] request of each computed row
    query_pos: torch.Tensor  # [R] canvas position of each computed row
    num_query_rows: list[int]  # [B] on the host
    read_b: torch.Tensor  # [G] request of each row read
    read_pos: torch.Tensor  # [G] its canvas position
    read_rows: torch.Tensor  # [G] its index among the computed rows
    read_sampled: torch.Tensor  # [G] bool: a masked row of the block (to unmask)
    read_z: torch.Tensor  # [G] bool: a lock candidate (to test)

    @property
    def num_rows(self) -> int:
        return int(self.query_pos.shape[0])


@dataclass
class StepResult:
    """Host-side outcome of one step, per scheduled request."""

    block_tokens: list[list[int] | None]  # tokens of a block completed this step
    finished: list[bool]
    next_rows: list[int]
    logit_rows: list[int]
    locked: list[int]


class DiffusionBatch:
    def __init__(self, max_requests: int, max_canvas_len: int, mask_id: int, device: torch.device | str = "cpu"):
        S, L = max_requests, max_canvas_len
        self.mask_id = mask_id
        self.device = device = torch.device(device)
        self.max_canvas_len = L

        def slots(dtype, fill=0):
            return torch.full((S,), fill, dtype=dtype, device=device)

        def grid(dtype, fill=0):
            return torch.full((S, L), fill, dtype=dtype, device=device)

        self.canvas = grid(torch.long, mask_id)
        self.masked = grid(torch.bool, False)
        self.locked = grid(torch.bool, False)
        self.lock_step = grid(torch.int32, -1)  # step each position locked at (-1: never)
        self.prev_index = grid(torch.long, -1)  # row of prev_logp holding its last posterior
        self.prev_logp = torch.empty((0, 0), dtype=torch.float32, device=device)

        self.prompt_len = slots(torch.long)
        self.canvas_len = slots(torch.long)
        self.block_length = slots(torch.long, 1)
        self.steps_per_block = slots(torch.long, 1)
        self.block = slots(torch.long)
        self.step_in_block = slots(torch.long)
        self.steps_done = slots(torch.long)
        self.temperature = slots(torch.float64)
        self.random_remasking = slots(torch.bool, False)
        self.seed = slots(torch.long)
        self.surelock = slots(torch.bool, False)
        self.lock_prompt = slots(torch.bool, True)
        # compared with float32 KL values, as LockState compares them with a Python float
        self.eps = slots(torch.float32)
        self.gate = slots(torch.float64, 1.0)
        self.gated = slots(torch.bool, False)

        self.info: dict[int, SlotInfo] = {}
        self._free = list(range(S - 1, -1, -1))

    # -- admission ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.info)

    def add(
        self,
        prompt_ids: list[int],
        options: DiffusionOptions,
        seed: int,
        surelock: SureLockOptions | None = None,
    ) -> int:
        """A new request's slot, its canvas `prompt + gen_length` masks."""
        if not self._free:
            raise RuntimeError(f"all {self.canvas.shape[0]} request slots are in use")
        p, canvas_len = len(prompt_ids), len(prompt_ids) + options.gen_length
        if canvas_len > self.max_canvas_len:
            raise ValueError(f"canvas of {canvas_len} positions exceeds {self.max_canvas_len}")
        slot = self._free.pop()
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)
        self.canvas[slot].fill_(self.mask_id)
        self.canvas[slot, :p] = prompt
        self.masked[slot].fill_(False)
        self.masked[slot, :p] = prompt == self.mask_id
        self.masked[slot, p:canvas_len] = True
        self.locked[slot].fill_(False)
        self.lock_step[slot].fill_(-1)
        self.prev_index[slot].fill_(-1)
        lock = surelock if surelock is not None and surelock.enabled else None
        values = {
            "prompt_len": p, "canvas_len": canvas_len, "block_length": options.block_length,
            "steps_per_block": options.steps_per_block, "block": 0, "step_in_block": 0, "steps_done": 0,
            "temperature": options.temperature, "random_remasking": options.remasking == "random",
            "seed": request_seed(seed), "surelock": lock is not None,
            "lock_prompt": True if lock is None else lock.lock_prompt,
            "eps": 0.0 if lock is None else lock.eps,
            "gated": lock is not None and lock.confidence_gate is not None,
            "gate": 1.0 if lock is None or lock.confidence_gate is None else lock.confidence_gate,
        }
        for name, value in values.items():
            getattr(self, name)[slot] = value
        self.info[slot] = SlotInfo(
            prompt_len=p, canvas_len=canvas_len, block_length=options.block_length,
            num_blocks=options.num_blocks, sampled=options.temperature > 0,
            random_remasking=options.remasking == "random", surelock=lock is not None,
            gated=values["gated"], next_rows=canvas_len,
        )
        return slot

    def remove(self, slot: int) -> None:
        del self.info[slot]
        self._free.append(slot)

    # -- one step ------------------------------------------------------------------
    def plan(self, slots: list[int]) -> BatchPlan:
        """The rows of one step for `slots` (computed: unlocked; read: block masks and Z)."""
        width = max(self.info[s].canvas_len for s in slots)
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        pos = torch.arange(width, device=self.device)[None, :]
        valid = pos < self.canvas_len[index, None]
        masked = self.masked[index, :width]
        unlocked = valid & ~self.locked[index, :width]
        start = (self.prompt_len + self.block * self.block_length)[index, None]
        in_block = (pos >= start) & (pos < start + self.block_length[index, None])
        sampled = masked & in_block
        z = (
            unlocked & ~masked & self.surelock[index, None]
            & (self.lock_prompt[index, None] | (pos >= self.prompt_len[index, None]))
        )
        query_b, query_pos = unlocked.nonzero(as_tuple=True)
        flat_row = unlocked.flatten().cumsum(0).view(unlocked.shape) - 1
        read = sampled | z
        read_b, read_pos = read.nonzero(as_tuple=True)
        return BatchPlan(
            slots=list(slots), slot_index=index, width=width,
            query_b=query_b, query_pos=query_pos,
            num_query_rows=[self.info[s].next_rows for s in slots],
            read_b=read_b, read_pos=read_pos, read_rows=flat_row[read_b, read_pos],
            read_sampled=sampled[read_b, read_pos], read_z=z[read_b, read_pos],
        )

    def step(self, plan: BatchPlan, logits: torch.Tensor) -> StepResult:
        """Unmask and lock, given the logits [G, vocab] of the plan's rows read."""
        infos = [self.info[s] for s in plan.slots]
        index = plan.slot_index
        logits = logits.float()
        read_slot = index[plan.read_b]

        # -- LLaDA's transfer: x0 and confidence of the block's masked rows, top k per request
        rows = plan.read_sampled.nonzero().squeeze(-1)
        slot, pos = read_slot[rows], plan.read_pos[rows]
        step = self.steps_done[slot]
        row_logits = logits[rows]
        x0 = sample_x0(row_logits, self.temperature[slot], self.seed[slot], step, pos,
                       any(i.sampled for i in infos))
        score = confidence(row_logits, x0, self.random_remasking[slot], self.seed[slot], step, pos,
                           any(i.random_remasking for i in infos))
        k = num_transfer(self.block_length[index], self.steps_per_block[index], self.step_in_block[index])
        chosen = top_k_per_group(score, plan.read_b[rows], k)
        self.canvas[slot[chosen], pos[chosen]] = x0[chosen]
        self.masked[slot[chosen], pos[chosen]] = x0[chosen] == self.mask_id

        # -- SureLock: test Z against the previous posteriors, lock the sure ones
        if any(i.surelock for i in infos):
            self._lock_step(plan, logits, read_slot, rows[chosen & (x0 != self.mask_id) & self.surelock[slot]],
                            any(i.gated for i in infos), carry=self._unscheduled_surelock_slots(plan))

        # -- advance, and bring counters and the current blocks' tokens to the host
        blocks_done_before = self.block[index]
        self.steps_done[index] += 1
        self.step_in_block[index] += 1
        block_done = self.step_in_block[index] >= self.steps_per_block[index]
        self.block[index] += block_done.long()
        self.step_in_block[index] = torch.where(block_done, 0, self.step_in_block[index])
        return self._to_host(plan, infos, blocks_done_before)

    def _lock_step(self, plan, logits, read_slot, unmasked_rows, any_gated, carry) -> None:
        rows = plan.read_z.nonzero().squeeze(-1)
        slot, pos, req = read_slot[rows], plan.read_pos[rows], plan.read_b[rows]
        logp = torch.log_softmax(logits[rows], dim=-1)
        if self.prev_logp.shape[-1] != logits.shape[-1]:
            self.prev_logp = logits.new_empty((0, logits.shape[-1]))
        prev = self.prev_index[slot, pos]
        has_prev = prev >= 0
        if self.prev_logp.shape[0]:
            kl = stepwise_kl(logp, self.prev_logp[prev.clamp_min(0)])
        else:  # nothing has a previous posterior yet
            kl = torch.full((rows.shape[0],), math.inf, device=logits.device)
        sure = has_prev & (kl < self.eps[slot])
        if any_gated:
            # u = 1 - max p; keep the ceil(m |Z|) least uncertain rows of each request's Z
            uncertainty = 1.0 - logp.max(dim=-1).values.exp()
            size = torch.bincount(req, minlength=len(plan.slots)).to(torch.float64)
            keep = torch.ceil(self.gate[plan.slot_index] * size).long().clamp_min(1)
            sure &= top_k_per_group(-uncertainty, req, keep) | ~self.gated[slot]
        self.locked[slot[sure], pos[sure]] = True
        self.lock_step[slot[sure], pos[sure]] = self.steps_done[slot[sure]].int()

        # Next step's Z: this step's Z that did not lock, and the rows unmasked now.
        keep_rows = rows[~sure]
        new_rows = torch.cat([keep_rows, unmasked_rows])
        new_logp = torch.cat([logp[~sure], torch.log_softmax(logits[unmasked_rows], dim=-1)])
        new_slot, new_pos = read_slot[new_rows], plan.read_pos[new_rows]
        # requests not in this step keep their rows for their next step
        if carry:
            carry_index = torch.tensor(carry, dtype=torch.long, device=self.device)
            old = self.prev_index[carry_index]
            c_req, c_pos = (old >= 0).nonzero(as_tuple=True)
            c_slot = carry_index[c_req]
            carried = self.prev_logp[old[c_req, c_pos]]
        # retire the old store
        stale = (self.prev_index[plan.slot_index] >= 0).nonzero(as_tuple=True)
        self.prev_index[plan.slot_index[stale[0]], stale[1]] = -1
        if carry:
            self.prev_logp = torch.cat([carried, new_logp])
            self.prev_index[c_slot, c_pos] = torch.arange(c_slot.shape[0], device=self.device)
            offset = c_slot.shape[0]
        else:
            self.prev_logp = new_logp
            offset = 0
        self.prev_index[new_slot, new_pos] = torch.arange(new_rows.shape[0], device=self.device) + offset

    def _unscheduled_surelock_slots(self, plan: BatchPlan) -> list[int]:
        scheduled = set(plan.slots)
        return [s for s, i in self.info.items() if i.surelock and s not in scheduled]

    def _to_host(self, plan: BatchPlan, infos: list[SlotInfo], block_before: torch.Tensor) -> StepResult:
        index = plan.slot_index
        width = plan.width
        valid = torch.arange(width, device=self.device)[None, :] < self.canvas_len[index, None]
        locked = self.locked[index, :width]
        max_block = max(i.block_length for i in infos)
        start = (self.prompt_len[index] + block_before * self.block_length[index])[:, None]
        cols = (start + torch.arange(max_block, device=self.device)[None, :]).clamp_max(self.max_canvas_len - 1)
        packed = torch.cat(
            [
                (valid & ~locked).sum(1, keepdim=True),
                locked.sum(1, keepdim=True),
                torch.bincount(plan.read_b, minlength=len(plan.slots))[:, None],
                self.block[index, None],
                self.canvas[index[:, None], cols],
            ],
            dim=1,
        ).cpu()
        result = StepResult(block_tokens=[], finished=[], next_rows=[], logit_rows=[], locked=[])
        for info, row in zip(infos, packed.tolist()):
            next_rows, locked_count, logit_rows, block = row[:4]
            done = block > info.blocks_done
            info.blocks_done = block
            info.next_rows = next_rows
            result.block_tokens.append(row[4 : 4 + info.block_length] if done else None)
            result.finished.append(block >= info.num_blocks)
            result.next_rows.append(next_rows)
            result.logit_rows.append(logit_rows)
            result.locked.append(locked_count)
        return result
