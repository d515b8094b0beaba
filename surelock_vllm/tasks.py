"""Problems with exactly checkable answers, for training and evaluating the shipped models.

Two suites. `short` (`TASKS`), the shipped `checkpoints/llada-small`'s: six
tasks (arithmetic, string and list manipulation, lookups), each a
generator of `Problem(task, prompt, answer)` from a `random.Random`. Answers
run from 2 to 21 bytes (the tokenizer is byte-level), so with the end-of-turn
token they cover up to three of the four 8-token blocks of a 32-token
generation. The sizes were cut down until a 4-layer model trained on the CPU
(tools/train_small.py) learned most of them; after that training lookup
is still at chance (docs/eval/eval.md). Plain Python, no torch or vLLM.

Two suites of long answers (64 to 250 bytes, the regime of LLaDA-8B users'
answers and of the SureLock paper's gen_length 256, where one wrong token of a
hundred fails the problem):

`count` (`COUNT_TASKS`), the shipped `checkpoints/llada-long`'s: count up,
down, by two, or through 3-digit numbers, from the prompt's first number to
its last. Each answer is a worked trace, every number the one before plus a
fixed step, the nearest thing to a GSM8K trace that a 4-layer model learns on
this CPU; answers of 99-239 bytes, 157 on average.

`passages` (`PASSAGE_TASKS`): copies with a per-token rule (a word passage or
random letters copied; a passage uppercased, Caesar-shifted, joined by
dashes, with one word replaced), the words in reverse order, and an addition
chain that writes every intermediate sum (`23+45=68; 68-7=61; ...`). No
recipe tried here learns them (docs/long-answers.md: copying forms up to 40
bytes, not at 50 and over). Its generators take an answer-length range
(`answer_bytes`, a training curriculum's stage).

Held-out problems come from their own seed, and the training stream skips any
prompt that is in the held-out set, so evaluation never sees a training item.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

WORDS = (
    "red blue green gold pink gray lime teal navy plum rose sand snow iron salt "
    "moon star rain wind fire lake hill tree leaf bird fish wolf bear frog duck "
    "book door road ship lamp desk cake milk soup rice corn bean king lion tiger "
    "apple river cloud stone light night water sugar bread cheese"
).split()
LETTERS = string.ascii_lowercase

EVAL_SEED = 20260
PASSAGES_EVAL_SEED = 20261
COUNT_EVAL_SEED = 20262
HELDOUT_PER_TASK = 50
# the passages suite's answers, in bytes (the canvas is 256 tokens: the answer, then <|eot_id|>)
PASSAGE_MIN_BYTES, PASSAGE_MAX_BYTES = 64, 250


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str


def _add(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Problem("add", f"What is {a} + {b}?", str(a + b))


def _reverse(rng: random.Random) -> Problem:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    return Problem("reverse", f"Reverse: {word}", word[::-1])


def _sort(rng: random.Random) -> Problem:
    nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return Problem("sort", "Sort: " + " ".join(map(str, nums)), " ".join(map(str, sorted(nums))))


def _upper(rng: random.Random) -> Problem:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    return Problem("upper", f"Uppercase: {words}", words.upper())


def _repeat(rng: random.Random) -> Problem:
    unit = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 3)))
    times = rng.randint(2, 4)
    return Problem("repeat", f"Repeat {unit} {times} times.", unit * times)


def _lookup(rng: random.Random) -> Problem:
    keys = rng.sample(LETTERS, rng.randint(2, 3))
    values = [rng.choice(WORDS) for _ in keys]
    table = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    i = rng.randrange(len(keys))
    return Problem("lookup", f"{table}. What is {keys[i]}?", values[i])


TASKS = {"add": _add, "reverse": _reverse, "sort": _sort, "upper": _upper, "repeat": _repeat, "lookup": _lookup}


# --- the passages suite ---------------------------------------------------------------


def _passage(rng: random.Random, lengths: tuple[int, int] = (80, 200)) -> str:
    """Words from WORDS, about `lengths` = (min, max) bytes long (at most max)."""
    min_bytes, max_bytes = lengths
    target = rng.randint(min_bytes, max_bytes)
    words: list[str] = []
    while len(" ".join(words)) < target:
        words.append(rng.choice(WORDS))
    while len(" ".join(words)) > max_bytes:
        words.pop()
    return " ".join(words)


def _copy(rng: random.Random, lengths: tuple[int, int] = (80, 200)) -> Problem:
    text = _passage(rng, lengths)
    return Problem("copy", f"Copy: {text}", text)


def _copy_letters(rng: random.Random, lengths: tuple[int, int] = (80, 200)) -> Problem:
    # random letters in groups of 2-6: no word list to guess from, only the prompt to copy
    target, groups = rng.randint(*lengths), []
    while len(" ".join(groups)) < target:
        groups.append("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6))))
    text = " ".join(groups)[: min(lengths[1], PASSAGE_MAX_BYTES)].strip()
    return Problem("copy_letters", f"Copy the letters: {text}", text)


def _upcase(rng: random.Random, lengths: tuple[int, int] = (80, 200)) -> Problem:
    text = _passage(rng, lengths)
    return Problem("upcase", f"Uppercase: {text}", text.upper())


def _caesar(rng: random.Random, lengths: tuple[int, int] = (80, 200)) -> Problem:
    text, shift = _passage(rng, lengths), rng.randint(1, 3)
    shifted = "".join(c if c == " " else LETTERS[(LETTERS.index(c) + shift) % 26] for c in text)
    return Problem("caesar", f"Shift by {shift}: {text}", shifted)


def _dashes(rng: random.Random, lengths: tuple[int, int] = (80, 200)) -> Problem:
    text = _passage(rng, lengths)
    return Problem("dashes", f"Join with dashes: {text}", text.replace(" ", "-"))


def _replace(rng: random.Random, lengths: tuple[int, int] = (80, 200)) -> Problem:
    text = _passage(rng, lengths)
    old = rng.choice(text.split())
    new = rng.choice([w for w in WORDS if w != old])
    answer = " ".join(new if w == old else w for w in text.split())
    return Problem("replace", f"Replace {old} with {new}: {text}", answer)


def _reverse_words(rng: random.Random, lengths: tuple[int, int] = (64, 160)) -> Problem:
    text = _passage(rng, lengths)
    return Problem("reverse_words", f"Reverse the words: {text}", " ".join(reversed(text.split())))


def _chain(rng: random.Random, lengths: tuple[int, int] = (70, 100)) -> Problem:
    start = total = rng.randint(10, 99)
    terms, lines = [], []
    length = rng.randint(*lengths)
    while len("; ".join(lines)) < length - 12:
        term = rng.randint(10, 99)
        op = "-" if total >= term and (rng.random() < 0.4 or total + term > 999) else "+"
        new = total - term if op == "-" else total + term
        lines.append(f"{total}{op}{term}={new}")
        terms.append(f"{op}{term}")
        total = new
    return Problem("chain", f"Add up step by step: {start} " + " ".join(terms), "; ".join(lines))


# --- the count suites: long answers a small model learns (checkpoints/llada-long) -------------
#
# Each answer is a worked trace: every number is the one before it plus (or minus) a
# fixed step, so every token follows from the tokens a few positions back. 2-digit
# numbers are 3 bytes apart ("23 "), 3-digit ones 4.
#
# `count_ranges` (the first training stage): count from the prompt's first number to
# its last, so where the answer ends depends on comparing with the prompt's end
# number. After 2,400 steps a 4-layer model counts, but has not learned where to stop
# (docs/long-answers.md).
#
# `count` (the shipped model's): a stated count of 3-digit numbers from a start, one
# count per task, so each task's answer has one length and the end of turn sits at a
# fixed distance from the prompt; the hard part left is the carries.


def _count_span(rng: random.Random, lo: int, hi: int, counts: tuple[int, int], step: int = 1) -> tuple[int, int]:
    n = rng.randint(*counts)
    start = rng.randint(lo, hi - step * (n - 1))
    return start, start + step * (n - 1)


def _count_up(rng: random.Random) -> Problem:
    a, b = _count_span(rng, 10, 99, (34, 80))
    return Problem("count_up", f"Count from {a} to {b}.", " ".join(map(str, range(a, b + 1))))


def _count_down(rng: random.Random) -> Problem:
    a, b = _count_span(rng, 10, 99, (34, 80))
    return Problem("count_down", f"Count down from {b} to {a}.", " ".join(map(str, range(b, a - 1, -1))))


def _count_by_two(rng: random.Random) -> Problem:
    a, b = _count_span(rng, 10, 99, (34, 45), step=2)
    return Problem("count_by_two", f"Count from {a} to {b} by 2.", " ".join(map(str, range(a, b + 1, 2))))


def _count_hundreds(rng: random.Random) -> Problem:
    a, b = _count_span(rng, 100, 999, (25, 60))
    return Problem("count_hundreds", f"Count from {a} to {b}.", " ".join(map(str, range(a, b + 1))))


COUNT_RANGE_TASKS = {"count_up": _count_up, "count_down": _count_down, "count_by_two": _count_by_two,
                     "count_hundreds": _count_hundreds}


def _counted(task: str, how: str, count: int, step: int):
    """A task: `count` 3-digit numbers from a start, `step` apart (negative: down)."""
    def generate(rng: random.Random) -> Problem:
        span = abs(step) * (count - 1)
        start = rng.randint(100 + span, 999) if step < 0 else rng.randint(100, 999 - span)
        numbers = range(start, start + step * count, step)
        return Problem(task, f"Count {count} numbers {how} from {start}.", " ".join(map(str, numbers)))
    return generate


# answers of 199, 199, 159 and 179 bytes
COUNT_TASKS = {
    "up": _counted("up", "up", 50, 1),
    "down": _counted("down", "down", 50, -1),
    "by_two": _counted("by_two", "by two", 40, 2),
    "by_five": _counted("by_five", "by five", 45, 5),
}


def _counted_few(task: str, how: str, step: int):
    """Training only: 2-9 numbers, so that most of the answer is its start, read from the prompt."""
    def generate(rng: random.Random) -> Problem:
        return _counted(task, how, rng.randint(2, 9), step)(rng)
    return generate


# `count_train`: the count suite and short counts of each kind, a training mix (its
# held-out set is the count suite's: EVALUATED_AS)
COUNT_TRAIN_TASKS = {
    **COUNT_TASKS,
    **{f"{name}_few": _counted_few(f"{name}_few", how, step)
       for name, how, step in (("up", "up", 1), ("down", "down", -1), ("by_two", "by two", 2),
                               ("by_five", "by five", 5))},
}


PASSAGE_TASKS = {"copy": _copy, "copy_letters": _copy_letters, "upcase": _upcase, "caesar": _caesar, "dashes": _dashes, "replace": _replace,
              "reverse_words": _reverse_words, "chain": _chain}
SUITES = {"short": TASKS, "count": COUNT_TASKS, "count_ranges": COUNT_RANGE_TASKS, "count_train": COUNT_TRAIN_TASKS,
          "passages": PASSAGE_TASKS}
# a training suite whose held-out set (and so its stream's exclusions) is another suite's
EVALUATED_AS = {"count_train": "count"}
HELDOUT_SEEDS = {"short": EVAL_SEED, "count": COUNT_EVAL_SEED, "count_ranges": COUNT_EVAL_SEED,
                 "passages": PASSAGES_EVAL_SEED}


def _suite(suite: str) -> dict:
    if suite not in SUITES:
        raise ValueError(f"suite: expected one of {sorted(SUITES)}, got {suite!r}")
    return SUITES[suite]


def make_problem(rng: random.Random, task: str | None = None, suite: str = "short",
                 answer_bytes: tuple[int, int] | None = None) -> Problem:
    """One problem; `answer_bytes` = (min, max) sets the passages suite's answer length (a training
    curriculum's stage; the held-out set keeps each task's own range)."""
    tasks = _suite(suite)
    generate = tasks[task or rng.choice(sorted(tasks))]
    if answer_bytes is None:
        return generate(rng)
    if suite != "passages":
        raise ValueError("answer_bytes: only the passages suite's tasks take a length range")
    return generate(rng, answer_bytes)


def heldout_problems(per_task: int = HELDOUT_PER_TASK, seed: int | None = None, suite: str = "short") -> list[Problem]:
    """`per_task` distinct problems of every task of `suite`, its evaluation set (its own seed)."""
    suite = EVALUATED_AS.get(suite, suite)
    rng = random.Random(HELDOUT_SEEDS[suite] if seed is None else seed)
    problems: list[Problem] = []
    for task in sorted(_suite(suite)):
        seen: set[str] = set()
        while len(seen) < per_task:
            p = make_problem(rng, task, suite)
            if p.prompt not in seen:
                seen.add(p.prompt)
                problems.append(p)
    return problems


def training_stream(seed: int, exclude: set[str], tasks: list[str] | None = None,
                    weights: dict[str, float] | None = None, suite: str = "short",
                    answer_bytes: tuple[int, int] | None = None):
    """Endless training problems of `suite`, none of whose prompts is in `exclude`.

    Tasks are drawn from `tasks` (default all of the suite) in proportion to
    `weights` (default 1 each).
    """
    rng = random.Random(seed)
    names = sorted(tasks or _suite(suite))
    odds = [(weights or {}).get(name, 1.0) for name in names]
    while True:
        p = make_problem(rng, rng.choices(names, odds)[0], suite, answer_bytes)
        if p.prompt not in exclude:
            yield p


def is_correct(problem: Problem, completion: str) -> bool:
    """Exact match, ignoring surrounding whitespace."""
    return completion.strip() == problem.answer
