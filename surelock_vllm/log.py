"""Loggers that print the way vLLM's own do.

vLLM configures handlers on its `vllm` logger only, so a plugin module's
`init_logger(__name__)` logs nowhere below WARNING. Plugin loggers live under
`vllm.surelock.*` instead: same format, same `VLLM_LOGGING_LEVEL`.
"""

from __future__ import annotations

import logging


def get_logger(module: str) -> logging.Logger:
    from vllm.logger import init_logger

    return init_logger("vllm.surelock." + module.removeprefix("surelock_vllm.").removeprefix("engine."))
