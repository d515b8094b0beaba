"""SureLock's lock rule and FLOPs formulas, in plain torch."""

import math

import pytest
import torch

from surelock_vllm.diffusion.options import InvalidDiffusionOption, SureLockOptions
from surelock_vllm.diffusion.flops import ComputeLedger, ModelShape
from surelock_vllm.diffusion.lock_rule import LockState, stepwise_kl


def test_kl_is_zero_for_equal_and_positive_for_different_posteriors():
    a = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), -1)
    b = torch.log_softmax(torch.tensor([[0.0, 2.0, -1.0]]), -1)
    assert stepwise_kl(a, a).item() == 0.0
    p, q = a.exp(), b.exp()
    assert stepwise_kl(a, b).item() == pytest.approx((p * (p / q).log()).sum().item())


def logits_for(rows, peak):
    out = torch.zeros(rows, 5)
    out[:, peak] = 4.0
    return out


def test_first_observation_never_locks_then_stable_rows_lock():
    lock = LockState(canvas_len=6, prompt_len=2, options=SureLockOptions(enabled=True, eps=1e-6))
    masked = torch.tensor([False, False, True, True, True, True])
    z = lock.candidates(masked)
    assert z.tolist() == [True, True, False, False, False, False]  # prompt rows, unmasked
    rows = torch.arange(6)
    assert lock.observe(rows, logits_for(6, 1), z, step=0).numel() == 0  # KL infinite at first
    # position 2 unmasked by the sampler; all posteriors unchanged
    masked[2] = False
    z = lock.candidates(masked)
    newly = lock.observe(rows, logits_for(6, 1), z, step=1)
    assert newly.tolist() == [0, 1, 2]
    assert lock.lock_step.tolist() == [1, 1, 1, -1, -1, -1]
    # locked rows leave Z for good; masked rows never lock
    assert lock.candidates(masked).tolist() == [False] * 6


def test_eps_zero_never_locks_even_identical_posteriors():
    # KL < eps is strict: with eps = 0 SureLock is the no-lock sampler.
    lock = LockState(4, 0, SureLockOptions(enabled=True, eps=0.0))
    masked = torch.zeros(4, dtype=torch.bool)
    rows = torch.arange(4)
    for step in range(3):
        assert lock.observe(rows, logits_for(4, 1), lock.candidates(masked), step).numel() == 0
    assert not lock.locked.any()


def test_inclusive_test_locks_identical_posteriors_at_eps_zero():
    # Algorithm 1's D <= eps: identical posteriors (D = 0) lock even at eps = 0
    lock = LockState(4, 0, SureLockOptions(enabled=True, eps=0.0, kl_test="<="))
    masked = torch.zeros(4, dtype=torch.bool)
    rows = torch.arange(4)
    assert lock.observe(rows, logits_for(4, 1), lock.candidates(masked), 0).numel() == 0  # no previous yet
    assert lock.observe(rows, logits_for(4, 1), lock.candidates(masked), 1).tolist() == [0, 1, 2, 3]


def test_candidates_before_and_after_unmasking():
    """A token unmasked at step t: tested at t+1 (before_unmask), or already at t with the
    posterior its [MASK] input produced (after_unmask, Algorithm 1)."""
    masked_before = torch.tensor([False, True, True])
    masked_after = torch.tensor([False, False, True])  # position 1 unmasked at step 1
    rows = torch.arange(3)
    results = {}
    for candidates in ("before_unmask", "after_unmask"):
        lock = LockState(3, 1, SureLockOptions(enabled=True, eps=1e-3, candidates=candidates))
        lock.observe(rows, logits_for(3, 1), lock.candidates(masked_before), 0)  # step 0: all masked but 0
        z = lock.candidates(masked_before if candidates == "before_unmask" else masked_after)
        results[candidates] = lock.observe(rows, logits_for(3, 1), z, 1).tolist()
    assert results == {"before_unmask": [0], "after_unmask": [0, 1]}


def test_paper_preset_and_rule_options():
    paper = SureLockOptions().resolve({"surelock_preset": "paper"})
    assert paper == SureLockOptions(enabled=True, candidates="after_unmask", kl_test="<=",
                                    confidence_gate=0.2, preset="paper")
    # explicit keys win over the preset's values
    assert SureLockOptions().resolve({"surelock_preset": "paper", "surelock_confidence_gate": 0.5}).confidence_gate == 0.5
    # a server-wide preset is every request's default
    server = SureLockOptions.from_defaults({"preset": "paper"})
    assert server.resolve({}).after_unmask and server.resolve({}).inclusive
    assert server.resolve({"surelock_kl_test": "<"}).kl_test == "<"


def test_changed_posterior_does_not_lock():
    lock = LockState(4, 0, SureLockOptions(enabled=True, eps=1e-3))
    masked = torch.zeros(4, dtype=torch.bool)
    rows = torch.arange(4)
    lock.observe(rows, logits_for(4, 1), lock.candidates(masked), 0)
    moved = logits_for(4, 1)
    moved[2] = logits_for(1, 3)[0]
    newly = lock.observe(rows, moved, lock.candidates(masked), 1)
    assert newly.tolist() == [0, 1, 3]


def test_lock_prompt_false_keeps_prompt_unlocked():
    lock = LockState(4, 2, SureLockOptions(enabled=True, eps=1.0, lock_prompt=False))
    masked = torch.zeros(4, dtype=torch.bool)
    rows = torch.arange(4)
    for step in range(3):
        lock.observe(rows, logits_for(4, 0), lock.candidates(masked), step)
    assert lock.locked.tolist() == [False, False, True, True]


def test_confidence_gate_keeps_only_the_most_confident_fraction():
    lock = LockState(10, 0, SureLockOptions(enabled=True, eps=10.0, confidence_gate=0.2))
    masked = torch.zeros(10, dtype=torch.bool)
    logits = torch.zeros(10, 5)
    logits[:, 0] = torch.arange(10, dtype=torch.float)  # row 9 most confident
    rows = torch.arange(10)
    lock.observe(rows, logits, lock.candidates(masked), 0)
    newly = lock.observe(rows, logits, lock.candidates(masked), 1)
    assert sorted(newly.tolist()) == [8, 9]  # 20% of 10


def test_disabled_never_locks():
    lock = LockState(4, 0, SureLockOptions(enabled=False, eps=1.0))
    masked = torch.zeros(4, dtype=torch.bool)
    for step in range(3):
        assert lock.observe(torch.arange(4), logits_for(4, 0), lock.candidates(masked), step).numel() == 0


@pytest.mark.parametrize(
    "extra,option",
    [
        ({"surelock": "yes"}, "surelock"),
        ({"surelock_eps": -1.0}, "surelock_eps"),
        ({"surelock_eps": math.nan}, "surelock_eps"),
        ({"surelock_confidence_gate": 1.5}, "surelock_confidence_gate"),
        ({"surelock_confidence_gate": 0}, "surelock_confidence_gate"),
        ({"surelock_lock_prompt": 2}, "surelock_lock_prompt"),
        ({"surelock": "maybe"}, "surelock"),
        ({"surelock_candidates": "during"}, "surelock_candidates"),
        ({"surelock_kl_test": "<<"}, "surelock_kl_test"),
        ({"surelock_preset": "fast"}, "surelock_preset"),
        ({"surelock_preset": ["paper"]}, "surelock_preset"),
    ],
)
def test_invalid_request_options_name_the_key(extra, option):
    with pytest.raises(InvalidDiffusionOption) as err:
        SureLockOptions().resolve(extra)
    assert err.value.option == option


def test_booleans_in_the_forms_vllm_xargs_delivers():
    assert SureLockOptions().resolve({"surelock": 1}).enabled is True
    assert SureLockOptions(enabled=True).resolve({"surelock": 0}).enabled is False
    assert SureLockOptions().resolve({"surelock": "true", "surelock_lock_prompt": "false"}).lock_prompt is False


def test_request_overrides_server_defaults():
    server = SureLockOptions.from_defaults({"enabled": True, "eps": 5e-4})
    assert server.resolve({}) == SureLockOptions(enabled=True, eps=5e-4)
    assert server.resolve({"surelock": False}).enabled is False
    assert server.resolve({"surelock_eps": 0.05}).eps == 0.05
    with pytest.raises(InvalidDiffusionOption, match="eps"):
        SureLockOptions.from_defaults({"eps": "big"})


def test_flops_formulas_follow_the_omnd_model():
    shape = ModelShape(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden=12288, vocab=126464)
    # LLaDA-8B: 4 d^2 attention projections + 3 d*d_ff MLP per layer, 2 FLOPs/MAC
    assert shape.dense_flops(1) == 32 * 2 * (4 * 4096**2 + 3 * 4096 * 12288)
    assert shape.attention_flops(10, 300) == 32 * 4 * 10 * 300 * 4096
    ledger = ComputeLedger()
    ledger.add_step(shape, rows=300, canvas_len=300, logit_rows=32, locked=0)
    ledger.add_step(shape, rows=100, canvas_len=300, logit_rows=40, locked=200)
    assert ledger.rows == 400 and ledger.rows_nolock == 600
    assert ledger.flops_ratio == pytest.approx(400 / 600)  # both parts scale with M
    assert ledger.locked_fraction == [0.0, round(200 / 300, 4)]
