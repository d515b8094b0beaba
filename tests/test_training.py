"""The task generators and the training script (plain torch, no engine)."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from surelock_vllm.reference.modeling import LLaDAReferenceLM
from surelock_vllm.tasks import TASKS, heldout_problems, is_correct, make_problem, training_stream
from surelock_vllm.tools import train_small
from surelock_vllm.tools.make_checkpoint import build_tokenizer


def test_heldout_set_is_deterministic_and_distinct():
    a, b = heldout_problems(), heldout_problems()
    assert a == b
    assert {p.task for p in a} == set(TASKS)
    for task in TASKS:
        prompts = [p.prompt for p in a if p.task == task]
        assert len(prompts) == len(set(prompts)) == 50


def test_training_stream_never_yields_a_heldout_prompt():
    heldout = {p.prompt for p in heldout_problems()}
    stream = training_stream(seed=0, exclude=heldout)
    drawn = [next(stream) for _ in range(20000)]
    assert not heldout & {p.prompt for p in drawn}
    # ...while the unfiltered generator does produce some of them (the filter is doing work)
    rng = random.Random(0)
    assert heldout & {make_problem(rng).prompt for _ in range(20000)}
    # a task subset (train_small --tasks) draws from those tasks only
    subset = training_stream(seed=0, exclude=heldout, tasks=["add", "upper"])
    assert {next(subset).task for _ in range(200)} == {"add", "upper"}
    weighted = training_stream(seed=0, exclude=heldout, tasks=["add", "upper"], weights={"add": 4.0})
    drawn_tasks = [next(weighted).task for _ in range(1000)]
    assert 0.7 < drawn_tasks.count("add") / len(drawn_tasks) < 0.9  # 4:1


def test_answers_are_checkable_and_fit_the_response():
    rng = random.Random(1)
    encoder = train_small.ExampleEncoder(build_tokenizer(), response_length=64)
    for _ in range(500):
        p = make_problem(rng)
        assert is_correct(p, f" {p.answer}\n") and not is_correct(p, p.answer + "x")
        response = encoder.response_ids(p)
        assert len(response) == 64 and response[-1] == encoder.eos
        assert encoder.tokenizer.decode(response[: response.index(encoder.eot)]) == p.answer


@pytest.fixture(scope="module")
def small_model():
    from surelock_vllm.configuration_llada import LLaDAConfig
    from surelock_vllm.tools.make_checkpoint import PRESETS, llada_config

    config = LLaDAConfig(**llada_config(build_tokenizer(), PRESETS["tiny"], 256))
    model = LLaDAReferenceLM(config)
    train_small._init_weights(model, config, seed=0)
    return model.eval()


def test_batched_training_forward_matches_the_reference_forward(small_model):
    rng = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n,), generator=rng) for n in (7, 19, 12)]
    ids, valid, _ = train_small.make_batch([(s.tolist(), []) for s in seqs], pad_id=256)
    with torch.no_grad():
        batched = train_small.forward_batch(small_model, ids, valid)
        for i, s in enumerate(seqs):
            # padding is invisible: each row equals the unpadded reference forward
            torch.testing.assert_close(batched[i, : len(s)], small_model(s), rtol=1e-4, atol=1e-4)


def test_training_smoke_run_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    # two steps of the curriculum's first phase, two of the full mix
    train_small.main([str(out), "--preset", "tiny", "--steps", "4", "--batch-size", "4", "--first-steps", "2",
                      "--eval-every", "0", "--save-every", "0", "--cpu"])
    log = json.loads((out / "training_log.json").read_text())
    losses = [e["loss"] for e in log["log"]]
    assert len(losses) == 4 and all(l == l and l < 50 for l in losses)
    model = LLaDAReferenceLM.from_pretrained(out)
    assert model.config.mask_token_id == build_tokenizer().mask_token_id
    # deterministic for a seed: the same run gives the same weights
    out2 = tmp_path / "ckpt2"
    train_small.main([str(out2), "--preset", "tiny", "--steps", "4", "--batch-size", "4", "--first-steps", "2",
                      "--eval-every", "0", "--save-every", "0", "--cpu"])
    assert (out / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()
    # --init-from continues from a checkpoint's weights
    out3 = tmp_path / "ckpt3"
    train_small.main([str(out3), "--preset", "tiny", "--steps", "1", "--batch-size", "2", "--lr", "0",
                      "--warmup", "1", "--eval-every", "0", "--save-every", "0", "--cpu", "--init-from", str(out)])
    # ...and its training log keeps the log of the run it continued
    assert json.loads((out3 / "training_log.json").read_text())["init_from_training_log"] == log
    for name, value in LLaDAReferenceLM.from_pretrained(out3).state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


# --- the long suites: count (checkpoints/llada-long) and passages --------------------------


@pytest.mark.parametrize("suite", ["count", "count_ranges", "passages"])
def test_long_suite_answers_are_long_checkable_and_fit_a_256_canvas(suite):
    from surelock_vllm.tasks import EVALUATED_AS, PASSAGE_MAX_BYTES, PASSAGE_MIN_BYTES, SUITES

    heldout = heldout_problems(suite=suite)
    assert heldout == heldout_problems(suite=suite) and {p.task for p in heldout} == set(SUITES[suite])
    # its own seed: not another suite's problems under other names
    for other in {name for name in SUITES if EVALUATED_AS.get(name, name) != suite}:
        assert not {p.prompt for p in heldout} & {p.prompt for p in heldout_problems(suite=other)}
    lengths = [len(p.answer.encode()) for p in heldout]
    assert PASSAGE_MIN_BYTES <= min(lengths) and max(lengths) <= PASSAGE_MAX_BYTES
    assert sum(lengths) / len(lengths) >= 100  # the regime: answers of 100+ tokens on average
    encoder = train_small.ExampleEncoder(build_tokenizer(), response_length=256)
    for p in heldout:
        assert is_correct(p, f" {p.answer}\n") and not is_correct(p, p.answer[:-1])
        response = encoder.response_ids(p)
        assert len(response) == 256 and encoder.tokenizer.decode(response[: response.index(encoder.eot)]) == p.answer


def test_count_answers_count_the_stated_numbers_from_the_start():
    rng = random.Random(5)
    steps = {"up": 1, "down": -1, "by_two": 2, "by_five": 5}
    for task, step in steps.items():
        lengths = set()
        for _ in range(200):
            p = make_problem(rng, task, suite="count")
            count, start = (int(n) for n in re.findall(r"\d+", p.prompt))  # "Count N numbers ... from S."
            numbers = [int(n) for n in p.answer.split(" ")]
            assert numbers == [start + step * i for i in range(count)]
            assert " ".join(map(str, numbers)) == p.answer  # single spaces, no stray text
            assert all(100 <= n <= 999 for n in numbers)  # 3 digits throughout: 4 bytes a number
            lengths.add(len(p.answer))
        assert lengths == {4 * count - 1}  # one answer length per task


def test_count_training_mix_is_evaluated_on_the_count_suite():
    # count_train adds short counts (training only); its held-out set is the count suite's,
    # so its stream never yields one of those prompts
    heldout = heldout_problems(suite="count")
    assert heldout_problems(suite="count_train") == heldout
    stream = training_stream(seed=0, exclude={p.prompt for p in heldout}, suite="count_train")
    drawn = [next(stream) for _ in range(2000)]
    assert not {p.prompt for p in heldout} & {p.prompt for p in drawn}
    few = [p for p in drawn if p.task.endswith("_few")]
    assert few and all(2 <= len(p.answer.split()) <= 9 for p in few)
    assert {p.task for p in drawn} - {p.task for p in few} == {p.task for p in heldout}


def test_count_range_answers_step_from_the_first_number_to_the_last():
    rng = random.Random(5)
    for task in ("count_up", "count_down", "count_by_two", "count_hundreds"):
        for _ in range(100):
            p = make_problem(rng, task, suite="count_ranges")
            first, last = (int(n) for n in re.findall(r"\d+", p.prompt)[:2])  # "from A to B (by 2)"
            numbers = [int(n) for n in p.answer.split(" ")]
            step = {"count_down": -1, "count_by_two": 2}.get(task, 1)
            assert numbers == list(range(numbers[0], numbers[-1] + step, step))
            assert " ".join(map(str, numbers)) == p.answer  # single spaces, no stray text
            # every number has the width of its range: 2 digits, or 3 for count_hundreds
            assert {len(str(n)) for n in numbers} == {3 if task == "count_hundreds" else 2}
            assert (numbers[0], numbers[-1]) == (first, last) and len(numbers) >= 25


def test_count_training_stream_never_yields_a_heldout_prompt():
    heldout = {p.prompt for p in heldout_problems(suite="count")}
    stream = training_stream(seed=1, exclude=heldout, suite="count")
    drawn = [next(stream) for _ in range(3000)]
    assert not heldout & {p.prompt for p in drawn}
    assert {p.task for p in drawn} == {p.task for p in heldout_problems(suite="count")}


def test_passage_answers_follow_their_rule():
    rng = random.Random(3)
    for _ in range(50):
        p = make_problem(rng, "caesar", suite="passages")
        shift = int(p.prompt.split()[2].rstrip(":"))
        text = p.prompt.split(": ", 1)[1]
        # shifting back by the same amount gives the passage
        back = "".join(c if c == " " else chr((ord(c) - 97 - shift) % 26 + 97) for c in p.answer)
        assert back == text and p.answer != text
        chain = make_problem(rng, "chain", suite="passages")
        start, *terms = chain.prompt.split(": ")[1].split()
        total = int(start)
        for term, line in zip(terms, chain.answer.split("; "), strict=True):
            new = total + int(term)
            assert line == f"{total}{term[0]}{term[1:]}={new}" and 0 <= new <= 999
            total = new
        words = make_problem(rng, "reverse_words", suite="passages")
        assert words.answer.split() == words.prompt.split(": ")[1].split()[::-1]


def test_passages_training_stream_never_yields_a_heldout_prompt():
    heldout = {p.prompt for p in heldout_problems(suite="passages")}
    stream = training_stream(seed=0, exclude=heldout, suite="passages")
    drawn = [next(stream) for _ in range(3000)]
    assert not heldout & {p.prompt for p in drawn}
    assert {p.task for p in drawn} == {p.task for p in heldout_problems(suite="passages")}
    with pytest.raises(ValueError, match="suite"):
        next(training_stream(seed=0, exclude=set(), suite="medium"))


def test_a_stopped_and_resumed_run_gives_the_uninterrupted_weights(tmp_path):
    args = ["--preset", "tiny", "--suite", "passages", "--response-length", "256", "--steps", "5", "--batch-size", "2",
            "--first-steps", "2", "--eval-every", "0", "--save-every", "2", "--cpu"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_small.main([str(whole), *args])
    # stopped after 3 steps (past the curriculum's first phase, between saves), then resumed
    train_small.main([str(split), *args, "--resume", "--stop-after", "3"])
    assert torch.load(split / train_small.STATE_FILE, weights_only=False)["step"] == 3
    train_small.main([str(split), *args, "--resume"])
    a = torch.load(whole / train_small.STATE_FILE, weights_only=False)
    b = torch.load(split / train_small.STATE_FILE, weights_only=False)
    assert a["step"] == b["step"] == 5
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert [e["loss"] for e in a["log"]] == [e["loss"] for e in b["log"]]
    assert (whole / "model.safetensors").read_bytes() == (split / "model.safetensors").read_bytes()
    # a stage that runs part of the schedule (--stop-at), run twice (the second has nothing
    # left to do), then resumed to the end: the same weights again
    staged = tmp_path / "staged"
    for _ in range(2):
        train_small.main([str(staged), *args, "--resume", "--stop-at", "3"])
        assert torch.load(staged / train_small.STATE_FILE, weights_only=False)["step"] == 3
    train_small.main([str(staged), *args, "--resume"])
    assert (whole / "model.safetensors").read_bytes() == (staged / "model.safetensors").read_bytes()
    # resuming another run's state is refused, naming the flag
    with pytest.raises(SystemExit, match="--resume"):
        train_small.main([str(split), *args[:-3], "--save-every", "3", "--cpu", "--resume", "--lr", "1e-4"])


def test_suite_flags_are_checked_against_the_suite(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_small.main([str(tmp_path / "x"), "--suite", "passages", "--first-tasks", "upper"])
    assert "--first-tasks" in capsys.readouterr().err


def test_answer_bytes_sets_the_training_lengths_of_the_passages_suite(tmp_path, capsys):
    heldout = {p.prompt for p in heldout_problems(suite="passages")}
    stage = training_stream(seed=0, exclude=heldout, suite="passages", answer_bytes=(10, 40))
    drawn = [next(stage) for _ in range(400)]
    assert {p.task for p in drawn} == {p.task for p in heldout_problems(suite="passages")}
    for p in drawn:
        assert len(p.answer.encode()) <= 40 + 12, p  # a chain line or a word may run past MAX by its own length
    letters = [len(p.answer) for p in drawn if p.task == "copy_letters"]
    assert letters and max(letters) <= 40 and min(letters) >= 8
    with pytest.raises(ValueError, match="answer_bytes"):
        make_problem(random.Random(0), "add", answer_bytes=(10, 40))
    # the trainer's flag: passages suite only, and the answer must fit the response
    for bad in (["--suite", "short", "--answer-bytes", "10", "40"],
                ["--suite", "passages", "--response-length", "64", "--answer-bytes", "10", "64"]):
        with pytest.raises(SystemExit):
            train_small.main([str(tmp_path / "x"), *bad])
        assert "--answer-bytes" in capsys.readouterr().err
