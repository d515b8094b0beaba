"""Server-wide settings of a LLaDA engine, parsed once.

They arrive as `--additional-config '{"surelock": {...}}'` (the engine's only
channel for plugin settings; the `--plugin`/`--surelock-*`/`--diffusion-*`
flags of patches/cli_flags.py fold into it). The scheduler, the API server's
request validation and the runner all read them through `ServerSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from surelock_vllm.diffusion.options import DiffusionDefaults, DiffusionLimits, SureLockOptions

#: settings keys that are not per-request defaults or limits
DEBUG_KEYS = ("trace",)  # record per-step rows and locked K/V (tests, debugging)


def _keys(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


SERVER_SETTING_KEYS = (
    *_keys(DiffusionDefaults),  # block_length, remasking
    *_keys(DiffusionLimits),  # max_gen_length, max_steps
    *_keys(SureLockOptions),  # enabled, eps, confidence_gate, lock_prompt, candidates, kl_test, preset
    *DEBUG_KEYS,
)


@dataclass(frozen=True)
class ServerSettings:
    diffusion: DiffusionDefaults = DiffusionDefaults()
    limits: DiffusionLimits = DiffusionLimits()
    surelock: SureLockOptions = SureLockOptions()
    trace: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "ServerSettings":
        """Parse and validate; unknown keys are an error naming them."""
        values = dict(values or {})
        unknown = set(values) - set(SERVER_SETTING_KEYS)
        if unknown:
            raise ValueError(
                f"--additional-config surelock: unknown keys {sorted(unknown)}; "
                f"known: {list(SERVER_SETTING_KEYS)}"
            )
        return cls(
            diffusion=DiffusionDefaults.from_mapping(values),
            limits=DiffusionLimits.from_mapping(values),
            surelock=SureLockOptions.from_defaults(values),
            trace=bool(values.get("trace", False)),
        )

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "ServerSettings":
        return cls.from_mapping((vllm_config.additional_config or {}).get("surelock"))
