"""The engine's batched diffusion step against the one-request oracle, in plain torch.

`DiffusionBatch` (all requests as slot-indexed tensors, one step for all) and
`CanvasDenoiser` + `LockState` (one request, the oracle) get the same logits
for the same rows; they must unmask the same tokens, lock the same positions
at the same steps and report the same counts, for any mix of options, with
requests joining, leaving and sitting out steps.
"""

from __future__ import annotations

import random

import pytest
import torch

from surelock_vllm.diffusion.batch import DiffusionBatch
from surelock_vllm.diffusion.denoiser import CanvasDenoiser
from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
from surelock_vllm.diffusion.random import uniform_matrix, uniform_rows
from surelock_vllm.diffusion.sampling import top_k_per_group

VOCAB, MASK = 64, 63
EOS, EOT = 5, 9  # end of text and end of turn (LLaDA's EOS options)


def fake_logits(request: int, step: int, positions: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """Deterministic logits per (request, step, position, token there): a posterior that
    settles after its position unmasks (so positions lock at different steps), and is
    sharp enough to make ties rare but not absent."""
    rows = []
    for p in positions.tolist():
        g = torch.Generator().manual_seed(request * 1_000_003 + p * 7919)
        base = torch.randn(VOCAB, generator=g) * 3
        base[MASK] = -20.0
        base[[EOS, EOT]] += 1.5  # predicted often enough for the EOS options to matter
        token = int(canvas[p])
        if token != MASK:
            # every third request is certain of its tokens: p = 1.0 exactly, so the
            # confidence gate meets ties (broken by position)
            base[token] += 60.0 if request % 3 == 0 else 4.0
        g2 = torch.Generator().manual_seed(request * 1_000_003 + p * 7919 + step * 104_729 + 1)
        # from step 10 on a position's posterior stops moving: KL exactly 0 (eps = 0 then
        # locks under KL <= eps, never under KL < eps)
        wobble = torch.randn(VOCAB, generator=g2) * (0.6 ** min(step, 10))
        rows.append(base + wobble)
    return torch.stack(rows) if rows else torch.empty(0, VOCAB)


def make_requests(rng: random.Random, n: int):
    requests = []
    for i in range(n):
        gen = rng.choice([8, 16, 24])
        block = rng.choice([b for b in (4, 8, gen) if gen % b == 0])
        blocks = gen // block
        steps = blocks * rng.randint(1, block)  # steps per block need not divide the block
        remasking = rng.choice(["low_confidence", "random"])
        if i == 0:  # one request surely decodes in parallel: a low threshold, the most steps
            remasking, steps = "low_confidence", gen
        options = DiffusionOptions(
            gen_length=gen, steps=steps, block_length=block, remasking=remasking,
            temperature=rng.choice([0.0, 0.0, 0.7, 1.0]),
            # adaptive unmasking (blocks end early, at different steps per request)
            confidence_threshold=(
                0.3 if i == 0 else rng.choice([None, 0.3, 0.6, 0.9]) if remasking == "low_confidence" else None
            ),
            logits_eos_inf=rng.random() < 0.3,
            confidence_eos_eot_inf=rng.random() < 0.3,
            # Fast-dLLM's block caches: frozen rows, refreshed at each block's first step
            kv_cache=rng.choice(["none", "none", "prefix", "dual"]),
        )
        # both rules: candidates before this step's unmasking (and KL < eps), or after it
        # (the paper's Algorithm 1, usually with KL <= eps)
        rule = rng.choice([{}, {"candidates": "after_unmask", "kl_test": "<="}, {"candidates": "after_unmask"},
                           {"kl_test": "<="}])
        lock = rng.choice([
            None,
            SureLockOptions(enabled=True, eps=rng.choice([0.0, 1e-3, 5e-2, 1.0]), **rule),
            SureLockOptions(enabled=True, eps=0.5, confidence_gate=rng.choice([0.2, 0.5]), **rule),
            SureLockOptions(enabled=True, eps=0.2, lock_prompt=False, **rule),
        ])
        prompt = [rng.randrange(0, MASK) for _ in range(rng.randint(1, 9))]
        if rng.random() < 0.2:
            prompt[0] = MASK  # a mask token in the prompt is never sampled, never locks
        requests.append((prompt, options, lock, rng.randrange(-(2**63), 2**63)))
    return requests


@pytest.mark.parametrize("seed", range(12))
def test_batched_step_equals_one_request_oracle(seed):
    rng = random.Random(seed)
    requests = make_requests(rng, 7)
    # odd seeds: a store budget of 2 rows a request, so most of Z keeps hidden states and is
    # recomputed (even seeds: a budget nothing outgrows, so the recomputed rows are known exactly)
    batch = DiffusionBatch(max_requests=5, max_canvas_len=40, mask_id=MASK, stored_rows=2 if seed % 2 else 10_000,
                           eos_id=EOS, eot_id=EOT)
    oracles: dict[int, CanvasDenoiser] = {}
    slot_of: dict[int, int] = {}
    waiting = list(range(len(requests)))
    out_oracle: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    out_batch: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    steps_taken = 0
    froze = False  # some step computed fewer rows than the unlocked ones (a block cache)
    first_z: dict[int, int] = {}  # Z rows read at a request's first step
    read_masked: dict[int, set[int]] = {}  # masked block rows read at a request's last step
    while waiting or slot_of:
        while waiting and len(slot_of) < 5 and (not slot_of or rng.random() < 0.5):
            i = waiting.pop(0)
            prompt, options, lock, req_seed = requests[i]
            oracles[i] = CanvasDenoiser(prompt, options, MASK, req_seed, lock, eos_id=EOS, eot_id=EOT)
            slot_of[i] = batch.add(prompt, options, req_seed, lock)
        # some running requests sit this step out (the scheduler's row budget)
        scheduled = [i for i in slot_of if rng.random() < 0.8] or list(slot_of)[:1]
        plan = batch.plan([slot_of[i] for i in scheduled])
        froze |= plan.frozen is not None and bool(plan.frozen.any())
        logits = torch.empty(plan.read_pos.shape[0], VOCAB)
        oracle_logits = {}
        for b, i in enumerate(scheduled):
            den = oracles[i]
            mine = plan.read_b == b
            ours = plan.read_pos[mine]
            # the block's masked rows first, then Z; the same set as the oracle reads
            assert torch.equal(ours.sort().values, den.logit_positions()), (i, den.num_steps_done)
            query = plan.query_pos[plan.query_b == b]
            assert torch.equal(query, den.query_positions())
            assert plan.num_query_rows[b] == query.numel()
            assert torch.equal(plan.read_rows[mine], torch.searchsorted(query, ours) + (plan.query_b < b).sum())
            logits[mine] = fake_logits(i, den.num_steps_done, ours, den.canvas)
            oracle_logits[i] = fake_logits(i, den.num_steps_done, den.logit_positions(), den.canvas)
        assert bool((plan.read_b[: plan.num_sampled].diff() >= 0).all())
        result = batch.step(plan, logits, lambda rows: rows)  # the logits stand in for hidden states
        for b, i in enumerate(scheduled):
            den = oracles[i]
            masked_before = den.masked.clone()
            tokens = den.step(oracle_logits[i])
            unmasked_now = set((masked_before & ~den.masked).nonzero().squeeze(-1).tolist())
            slot = slot_of[i]
            assert torch.equal(batch.canvas[slot, : den.canvas_len], den.canvas), (i, den.num_steps_done)
            assert result.block_tokens[b] == tokens
            read = int((plan.read_b == b).sum())
            # the prompt rows of its first step's Z get their posteriors recomputed once, at the second
            # (with a block cache: at the next refresh, counted below as a lower bound)
            recomputed = first_z.get(i, 0) if den.num_steps_done == 2 and den.options.kv_cache == "none" else 0
            # under Algorithm 1, each token unmasked now that was a masked row read last step
            # gets its previous posterior recomputed (from the hidden state kept then)
            if den.lock is not None and den.lock.options.after_unmask:
                recomputed += len(unmasked_now & read_masked.get(i, set()))
            if seed % 2 or den.options.kv_cache != "none":
                # and the rows of Z past the store's budget, recomputed too; or (a block
                # cache) the first step's prompt rows, recomputed at the next refresh
                assert result.logit_rows[b] >= read + recomputed, (i, den.num_steps_done)
            else:
                assert result.logit_rows[b] == read + recomputed, (i, den.num_steps_done)
            if den.num_steps_done == 1:
                first_z[i] = int((plan.read_b[plan.num_sampled :] == b).sum())
            read_masked[i] = set(plan.read_pos[: plan.num_sampled][plan.read_b[: plan.num_sampled] == b].tolist())
            if den.lock is not None:
                assert torch.equal(batch.lock_step[slot, : den.canvas_len].long(), den.lock.lock_step)
                assert result.locked[b] == den.lock.num_locked
            else:
                assert result.locked[b] == 0
            if tokens:
                out_oracle[i] += tokens
                out_batch[i] += result.block_tokens[b]
            assert result.finished[b] == den.finished
            if den.finished:
                batch.remove(slot)
                del slot_of[i]
            else:
                assert result.next_rows[b] == den.query_positions().numel()
        steps_taken += 1
        assert steps_taken < 500
    assert out_batch == out_oracle
    # logits_eos_inf: end of text is never predicted, at any temperature
    assert all(EOS not in out_batch[i] for i, (_, options, _, _) in enumerate(requests) if options.logits_eos_inf)
    assert len(batch) == 0
    # with no SureLock request left, the previous posteriors' memory is released
    assert batch.store_bytes() == 0 and batch._store.numel() == 0
    # the mix locked something and sampled something (the test exercises both paths)
    assert any(o.lock is not None and o.lock.num_locked for o in oracles.values())
    # a token locked at the very step that unmasked it (Algorithm 1's timing), somewhere
    assert seed % 2 or any(
        o.lock is not None and o.lock.options.after_unmask
        and bool(((o.lock.lock_step >= 0) & (torch.arange(o.canvas_len) >= o.prompt_len)).any())
        for o in oracles.values()
    )
    # a block cache left unlocked rows out of some step
    assert froze
    # and some threshold request finished in fewer steps than its fixed schedule
    assert any(
        o.options.confidence_threshold is not None and o.num_steps_done < o.options.steps for o in oracles.values()
    )


def test_cumsum_in_groups():
    from surelock_vllm.diffusion.batch import _cumsum_in_groups

    values = torch.tensor([True, False, True, True, True, False, True])
    group = torch.tensor([0, 0, 0, 2, 2, 3, 3])
    assert _cumsum_in_groups(values, group).tolist() == [1, 1, 2, 1, 2, 0, 1]


def test_top_k_per_group_ties_go_to_the_earlier_row():
    score = torch.tensor([0.5, 0.9, 0.9, 0.1, 0.7, 0.7, 0.7], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    chosen = top_k_per_group(score, group, torch.tensor([2, 2]))
    assert chosen.tolist() == [False, True, True, False, True, True, False]
    chosen = top_k_per_group(score, group, torch.tensor([1, 0]))
    assert chosen.tolist() == [False, True, False, False, False, False, False]


def test_counter_random_numbers_depend_only_on_their_key():
    seed = torch.tensor([3, 3, -5, 2**62])
    step = torch.tensor([0, 1, 0, 7])
    pos = torch.tensor([10, 10, 10, 999])
    u = uniform_matrix(seed, step, pos, 1000, stream=1)
    assert u.shape == (4, 1000) and bool(((u > 0) & (u < 1)).all())
    # a row alone equals the same row in a batch
    assert torch.equal(uniform_matrix(seed[2:3], step[2:3], pos[2:3], 1000, 1), u[2:3])
    # different keys, different streams; roughly uniform
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], uniform_matrix(seed[:1], step[:1], pos[:1], 1000, 2)[0])
    assert abs(float(u.mean()) - 0.5) < 0.02
    assert uniform_rows(seed, step, pos, 2).unique().numel() == 4


def test_eos_options_ban_the_logit_and_hold_back_the_confidence():
    from surelock_vllm.diffusion.sampling import HELD_BACK_SCORE, ban_token, hold_back_tokens

    logits = torch.zeros(3, 8)
    rows = torch.tensor([True, False, True])
    banned = ban_token(logits, rows, 5)
    assert banned[:, 5].tolist() == [-torch.inf, 0.0, -torch.inf] and bool((logits == 0).all())  # a copy
    score = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    x0 = torch.tensor([5, 6, 1])
    held = hold_back_tokens(score, x0, None, (5, 6, None))
    assert held.tolist() == [HELD_BACK_SCORE, HELD_BACK_SCORE, 0.7]
    assert hold_back_tokens(score, x0, rows, (5, 6)).tolist() == [HELD_BACK_SCORE, 0.8, 0.7]
    # held-back positions go last among the block's masked rows, ties to the earlier one
    chosen = top_k_per_group(held, torch.zeros(3, dtype=torch.long), torch.tensor([2]))
    assert chosen.tolist() == [True, False, True]
