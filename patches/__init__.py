"""Changes to vLLM behaviour that its public plugin hooks cannot express.

One module per concern; each states what it changes, why, the vLLM versions it
was written for, and what upstream change would retire it. `apply_all()` runs
from the plugin's `register()` in every vLLM process, after the version guard
(`surelock_vllm.vllm_internals.check_vllm_version`); each patch is idempotent.

Installed as `surelock_vllm.patches` (see pyproject.toml).
"""

from __future__ import annotations

from surelock_vllm.patches import (
    cli_flags,
    default_gen_length,
    request_validation,
    surelock_metrics,
    vllm_cpu_cli_version,
    vllm_xargs_booleans,
)

PATCHES = (
    cli_flags, default_gen_length, request_validation, surelock_metrics, vllm_cpu_cli_version,
    vllm_xargs_booleans,
)


def apply_all() -> None:
    for patch in PATCHES:
        patch.apply()


def applied() -> dict[str, bool]:
    return {patch.__name__.rsplit(".", 1)[-1]: patch.is_applied() for patch in PATCHES}
