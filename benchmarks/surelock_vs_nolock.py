"""Benchmark entry point; see `surelock_vllm/bench.py` (also `surelock-bench`)."""

import sys

from surelock_vllm.bench import main

if __name__ == "__main__":
    sys.exit(main())
