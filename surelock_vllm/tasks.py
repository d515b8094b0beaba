"""Problems with exactly checkable answers, for training and evaluating the shipped model.

Six tasks (arithmetic, string and list manipulation, lookups), each a
generator of `Problem(task, prompt, answer)` from a `random.Random`. Answers
run from 2 to 21 bytes (the tokenizer is byte-level), so with the end-of-turn
token they cover up to three of the four 8-token blocks of a 32-token
generation. The sizes were cut down until a 4-layer model trained on the CPU
(tools/train_small.py) learned most of them; after that training lookup
is still at chance (docs/eval/eval.md). Plain Python, no torch or vLLM.

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
HELDOUT_PER_TASK = 50


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


def make_problem(rng: random.Random, task: str | None = None) -> Problem:
    return TASKS[task or rng.choice(sorted(TASKS))](rng)


def heldout_problems(per_task: int = HELDOUT_PER_TASK, seed: int = EVAL_SEED) -> list[Problem]:
    """`per_task` distinct problems of every task, the evaluation set."""
    rng = random.Random(seed)
    problems: list[Problem] = []
    for task in sorted(TASKS):
        seen: set[str] = set()
        while len(seen) < per_task:
            p = make_problem(rng, task)
            if p.prompt not in seen:
                seen.add(p.prompt)
                problems.append(p)
    return problems


def training_stream(seed: int, exclude: set[str], tasks: list[str] | None = None,
                    weights: dict[str, float] | None = None):
    """Endless training problems, none of whose prompts is in `exclude`.

    Tasks are drawn from `tasks` (default all) in proportion to `weights`
    (default 1 each).
    """
    rng = random.Random(seed)
    names = sorted(tasks or TASKS)
    odds = [(weights or {}).get(name, 1.0) for name in names]
    while True:
        p = make_problem(rng, rng.choices(names, odds)[0])
        if p.prompt not in exclude:
            yield p


def is_correct(problem: Problem, completion: str) -> bool:
    """Exact match, ignoring surrounding whitespace."""
    return completion.strip() == problem.answer
