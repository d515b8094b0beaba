"""Every running request's diffusion state as batched tensors, and one batched step.

The engine's runner keeps one `DiffusionBatch` on the model's device. Each
request owns a slot (a row of every tensor), the way vLLM's input batch keeps
requests: its canvas, which positions are masked and locked, where its block
is, its options and seed. A step for any set of slots is a fixed sequence of
tensor operations over all of them, with no loop over requests:

  plan:   rows to compute (unlocked, and not frozen by a block cache), rows
          to read (the block's masked rows, and with SureLock the lock
          candidates Z), laid out flat;
  step:   given the final hidden states of the rows read and the LM head:
          x0 and confidence of the block's rows (sampling.py),
          the top-k transfer per request (k from LLaDA's schedule, or from
          a confidence threshold, whose blocks end as soon as nothing in
          them is masked), then for SureLock requests the
          step-wise KL of Z against the previous posteriors, the confidence
          gate, and the new locks.

Only counters and the tokens of the current blocks cross to the host, once per
step (`StepResult`).

Previous posteriors. A position tested at step t (in Z_t) was read at step t-1:
Z_t = (Z_{t-1} minus what locked) + (what was unmasked at t-1), and both were
read at t-1 (Z as candidates, the unmasked ones as the block's masked rows).
So the lock test only ever needs the posteriors of the previous step, and only
for the rows it will test next. The batch keeps exactly those: the
log-probabilities this step computed for Z and for the rows it unmasked, in
one float32 buffer (`_store`, addressed by `prev_index`), copied there by the
lock test from its own log-softmax (without the gate, only the rows that stay
unlocked); two buffers alternate, one read while the other is written, and
both are released when no SureLock request is left. One exception: at a
request's first step its whole prompt is in Z with nothing to compare against
yet, and most of it locks at the next step; those rows keep their final hidden
state instead (`_hidden`, addressed by `prev_hidden`: d_model values, not a
vocabulary's) and the next step recomputes their posteriors once, counted in
the request's logit rows; so do the rows of Z past the store's budget
(`stored_rows` per request, STORED_ROWS_PER_REQUEST), which bounds the
store when many candidates stay unlocked (early steps, or a model whose
posteriors keep moving). No [canvas, vocab] tensor exists: the store holds
the rows of Z that stay unlocked, and Z's logits are computed a chunk at a
time inside the test and never exist whole.
The decisions are those of `lock_rule.LockState`, which keeps every row's
last posterior: the two differ only in rows it never reads again.

Block caches (`kv_cache`, block_cache.py). A request with a prefix or dual
cache computes only the rows its policy allows at this step (all unlocked rows
at a block's first step), and Z is taken from the computed rows. A row the
cache leaves out (`BatchPlan.frozen`) keeps its store or hidden-state record,
carried like the rows of requests that sit a step out, so when the next
refresh computes it again it is tested against the posterior of the last step
that computed it (the previous refresh). `next_rows` counts what the policy
will compute at the request's next step.

Row order. The rows read are laid out as all requests' masked block rows,
then all requests' Z rows, then the unconditional rows of guided requests
(each in request, then position order), so the sampler and the lock test
each take a contiguous slice of the logits.

Classifier-free guidance (`cfg_scale`, LLaDA's). A guided request's step also
runs its unconditional canvas (the canvas with the prompt masked) as a second
sequence of the step, over all of its rows, with K/V slots of its own
(`guided_kv_tokens`); the block rows' logits are then u + (cfg_scale + 1)(c - u).
Guided requests do not lock.

The one-request oracle is `denoiser.CanvasDenoiser` (with `LockState`); tests
run both on the same logits and compare tokens and lock steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from surelock_vllm.diffusion.block_cache import KV_CACHE_CODE, policy_rows
from surelock_vllm.diffusion.lock_rule import stepwise_kl
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.diffusion.random import request_seed
from surelock_vllm.diffusion.sampling import (
    ban_token,
    chunk_rows,
    hold_back_tokens,
    num_transfer,
    threshold_num_transfer,
    top_k_per_group,
    x0_and_score,
)


# rows of Z whose logits the lock test computes at once: enough to stream the
# LM head's weights once for many rows, few enough to bound the memory
# (64 x 126,464 x 4 B = 31 MiB)
_HEAD_CHUNK_ROWS = 64
# a Z up to this many rows shares the block rows' LM-head call
_SHARED_HEAD_ROWS = 32
# rows of previous posteriors the store holds per request: past this, a
# candidate keeps its final hidden state and next step recomputes its
# posterior (at LLaDA-8B's vocabulary a stored row is 0.5 MB; a request has
# 3-4 candidates a step once its prompt has locked, but the whole prompt
# until then). Per request, so that what a request computes does not depend
# on the other requests of its batch.
STORED_ROWS_PER_REQUEST = 4


@dataclass
class SlotInfo:
    """What the host knows of a slot (fixed at admission, plus counters)."""

    prompt_len: int
    canvas_len: int
    block_length: int
    num_blocks: int
    sampled: bool  # temperature > 0
    random_remasking: bool
    adaptive: bool  # a confidence threshold: blocks end when unmasked, steps are an upper bound
    surelock: bool
    gated: bool
    after_unmask: bool  # Algorithm 1: this step's unmasked tokens are lock candidates now
    guided: bool  # classifier-free guidance: an unconditional canvas too
    ban_eos: bool  # logits_eos_inf
    hold_eos_eot: bool  # confidence_eos_eot_inf
    cached: bool  # a block cache (kv_cache prefix or dual): some unlocked rows are frozen
    next_rows: int  # rows its next step computes (the scheduler's charge)
    blocks_done: int = 0
    stepped: bool = False  # has taken its first step (Z's rows all have a previous posterior)


@dataclass
class BatchPlan:
    """One step's rows, for the scheduled slots in order (b = index in `slots`)."""

    slots: list[int]
    slot_index: torch.Tensor  # [B] slot of each scheduled request
    width: int  # canvas columns spanned (longest canvas of the step)
    query_b: torch.Tensor  # [R] request of each computed row
    query_pos: torch.Tensor  # [R] canvas position of each computed row
    num_query_rows: list[int]  # [B] on the host (a guided request's: both canvases)
    # rows read: first the block's masked rows (to unmask), then Z (to test),
    # then the unconditional rows of guided requests' block rows
    read_b: torch.Tensor  # [G] request of each row read
    read_pos: torch.Tensor  # [G] its canvas position
    read_rows: torch.Tensor  # [G] its index among the computed rows
    num_sampled: int  # the first num_sampled rows read are block rows, then Z
    # The step's sequences for the attention kernel: the B canvases, then the
    # unconditional canvases of the guided requests (computed rows come in
    # that order). Without guidance: B sequences, query_seq = query_b.
    query_ids: torch.Tensor  # [R] input token id of each computed row
    query_seq: torch.Tensor  # [R] sequence of each computed row
    seq_b: list[int]  # request of each sequence (host)
    seq_rows: list[int]  # rows computed per sequence (host)
    guided_rows: torch.Tensor  # [U] the sampled rows (indices < num_sampled) that are guided
    num_guided: int = 0  # U: the last U rows read are their unconditional rows
    # [B, width] unlocked rows a block cache does not compute this step (None: no cached request)
    frozen: torch.Tensor | None = None

    @property
    def num_unguided_reads(self) -> int:
        return int(self.read_b.shape[0]) - self.num_guided


@dataclass
class _BlockRows:
    """The block's masked rows read this step (the sampler's rows), for the lock test."""

    req: torch.Tensor  # [n] request (index in the plan)
    slot: torch.Tensor  # [n]
    pos: torch.Tensor  # [n]
    hidden: torch.Tensor  # [n, d] final hidden states
    unmasked: torch.Tensor  # indices of the rows unmasked this step (SureLock requests)
    unmasked_logits: torch.Tensor  # [len(unmasked), vocab] float32


def _cumsum_in_groups(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum of bool `values` within runs of equal `group` (rows grouped)."""
    total = torch.cumsum(values.long(), 0)
    starts = torch.ones_like(values)
    starts[1:] = group[1:] != group[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(values.shape[0], device=values.device), 0), 0).values
    return total - total[first] + values[first].long()


def _passes(kl: torch.Tensor, eps: torch.Tensor, inclusive: torch.Tensor) -> torch.Tensor:
    """The sure test per row: KL < eps, or KL <= eps where `inclusive` (Algorithm 1)."""
    return torch.where(inclusive, kl <= eps, kl < eps)


@dataclass
class StepResult:
    """Host-side outcome of one step, per scheduled request."""

    block_tokens: list[list[int] | None]  # tokens of a block completed this step
    finished: list[bool]
    next_rows: list[int]
    logit_rows: list[int]
    locked: list[int]


class DiffusionBatch:
    def __init__(self, max_requests: int, max_canvas_len: int, mask_id: int, device: torch.device | str = "cpu",
                 stored_rows: int = STORED_ROWS_PER_REQUEST, eos_id: int | None = None, eot_id: int | None = None):
        S, L = max_requests, max_canvas_len
        self.stored_rows = stored_rows  # the store's budget of Z rows per request
        self.mask_id = mask_id
        # end-of-text and end-of-turn ids, for LLaDA's EOS options
        self.eos_id, self.eot_id = eos_id, eot_id
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
        # row of `_store` holding each position's previous posterior, -1: none
        self.prev_index = grid(torch.long, -1)
        # row of `_hidden` holding the final hidden state a position's previous
        # posterior is recomputed from (rows first read at a request's first step), -1: none
        self.prev_hidden = grid(torch.long, -1)
        self._hidden: torch.Tensor | None = None
        self._hidden_rows = 0
        self._store = torch.empty((0, 0), device=device)  # log-probabilities, float32
        self._store_rows = 0
        self._store_base: torch.Tensor | None = None  # the buffer _store is a view of
        self._spare: torch.Tensor | None = None  # the buffer the next step writes

        self.prompt_len = slots(torch.long)
        self.canvas_len = slots(torch.long)
        self.block_length = slots(torch.long, 1)
        self.steps_per_block = slots(torch.long, 1)
        self.block = slots(torch.long)
        self.step_in_block = slots(torch.long)
        self.steps_done = slots(torch.long)
        self.temperature = slots(torch.float64)
        self.random_remasking = slots(torch.bool, False)
        self.threshold = slots(torch.float64)  # confidence threshold (adaptive unmasking), 0: none
        self.adaptive = slots(torch.bool, False)
        self.seed = slots(torch.long)
        self.surelock = slots(torch.bool, False)
        self.lock_prompt = slots(torch.bool, True)
        # compared with float32 KL values, as LockState compares them with a Python float
        self.eps = slots(torch.float32)
        self.gate = slots(torch.float64, 1.0)
        self.gated = slots(torch.bool, False)
        self.after_unmask = slots(torch.bool, False)  # candidates after this step's unmasking
        self.inclusive = slots(torch.bool, False)  # the sure test is KL <= eps (else <)
        self.cfg_scale = slots(torch.float64)  # classifier-free guidance, 0: none
        self.ban_eos = slots(torch.bool, False)  # logits_eos_inf
        self.hold_eos_eot = slots(torch.bool, False)  # confidence_eos_eot_inf
        self.kv_cache = slots(torch.long)  # block cache policy (block_cache.KV_CACHE_CODE), 0: none

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
        lock = surelock if surelock is not None and surelock.enabled else None
        guided = options.cfg_scale > 0
        if guided and lock is not None:
            raise ValueError("classifier-free guidance is not combined with SureLock")
        if options.logits_eos_inf and self.eos_id is None:
            raise ValueError("logits_eos_inf needs the batch's eos_id")
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
        self.prev_hidden[slot].fill_(-1)
        values = {
            "prompt_len": p, "canvas_len": canvas_len, "block_length": options.block_length,
            "steps_per_block": options.steps_per_block, "block": 0, "step_in_block": 0, "steps_done": 0,
            "temperature": options.temperature, "random_remasking": options.remasking == "random",
            "threshold": options.confidence_threshold or 0.0,
            "adaptive": options.confidence_threshold is not None,
            "seed": request_seed(seed), "surelock": lock is not None,
            "lock_prompt": True if lock is None else lock.lock_prompt,
            "eps": 0.0 if lock is None else lock.eps,
            "gated": lock is not None and lock.confidence_gate is not None,
            "gate": 1.0 if lock is None or lock.confidence_gate is None else lock.confidence_gate,
            "after_unmask": lock is not None and lock.after_unmask,
            "inclusive": lock is not None and lock.inclusive,
            "cfg_scale": options.cfg_scale, "ban_eos": options.logits_eos_inf,
            "hold_eos_eot": options.confidence_eos_eot_inf, "kv_cache": KV_CACHE_CODE[options.kv_cache],
        }
        for name, value in values.items():
            getattr(self, name)[slot] = value
        self.info[slot] = SlotInfo(
            prompt_len=p, canvas_len=canvas_len, block_length=options.block_length,
            num_blocks=options.num_blocks, sampled=options.temperature > 0,
            random_remasking=options.remasking == "random",
            adaptive=options.confidence_threshold is not None, surelock=lock is not None,
            gated=values["gated"], after_unmask=values["after_unmask"], guided=guided,
            ban_eos=options.logits_eos_inf, hold_eos_eot=options.confidence_eos_eot_inf,
            cached=options.kv_cache != "none",
            next_rows=2 * canvas_len if guided else canvas_len,
        )
        return slot

    def remove(self, slot: int) -> None:
        del self.info[slot]
        self._free.append(slot)
        if not any(i.surelock for i in self.info.values()):
            # no lock test left to feed: give the store's memory back
            self._store, self._store_rows = torch.empty((0, 0), device=self.device), 0
            self._store_base = self._spare = None
            self._hidden, self._hidden_rows = None, 0

    # -- one step ------------------------------------------------------------------
    def plan(self, slots: list[int]) -> BatchPlan:
        """The rows of one step for `slots` (computed: unlocked, and not frozen by a block
        cache; read: block masks and Z)."""
        infos = [self.info[s] for s in slots]
        width = max(i.canvas_len for i in infos)
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        pos = torch.arange(width, device=self.device)[None, :]
        valid = pos < self.canvas_len[index, None]
        masked = self.masked[index, :width]
        unlocked = valid & ~self.locked[index, :width]
        computed, frozen = unlocked, None
        if any(i.cached for i in infos):
            computed = unlocked & self._policy_rows(index, pos)
            frozen = unlocked & ~computed
        start = (self.prompt_len + self.block * self.block_length)[index, None]
        in_block = (pos >= start) & (pos < start + self.block_length[index, None])
        sampled = masked & in_block
        z = (
            computed & ~masked & self.surelock[index, None]
            & (self.lock_prompt[index, None] | (pos >= self.prompt_len[index, None]))
        )
        query_b, query_pos = computed.nonzero(as_tuple=True)
        flat_row = computed.flatten().cumsum(0).view(computed.shape) - 1
        sampled_b, sampled_pos = sampled.nonzero(as_tuple=True)
        z_b, z_pos = z.nonzero(as_tuple=True)
        read_b, read_pos = torch.cat([sampled_b, z_b]), torch.cat([sampled_pos, z_pos])
        num_query_rows = [i.next_rows for i in infos]
        plan = BatchPlan(
            slots=list(slots), slot_index=index, width=width,
            query_b=query_b, query_pos=query_pos, num_query_rows=num_query_rows,
            read_b=read_b, read_pos=read_pos, read_rows=flat_row[read_b, read_pos],
            num_sampled=int(sampled_b.shape[0]),
            query_ids=self.canvas[index[query_b], query_pos], query_seq=query_b,
            seq_b=list(range(len(slots))), seq_rows=list(num_query_rows),
            guided_rows=sampled_b[:0], frozen=frozen,
        )
        if any(i.guided for i in infos):
            self._add_unconditional(plan, infos, valid, sampled)
        return plan

    def _policy_rows(self, index: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[B, width] rows the block cache computes at the slots' current step (block_cache.py)."""
        start = (self.prompt_len + self.block * self.block_length)[index, None]
        refresh = (self.step_in_block[index] == 0)[:, None]
        return policy_rows(pos, start, self.block_length[index, None], refresh, self.kv_cache[index, None])

    def _add_unconditional(self, plan: BatchPlan, infos: list[SlotInfo], valid: torch.Tensor,
                           sampled: torch.Tensor) -> None:
        """Guided requests' unconditional canvases: all of their rows, as sequences after
        the B canvases, and their block rows' reads after all others (LLaDA's `un_x`:
        the canvas with the prompt's tokens masked)."""
        guided_b = [b for b, i in enumerate(infos) if i.guided]
        guided = torch.zeros(len(infos), dtype=torch.bool, device=self.device)
        guided[guided_b] = True
        index = plan.slot_index
        rows = valid & guided[:, None]
        u_b, u_pos = rows.nonzero(as_tuple=True)
        u_slot = index[u_b]
        prompt = (u_pos < self.prompt_len[u_slot]) & (self.canvas[u_slot, u_pos] != self.mask_id)
        u_ids = torch.where(prompt, self.mask_id, self.canvas[u_slot, u_pos])
        num_cond = plan.query_b.shape[0]
        flat_row = num_cond + rows.flatten().cumsum(0).view(rows.shape) - 1
        g_b, g_pos = (sampled & guided[:, None]).nonzero(as_tuple=True)
        for b, info in enumerate(infos):
            if info.guided:
                plan.seq_rows[b] -= info.canvas_len  # the conditional canvas's share
        plan.query_b = torch.cat([plan.query_b, u_b])
        plan.query_pos = torch.cat([plan.query_pos, u_pos])
        plan.query_ids = torch.cat([plan.query_ids, u_ids])
        seq_of = torch.full((len(infos),), -1, dtype=torch.long, device=self.device)
        seq_of[guided_b] = torch.arange(len(guided_b), device=self.device) + len(infos)
        plan.query_seq = torch.cat([plan.query_seq, seq_of[u_b]])
        plan.seq_b += guided_b
        plan.seq_rows += [infos[b].canvas_len for b in guided_b]
        plan.guided_rows = guided[plan.read_b[: plan.num_sampled]].nonzero().squeeze(-1)
        plan.num_guided = int(g_b.shape[0])
        plan.read_b = torch.cat([plan.read_b, g_b])
        plan.read_pos = torch.cat([plan.read_pos, g_pos])
        plan.read_rows = torch.cat([plan.read_rows, flat_row[g_b, g_pos]])

    def step(self, plan: BatchPlan, hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor]) -> StepResult:
        """Unmask and lock, given the final hidden states [G, d] of the plan's rows read.

        `lm_head` maps hidden states to logits. The block's rows get their
        logits at once; Z's are computed a chunk at a time inside the lock
        test, so their [|Z|, vocab] logits never exist whole.
        """
        infos = [self.info[s] for s in plan.slots]
        index = plan.slot_index
        read_slot = index[plan.read_b]

        # -- LLaDA's transfer: x0 and confidence of the block's masked rows, top k per request
        n, reads = plan.num_sampled, plan.num_unguided_reads
        any_surelock = any(i.surelock for i in infos)
        # A small Z (the usual case once the prompt has locked) shares the
        # block rows' LM-head call (the head's weights are read once for both);
        # a large one gets its logits a chunk at a time in the lock test.
        num_z = reads - n
        first_z = num_z if any_surelock and num_z <= _SHARED_HEAD_ROWS else 0
        head = lm_head(hidden[: n + first_z]).float()
        row_logits, req = head[:n], plan.read_b[:n]
        slot, pos = read_slot[:n], plan.read_pos[:n]
        if plan.num_guided:
            # classifier-free guidance, as LLaDA: u + (cfg_scale + 1) (c - u)
            unconditional = lm_head(hidden[reads:]).float()
            g = plan.guided_rows
            scale = (self.cfg_scale[slot[g]] + 1).float()[:, None]
            row_logits[g] = unconditional + scale * (row_logits[g] - unconditional)
            del unconditional
        sampling_logits = row_logits
        if any(i.ban_eos for i in infos):
            # LLaDA's logits_eos_inf, for sampling only (the lock test reads the model's posterior)
            sampling_logits = ban_token(row_logits, self.ban_eos[slot], self.eos_id)
        x0, score = x0_and_score(
            sampling_logits, self.temperature[slot], self.random_remasking[slot], self.seed[slot],
            self.steps_done[slot], pos, any(i.sampled for i in infos), any(i.random_remasking for i in infos),
        )
        del sampling_logits
        if any(i.hold_eos_eot for i in infos):
            score = hold_back_tokens(score, x0, self.hold_eos_eot[slot], (self.eos_id, self.eot_id))
        k = num_transfer(self.block_length[index], self.steps_per_block[index], self.step_in_block[index])
        any_adaptive = any(i.adaptive for i in infos)
        if any_adaptive:
            steps_left = self.steps_per_block[index] - self.step_in_block[index]
            k_adaptive = threshold_num_transfer(score, req, self.threshold[index], steps_left)
            k = torch.where(self.adaptive[index], k_adaptive, k)
        chosen = top_k_per_group(score, req, k)
        self.canvas[slot[chosen], pos[chosen]] = x0[chosen]
        still_masked = x0[chosen] == self.mask_id  # (a sampled mask token stays masked)
        self.masked[slot[chosen], pos[chosen]] = still_masked
        if any_adaptive:
            # masked rows left in each request's block after this step
            left = torch.zeros(len(infos), dtype=torch.long, device=self.device)
            left.index_add_(0, req, (~chosen).long())
            left.index_add_(0, req[chosen], still_masked.long())

        # -- SureLock: test Z against the previous posteriors, lock the sure ones
        recomputed = None
        if any_surelock:
            unmasked = (chosen & (x0 != self.mask_id) & self.surelock[slot]).nonzero().squeeze(-1)
            block = _BlockRows(
                req=req, slot=slot, pos=pos, hidden=hidden[:n], unmasked=unmasked,
                unmasked_logits=row_logits[unmasked],
            )
            z_logits = head[n:] if first_z else None
            del head, row_logits  # the block rows' logits are done with: free them before the test
            recomputed = self._lock_step(
                plan, hidden[n:reads], z_logits, lm_head, read_slot[n:reads], block, any(i.gated for i in infos),
                first_step=any(i.surelock and not i.stepped for i in infos),
                any_after_unmask=any(i.after_unmask for i in infos),
                carry=self._unscheduled_surelock_slots(plan),
            )

        # -- advance, and bring counters and the current blocks' tokens to the host
        blocks_done_before = self.block[index]
        self.steps_done[index] += 1
        self.step_in_block[index] += 1
        block_done = self.step_in_block[index] >= self.steps_per_block[index]
        if any_adaptive:
            # with a confidence threshold a block also ends as soon as nothing in it is masked
            block_done |= self.adaptive[index] & (left == 0)
        self.block[index] += block_done.long()
        self.step_in_block[index] = torch.where(block_done, 0, self.step_in_block[index])
        return self._to_host(plan, infos, blocks_done_before, recomputed)

    def _lock_step(self, plan, z_hidden, z_logits, lm_head, slot, block, any_gated, first_step,
                   any_after_unmask, carry) -> torch.Tensor | None:
        """Lock test over the candidates, then the store for next step.

        The candidates are Z (the rows read after the block's) and, for
        requests with `after_unmask` (Algorithm 1), also the block rows this
        step unmasked (`block.unmasked`). `z_logits`: Z's logits if they were
        computed with the block's rows, else None (computed here a chunk at a
        time); `first_step`: some request takes its first step. Returns the
        logit rows recomputed per scheduled request (None when none were).
        """
        n, reads = plan.num_sampled, plan.num_unguided_reads
        pos, req = plan.read_pos[n:reads], plan.read_b[n:reads]
        u_slot, u_pos, u_req = block.slot[block.unmasked], block.pos[block.unmasked], block.req[block.unmasked]
        num_z, vocab = z_hidden.shape[0], block.unmasked_logits.shape[-1]
        num_unmasked = u_slot.shape[0]
        prev = self.prev_index[slot, pos]
        prev_h = self.prev_hidden[slot, pos] if self._hidden_rows else None
        u_prev_h = self.prev_hidden[u_slot, u_pos] if self._hidden_rows and any_after_unmask else None
        has_prev = prev >= 0 if prev_h is None else (prev >= 0) | (prev_h >= 0)
        eps, inclusive = self.eps[slot], self.inclusive[slot]
        testable = self._store_rows > 0 or self._hidden_rows > 0
        recomputed = None
        if prev_h is not None or u_prev_h is not None:
            recomputed = torch.zeros(len(plan.slots), dtype=torch.long, device=self.device)
        # At a request's first step all of its prompt is in Z, none of it with
        # a previous posterior: those rows keep their final hidden state
        # (d_model values instead of a vocabulary's) and next step recomputes
        # their posteriors from it, once. Without this, the prompts of a batch
        # of new requests would hold 0.5 MB per row at LLaDA-8B's vocabulary.
        to_hidden = ~has_prev if first_step else None
        kl = torch.full((num_z,), math.inf, device=self.device)
        max_logp = torch.empty((num_z,), device=self.device) if any_gated else None
        carried = self._carried_rows(plan, carry, self.prev_index, self._store_rows)
        carried_hidden = self._carried_rows(plan, carry, self.prev_hidden, self._hidden_rows)
        num_carried = 0 if carried is None else carried[0].shape[0]
        # Next step's store: carried rows, Z's rows that stay unlocked (up to the
        # budget `stored_rows`; the rest keep their hidden states), the rows
        # unmasked now, and one scratch row.
        budget = self.stored_rows * len(plan.slots)
        spill = num_z > self.stored_rows  # some request's Z may outgrow its budget
        store = self._store_buffer(num_carried + min(num_z, budget) + num_unmasked + 1, vocab)
        spilled = torch.zeros((num_z,), dtype=torch.bool, device=self.device) if spill else None
        # rows of each request's Z written so far (its budget's use)
        stored = torch.zeros(len(plan.slots), dtype=torch.long, device=self.device) if spill else None
        # Without the gate a row's decision is known as soon as its KL is, so
        # only the rows that stay unlocked are written to the store (the rows
        # that lock now, most of the prompt at a request's second step, never
        # touch its memory); the gate ranks all of a request's Z first, so a
        # gated request's rows are all kept.
        gated_row = self.gated[slot]
        dest = torch.full((num_z,), -1, dtype=torch.long, device=self.device)  # store row, -1: none
        next_row = torch.full((1,), num_carried, dtype=torch.long, device=self.device)
        chunk = min(chunk_rows(vocab, self.device), max(1, num_z))
        probs, previous, product, staging = (block.unmasked_logits.new_empty((chunk, vocab)) for _ in range(4))
        # Z's LM head a chunk at a time (enough rows to read the head's weights
        # once per chunk), then log-softmax and KL a few rows at a time within
        # it, into reused buffers: at a 126k vocabulary a row is 0.5 MB, and
        # the test's passes over it then run from cache.
        head_rows = max(1, num_z) if z_logits is not None else _HEAD_CHUNK_ROWS
        for h_lo in range(0, num_z, head_rows):
            h_hi = min(h_lo + head_rows, num_z)
            logits = z_logits if z_logits is not None else lm_head(z_hidden[h_lo:h_hi]).float()
            head_previous = None
            if testable and prev_h is not None:
                head_previous = self._previous_with_recomputed(
                    prev[h_lo:h_hi], prev_h[h_lo:h_hi], req[h_lo:h_hi], vocab, lm_head, recomputed)
            for lo in range(h_lo, h_hi, chunk):
                hi = min(lo + chunk, h_hi)
                m = hi - lo
                logp = staging[:m]
                torch.log_softmax(logits[lo - h_lo : hi - h_lo], dim=-1, out=logp)
                if any_gated:
                    max_logp[lo:hi] = logp.max(dim=-1).values
                if testable:
                    if head_previous is not None:
                        before = head_previous[lo - h_lo : hi - h_lo]
                    else:
                        # rows without a previous posterior read row 0: masked below
                        before = torch.index_select(self._store, 0, prev[lo:hi].clamp_min(0), out=previous[:m])
                    torch.exp(logp, out=probs[:m])
                    kl[lo:hi] = stepwise_kl(logp, before, probs[:m], product[:m])
                write = gated_row[lo:hi] | ~(has_prev[lo:hi] & _passes(kl[lo:hi], eps[lo:hi], inclusive[lo:hi]))
                if to_hidden is not None:
                    write &= ~to_hidden[lo:hi]
                if spill:
                    # past its request's budget a row keeps its hidden state instead
                    over = write & (stored[req[lo:hi]] + _cumsum_in_groups(write, req[lo:hi]) > self.stored_rows)
                    spilled[lo:hi] = over
                    write &= ~over
                    stored.index_add_(0, req[lo:hi], write.long())
                rows = torch.where(write, next_row + torch.cumsum(write, 0) - 1, store.shape[0] - 1)
                store.index_copy_(0, rows, logp)
                next_row += write.sum()
                dest[lo:hi] = torch.where(write, rows, -1)
        sure = has_prev & _passes(kl, eps, inclusive)

        # Algorithm 1: the tokens this step unmasked are candidates now, tested
        # against their posteriors of the previous step, when they were masked
        # block rows (recomputed from the hidden states kept then).
        u_logp = torch.log_softmax(block.unmasked_logits, dim=-1)
        u_candidate = self.after_unmask[u_slot]
        u_sure = torch.zeros_like(u_candidate)
        if u_prev_h is not None:
            u_has_prev = u_candidate & (u_prev_h >= 0)
            again = u_has_prev.nonzero().squeeze(-1)  # a few rows a step: k per request
            if again.numel():
                u_before = torch.log_softmax(lm_head(self._hidden[u_prev_h[again]]).float(), dim=-1)
                u_kl = stepwise_kl(u_logp[again], u_before)
                u_sure[again] = _passes(u_kl, self.eps[u_slot[again]], self.inclusive[u_slot[again]])
                recomputed.index_add_(0, u_req[again], torch.ones_like(again))
        if any_gated:
            # u = 1 - max p; keep the ceil(m |Z|) least uncertain rows of each request's Z
            # (Z and, under Algorithm 1, this step's unmasked tokens, ranked together in
            # position order so that ties go to the earlier position, as in LockState)
            all_req = torch.cat([req, u_req])
            all_pos = torch.cat([pos, u_pos])
            candidate = torch.cat([torch.ones_like(has_prev), u_candidate])
            uncertainty = torch.cat([1.0 - max_logp.exp(), 1.0 - u_logp.max(dim=-1).values.exp()])
            uncertainty = torch.where(candidate, uncertainty, math.inf)
            order = torch.argsort(all_req * (self.max_canvas_len + 1) + all_pos, stable=True)
            size = torch.zeros(len(plan.slots), dtype=torch.long, device=self.device)
            size.index_add_(0, all_req, candidate.long())
            keep = torch.ceil(self.gate[plan.slot_index] * size.to(torch.float64)).long().clamp_min(1)
            kept_sorted = top_k_per_group(-uncertainty[order], all_req[order], keep)
            within = torch.empty_like(kept_sorted)
            within[order] = kept_sorted
            within &= candidate
            all_slot = torch.cat([slot, u_slot])
            within |= ~self.gated[all_slot]
            sure &= within[:num_z]
            u_sure &= within[num_z:]
        for rows_slot, rows_pos, rows_sure in ((slot, pos, sure), (u_slot, u_pos, u_sure)):
            self.locked[rows_slot[rows_sure], rows_pos[rows_sure]] = True
            self.lock_step[rows_slot[rows_sure], rows_pos[rows_sure]] = self.steps_done[rows_slot[rows_sure]].int()

        # Address the new store: requests not in this step keep their rows.
        for grid in (self.prev_index, self.prev_hidden) if self._hidden_rows else (self.prev_index,):
            stale_req, stale_pos = (grid[plan.slot_index] >= 0).nonzero(as_tuple=True)
            grid[plan.slot_index[stale_req], stale_pos] = -1
        if carried is not None:
            c_slot, c_pos, c_rows = carried
            torch.index_select(self._store, 0, c_rows, out=store[:num_carried])
            self.prev_index[c_slot, c_pos] = torch.arange(num_carried, device=self.device)
        kept = (~sure).nonzero().squeeze(-1)
        self.prev_index[slot[kept], pos[kept]] = dest[kept]
        if num_unmasked:
            # the unmasked tokens that did not lock: tested next step, against this posterior
            rows = torch.arange(num_unmasked, device=self.device) + next_row
            self.prev_index[u_slot, u_pos] = torch.where(u_sure, -1, rows)
            store.index_copy_(0, rows, u_logp)
        self._swap_store(store, num_carried + num_z + num_unmasked)

        # The hidden states kept for recomputation (d_model values a row):
        # carried rows; all of Z's when a request took its first step or Z
        # outgrew the store's budget (only the rows without a previous
        # posterior, or past the budget, are addressed); and, for Algorithm 1,
        # the block rows still masked (any of them may be unmasked, and tested,
        # next step).
        kept_hidden = []
        if carried_hidden is not None:
            h_slot, h_pos, h_rows = carried_hidden
            kept_hidden.append(self._hidden[h_rows])
            self.prev_hidden[h_slot, h_pos] = torch.arange(h_rows.shape[0], device=self.device)
        base = sum(t.shape[0] for t in kept_hidden)
        if to_hidden is not None or spill:
            recompute = to_hidden if not spill else spilled if to_hidden is None else to_hidden | spilled
            kept_hidden.append(z_hidden)
            self.prev_hidden[slot, pos] = torch.where(recompute, torch.arange(num_z, device=self.device) + base, -1)
            base += num_z
        if any_after_unmask:
            kept_hidden.append(block.hidden)
            waiting = self.masked[block.slot, block.pos] & self.after_unmask[block.slot]
            rows = torch.arange(block.hidden.shape[0], device=self.device) + base
            self.prev_hidden[block.slot, block.pos] = torch.where(waiting, rows, -1)
        self._hidden = torch.cat(kept_hidden) if kept_hidden else None
        self._hidden_rows = 0 if self._hidden is None else self._hidden.shape[0]
        return recomputed

    def _previous_with_recomputed(self, prev, prev_h, req, vocab, lm_head, recomputed) -> torch.Tensor:
        """Previous posteriors [rows, vocab] of some Z rows: from the store, or recomputed
        from the kept hidden state (counted per request in `recomputed`)."""
        if self._store_rows:
            before = torch.index_select(self._store, 0, prev.clamp_min(0))
        else:
            before = torch.zeros((prev.shape[0], vocab), device=self.device)
        again = (prev_h >= 0).nonzero().squeeze(-1)
        if again.numel():
            before[again] = torch.log_softmax(lm_head(self._hidden[prev_h[again]]).float(), dim=-1)
            recomputed.index_add_(0, req[again], torch.ones_like(again))
        return before

    def _carried_rows(self, plan: BatchPlan, carry: list[int], grid: torch.Tensor, stored: int):
        """(slot, position, row) of what `grid` addresses and this step does not compute: all
        rows of SureLock requests not in this step, and the rows a block cache froze in it
        (their previous posterior is the one of the last step that computed them)."""
        if not stored or (not carry and plan.frozen is None):
            return None
        parts = []
        if carry:
            carry_index = torch.tensor(carry, dtype=torch.long, device=self.device)
            old = grid[carry_index]
            c_req, c_pos = (old >= 0).nonzero(as_tuple=True)
            parts.append((carry_index[c_req], c_pos, old[c_req, c_pos]))
        if plan.frozen is not None:
            old = grid[plan.slot_index, : plan.width]
            f_req, f_pos = ((old >= 0) & plan.frozen).nonzero(as_tuple=True)
            parts.append((plan.slot_index[f_req], f_pos, old[f_req, f_pos]))
        c_slot, c_pos, c_rows = (torch.cat(t) for t in zip(*parts))
        if not c_slot.numel():
            return None
        return c_slot, c_pos, c_rows

    # -- the store of previous posteriors: two buffers, one read while the other is written
    def _store_buffer(self, rows: int, vocab: int) -> torch.Tensor:
        """A [rows, vocab] float32 buffer that is not the current store (reused across steps:
        fresh memory would cost a page fault per 4 KB at every step)."""
        spare = self._spare
        if spare is None or spare.shape[-1] != vocab or spare.shape[0] < rows or spare.shape[0] > 4 * rows + 64:
            spare = self._spare = torch.empty((rows + rows // 4 + 16, vocab), device=self.device)
        return spare[:rows]

    def _swap_store(self, buffer: torch.Tensor, rows: int) -> None:
        base = self._spare
        self._spare = self._store_base
        self._store_base = base
        self._store = buffer
        self._store_rows = rows

    def store_bytes(self) -> int:
        """Bytes of the two store buffers (the previous posteriors and the spare)."""
        return sum(t.numel() * t.element_size() for t in (self._store_base, self._spare) if t is not None)

    def _unscheduled_surelock_slots(self, plan: BatchPlan) -> list[int]:
        scheduled = set(plan.slots)
        return [s for s, i in self.info.items() if i.surelock and s not in scheduled]

    def _to_host(self, plan: BatchPlan, infos: list[SlotInfo], block_before: torch.Tensor,
                 recomputed: torch.Tensor | None) -> StepResult:
        index = plan.slot_index
        width = plan.width
        valid = torch.arange(width, device=self.device)[None, :] < self.canvas_len[index, None]
        locked = self.locked[index, :width]
        computed_next = valid & ~locked
        if plan.frozen is not None:
            # the rows the block cache lets the next step compute (its block and step, as advanced)
            computed_next &= self._policy_rows(index, torch.arange(width, device=self.device)[None, :])
        max_block = max(i.block_length for i in infos)
        start = (self.prompt_len[index] + block_before * self.block_length[index])[:, None]
        cols = (start + torch.arange(max_block, device=self.device)[None, :]).clamp_max(self.max_canvas_len - 1)
        packed = torch.cat(
            [
                computed_next.sum(1, keepdim=True),
                locked.sum(1, keepdim=True),
                # logit rows: the rows read, and previous posteriors recomputed
                (torch.bincount(plan.read_b, minlength=len(plan.slots))
                 + (0 if recomputed is None else recomputed))[:, None],
                self.block[index, None],
                self.canvas[index[:, None], cols],
            ],
            dim=1,
        ).cpu()
        result = StepResult(block_tokens=[], finished=[], next_rows=[], logit_rows=[], locked=[])
        for info, row in zip(infos, packed.tolist()):
            next_rows, locked_count, logit_rows, block = row[:4]
            if info.guided:
                next_rows += info.canvas_len  # the unconditional canvas
            done = block > info.blocks_done
            info.blocks_done = block
            info.stepped = True
            info.next_rows = next_rows
            result.block_tokens.append(row[4 : 4 + info.block_length] if done else None)
            result.finished.append(block >= info.num_blocks)
            result.next_rows.append(next_rows)
            result.logit_rows.append(logit_rows)
            result.locked.append(locked_count)
        return result
