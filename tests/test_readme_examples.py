"""The README's first example, run as written against the shipped trained model (issue 33).

A user copies it first; it must give right answers, so it must use the
settings the shipped model was trained for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    using = text[text.index("## Using it"):]
    return re.search(r"```python\n(.*?)```", using, re.S).group(1)


def test_the_first_example_uses_the_shipped_model_in_its_trained_range():
    code = readme_example()
    assert 'LLM(model="checkpoints/llada-small"' in code
    assert "max_tokens=32" in code and '"block_length": 8' in code


@pytest.mark.engine
def test_the_first_example_gives_right_answers():
    # VLLM_CONFIGURE_LOGGING=0: vLLM does not log to stdout, so stdout is what the example prints
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0-1", HF_HUB_OFFLINE="1", VLLM_PLUGINS="surelock",
               VLLM_CONFIGURE_LOGGING="0")
    done = subprocess.run([sys.executable, "-c", readme_example()], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # the example prints one answer a line: the demo's arithmetic and reversal prompts
    assert done.stdout.strip().splitlines()[-2:] == ["125", "mllv"], done.stdout[-2000:]
