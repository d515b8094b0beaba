"""Per-request options (diffusion and SureLock): parsing, defaults and validation.

Options arrive as a flat dict (`SamplingParams.extra_args` offline,
`vllm_xargs` on the OpenAI server). Server-wide defaults and limits come from
`--additional-config '{"surelock": {...}}'` (or the `--diffusion-*` flags).
Every error names the option.

Every number a client chooses is bounded here, before the request is
admitted: `gen_length` by the server's `max_gen_length` (and, by the caller,
the context), `steps` by `gen_length` (each step unmasks at least one
position) and by the server's `max_steps`. A request's work is therefore at
most `max_steps` steps over one canvas.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

REMASKING_CHOICES = ("low_confidence", "random")

#: Keys a request may set, with their meaning (used in docs and errors).
OPTION_HELP = {
    "gen_length": "number of generated positions in the canvas (default: max_tokens)",
    "steps": "denoising steps over the whole generation (default: gen_length)",
    "block_length": "positions per semi-autoregressive block (default: 32, or gen_length when 32 does not divide it)",
    "remasking": "which masked positions to unmask each step: low_confidence or random",
}


def length_option(extra_args: Mapping[str, Any] | None) -> str:
    """The request parameter that set the generation length, for error messages."""
    return "gen_length" if "gen_length" in (extra_args or {}) else "max_tokens"


class InvalidDiffusionOption(ValueError):
    """A request's diffusion option is invalid; `option` names it."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(f"invalid diffusion option '{option}': {message}")


@dataclass(frozen=True)
class DiffusionDefaults:
    """Server-wide defaults (`--additional-config '{"surelock": {...}}'`)."""

    block_length: int = 32
    remasking: str = "low_confidence"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "DiffusionDefaults":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        mine = {k: v for k, v in values.items() if k in known}
        defaults = cls(**mine)
        # Validate the defaults with the same rules a request gets.
        _check_positive_int("block_length", defaults.block_length)
        _check_remasking(defaults.remasking)
        return defaults


@dataclass(frozen=True)
class DiffusionLimits:
    """Server-wide caps on what one request may ask for (`--diffusion-max-*`)."""

    max_gen_length: int = 1024
    max_steps: int = 1024

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "DiffusionLimits":
        values = dict(values or {})
        limits = cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
        for f in fields(cls):
            _check_positive_int(f.name, getattr(limits, f.name))
        return limits


@dataclass(frozen=True)
class DiffusionOptions:
    gen_length: int
    steps: int
    block_length: int
    remasking: str = "low_confidence"
    temperature: float = 0.0

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def resolve(
        cls,
        extra_args: Mapping[str, Any] | None,
        *,
        max_tokens: int | None,
        temperature: float,
        defaults: DiffusionDefaults = DiffusionDefaults(),
        limits: DiffusionLimits = DiffusionLimits(),
        ignore_keys: frozenset[str] = frozenset(),
    ) -> "DiffusionOptions":
        """Options of one request, validated; raises InvalidDiffusionOption.

        `ignore_keys` are extra_args keys that belong to other features (e.g.
        SureLock's) and are validated there.
        """
        args = dict(extra_args or {})
        unknown = set(args) - set(OPTION_HELP) - set(ignore_keys)
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidDiffusionOption(
                name, f"unknown option; known options: {sorted(OPTION_HELP)}"
            )

        gen_key = length_option(args)
        gen_length = args.get("gen_length", max_tokens)
        if gen_length is None:
            raise InvalidDiffusionOption(
                "gen_length", "set gen_length or max_tokens"
            )
        _check_positive_int(gen_key, gen_length)
        if gen_length > limits.max_gen_length:
            raise InvalidDiffusionOption(
                gen_key,
                f"the generation length {gen_length} exceeds this server's "
                f"max_gen_length={limits.max_gen_length} (--diffusion-max-gen-length)",
            )

        if "block_length" in args:
            block_length = args["block_length"]
            _check_positive_int("block_length", block_length)
        elif gen_length % defaults.block_length == 0:
            block_length = defaults.block_length
        else:
            block_length = gen_length
        if gen_length % block_length != 0:
            raise InvalidDiffusionOption(
                "block_length",
                f"block_length={block_length} must divide gen_length={gen_length}",
            )
        num_blocks = gen_length // block_length

        steps = args.get("steps", gen_length)
        _check_positive_int("steps", steps)
        if steps > gen_length:
            raise InvalidDiffusionOption(
                "steps",
                f"steps={steps} exceeds gen_length={gen_length}: every step "
                f"unmasks at least one position",
            )
        if steps > limits.max_steps:
            given = f"steps={steps}" if "steps" in args else f"steps (default: gen_length = {steps})"
            raise InvalidDiffusionOption(
                "steps",
                f"{given} exceeds this server's max_steps={limits.max_steps} "
                f"(--diffusion-max-steps); set steps to at most {limits.max_steps}",
            )
        if steps < num_blocks:
            raise InvalidDiffusionOption(
                "steps",
                f"steps={steps} is fewer than the {num_blocks} blocks "
                f"(gen_length={gen_length} / block_length={block_length})",
            )
        if steps % num_blocks != 0:
            raise InvalidDiffusionOption(
                "steps",
                f"steps={steps} must be a multiple of the number of blocks "
                f"({num_blocks}) so that every block gets the same number of steps",
            )
        remasking = args.get("remasking", defaults.remasking)
        _check_remasking(remasking)
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise InvalidDiffusionOption("temperature", f"must be a finite number >= 0, got {temperature!r}")
        return cls(
            gen_length=gen_length,
            steps=steps,
            block_length=block_length,
            remasking=remasking,
            temperature=float(temperature),
        )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidDiffusionOption(name, f"must be a positive integer, got {value!r}")


def _check_remasking(value: Any) -> None:
    if value not in REMASKING_CHOICES:
        raise InvalidDiffusionOption(
            "remasking", f"{value!r} is not one of {list(REMASKING_CHOICES)}"
        )


# -- SureLock (the lock rule itself: lock_rule.py) ------------------------------

#: per-request keys (SamplingParams.extra_args / vllm_xargs)
SURELOCK_KEYS = {
    "surelock": "enabled",
    "surelock_eps": "eps",
    "surelock_confidence_gate": "confidence_gate",
    "surelock_lock_prompt": "lock_prompt",
}


@dataclass(frozen=True)
class SureLockOptions:
    enabled: bool = False
    eps: float = 5e-3
    confidence_gate: float | None = None  # fraction m of Z; None = no gate
    lock_prompt: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_defaults(cls, values: Mapping[str, Any] | None) -> "SureLockOptions":
        """Server defaults: `--additional-config '{"surelock": {"enabled": true, "eps": ...}}'`."""
        values = dict(values or {})
        known = {k: values[k] for k in ("enabled", "eps", "confidence_gate", "lock_prompt") if k in values}
        return cls()._validated(known, names={k: k for k in known})

    def resolve(self, extra_args: Mapping[str, Any] | None) -> "SureLockOptions":
        """This request's options: server defaults overridden by request keys."""
        extra = dict(extra_args or {})
        given = {field: extra[key] for key, field in SURELOCK_KEYS.items() if key in extra}
        names = {field: key for key, field in SURELOCK_KEYS.items()}
        return self._validated(given, names)

    def _validated(self, given: dict[str, Any], names: dict[str, str]) -> "SureLockOptions":
        values = {**self.as_dict(), **given}
        for field in ("enabled", "lock_prompt"):
            values[field] = _as_bool(values[field], names.get(field, field))
        eps = values["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise InvalidDiffusionOption(names.get("eps", "eps"), f"must be a finite number >= 0, got {eps!r}")
        gate = values["confidence_gate"]
        if gate is not None and (
            isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 < gate <= 1
        ):
            raise InvalidDiffusionOption(
                names.get("confidence_gate", "confidence_gate"),
                f"must be a fraction in (0, 1] or null, got {gate!r}",
            )
        values["eps"] = float(eps)
        values["confidence_gate"] = None if gate is None else float(gate)
        return SureLockOptions(**values)


def _as_bool(value: Any, name: str) -> bool:
    """true/false; also 1/0 and "true"/"false", the forms vllm_xargs delivers
    (the OpenAI server's vllm_xargs holds str, int and float values only)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidDiffusionOption(name, f"must be true or false, got {value!r}")
