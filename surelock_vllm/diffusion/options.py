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
#: block caches (Fast-dLLM's): which rows a step computes besides the locks (block_cache.py)
KV_CACHE_CHOICES = ("none", "prefix", "dual")

#: Keys a request may set, with their meaning (used in docs and errors).
OPTION_HELP = {
    "gen_length": "number of generated positions in the canvas (default: max_tokens)",
    "steps": "denoising steps over the whole generation (default: gen_length)",
    "block_length": "positions per semi-autoregressive block (default: 32, or gen_length when 32 does not divide it)",
    "remasking": "which masked positions to unmask each step: low_confidence or random",
    "confidence_threshold": (
        "adaptive unmasking (Fast-dLLM's parallel decoding): each step unmasks every masked position "
        "of the block whose confidence is at least this, at least one, and enough to finish the block "
        "within its steps (steps becomes an upper bound); 0 or null: the fixed schedule (default)"
    ),
    "cfg_scale": (
        "classifier-free guidance as in LLaDA's generate: logits = u + (cfg_scale + 1) (c - u), u from "
        "a second canvas with the prompt masked (twice the rows a step; not with SureLock); 0: off (default)"
    ),
    "kv_cache": (
        "Fast-dLLM's block cache: none (default); prefix: after each block's first step, compute only the "
        "block and what follows it, the prefix's K/V kept from that step; dual: compute only the block, "
        "prefix and suffix K/V kept from the block's first step (not with cfg_scale)"
    ),
    "logits_eos_inf": (
        "LLaDA's logits_eos_inf: the end-of-text token's logit is -inf, so it is never predicted (default false)"
    ),
    "confidence_eos_eot_inf": (
        "LLaDA's confidence_eos_eot_inf: positions predicted as end-of-text or end-of-turn are unmasked "
        "after every other masked position of their block (default false)"
    ),
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
    confidence_threshold: float | None = None
    kv_cache: str = "none"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "DiffusionDefaults":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        mine = {k: v for k, v in values.items() if k in known}
        defaults = cls(**mine)
        # Validate the defaults with the same rules a request gets.
        _check_positive_int("block_length", defaults.block_length)
        _check_remasking(defaults.remasking)
        threshold = _check_threshold("confidence_threshold", defaults.confidence_threshold)
        if threshold is not None and defaults.remasking == "random":
            raise InvalidDiffusionOption("confidence_threshold", _RANDOM_HAS_NO_CONFIDENCE)
        _check_kv_cache(defaults.kv_cache)
        return cls(defaults.block_length, defaults.remasking, threshold, defaults.kv_cache)


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
    # adaptive unmasking: None, the fixed schedule; else steps_per_block is an upper bound
    confidence_threshold: float | None = None
    # classifier-free guidance (LLaDA's cfg_scale): 0, off
    cfg_scale: float = 0.0
    # Fast-dLLM's block cache (block_cache.py): none, prefix or dual
    kv_cache: str = "none"
    # LLaDA's EOS options (Appendix B.4 of the LLaDA paper)
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        """Steps per block: exactly (the fixed schedule), or at most (a confidence threshold)."""
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
        one_block: bool = False,
    ) -> "DiffusionOptions":
        """Options of one request, validated; raises InvalidDiffusionOption.

        `ignore_keys` are extra_args keys that belong to other features (e.g.
        SureLock's) and are validated there. `one_block`: block_length
        defaults to gen_length (the SureLock paper's setting, its preset).
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
        elif one_block:
            block_length = gen_length
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
        if "confidence_threshold" in args:
            threshold = _check_threshold("confidence_threshold", args["confidence_threshold"])
        else:
            threshold = defaults.confidence_threshold if remasking == "low_confidence" else None
        if threshold is not None and remasking == "random":
            raise InvalidDiffusionOption("confidence_threshold", _RANDOM_HAS_NO_CONFIDENCE)
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise InvalidDiffusionOption("temperature", f"must be a finite number >= 0, got {temperature!r}")
        cfg_scale = args.get("cfg_scale", 0.0)
        if (
            isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float))
            or not math.isfinite(cfg_scale) or not 0 <= cfg_scale <= MAX_CFG_SCALE
        ):
            raise InvalidDiffusionOption(
                "cfg_scale", f"must be a number in [0, {MAX_CFG_SCALE:g}] (0: no guidance), got {cfg_scale!r}"
            )
        kv_cache = args.get("kv_cache", defaults.kv_cache)
        _check_kv_cache(kv_cache)
        if kv_cache != "none" and cfg_scale > 0:
            raise InvalidDiffusionOption(
                "kv_cache", f"kv_cache={kv_cache!r} is not combined with classifier-free guidance (cfg_scale="
                f"{cfg_scale:g}): the unconditional canvas has no block cache; use kv_cache=none or cfg_scale=0")
        return cls(
            gen_length=gen_length,
            steps=steps,
            block_length=block_length,
            remasking=remasking,
            temperature=float(temperature),
            confidence_threshold=threshold,
            cfg_scale=float(cfg_scale),
            kv_cache=kv_cache,
            logits_eos_inf=_as_bool(args.get("logits_eos_inf", False), "logits_eos_inf"),
            confidence_eos_eot_inf=_as_bool(args.get("confidence_eos_eot_inf", False), "confidence_eos_eot_inf"),
        )


#: guidance scales past this only amplify rounding noise (LLaDA's evaluations use 0.5 to 3)
MAX_CFG_SCALE = 100.0


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidDiffusionOption(name, f"must be a positive integer, got {value!r}")


_RANDOM_HAS_NO_CONFIDENCE = (
    "a confidence threshold unmasks by confidence; remasking=random ranks positions by a random "
    "score instead, so the two cannot be combined (use remasking=low_confidence, or "
    "confidence_threshold=0 for the fixed schedule)"
)


def _check_threshold(name: str, value: Any) -> float | None:
    """A confidence threshold in (0, 1]; 0 or None: off."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InvalidDiffusionOption(name, f"must be a number in [0, 1] (0 or null: off), got {value!r}")
    return float(value) if value > 0 else None


def _check_kv_cache(value: Any) -> None:
    if value not in KV_CACHE_CHOICES:
        raise InvalidDiffusionOption("kv_cache", f"{value!r} is not one of {list(KV_CACHE_CHOICES)}")


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
    "surelock_candidates": "candidates",
    "surelock_kl_test": "kl_test",
    "surelock_preset": "preset",
}

#: when the lock candidates Z are formed, relative to the step's unmasking
CANDIDATE_CHOICES = (
    # Z before the step unmasks: a token unmasked at step t is first tested at
    # t+1, and locks with the K/V its own token produced
    "before_unmask",
    # the paper's Algorithm 1 (lines 16, 20): Z after this step's unmasking, so
    # a token unmasked at step t can lock at t, frozen with the K/V its [MASK]
    # input produced at t
    "after_unmask",
)
#: the sure test on the step-wise KL: D < eps, or D <= eps (Algorithm 1, line 23)
KL_TEST_CHOICES = ("<", "<=")
#: what a preset sets (explicit keys still win); the paper's experiments also use
#: block_length = steps = gen_length, which the request's diffusion defaults take
PRESETS = {
    "paper": {"enabled": True, "candidates": "after_unmask", "kl_test": "<=", "confidence_gate": 0.2},
}


@dataclass(frozen=True)
class SureLockOptions:
    enabled: bool = False
    eps: float = 5e-3
    confidence_gate: float | None = None  # fraction m of Z; None = no gate
    lock_prompt: bool = True
    candidates: str = "before_unmask"
    kl_test: str = "<"
    preset: str | None = None  # "paper"; recorded so the diffusion defaults can follow it

    @property
    def after_unmask(self) -> bool:
        return self.candidates == "after_unmask"

    @property
    def inclusive(self) -> bool:
        return self.kl_test == "<="

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_defaults(cls, values: Mapping[str, Any] | None) -> "SureLockOptions":
        """Server defaults: `--additional-config '{"surelock": {"enabled": true, "eps": ...}}'`."""
        values = dict(values or {})
        known = {k: values[k] for k in (f.name for f in fields(cls)) if k in values}
        return cls()._validated(known, names={k: k for k in known})

    def resolve(self, extra_args: Mapping[str, Any] | None) -> "SureLockOptions":
        """This request's options: server defaults overridden by request keys."""
        extra = dict(extra_args or {})
        given = {field: extra[key] for key, field in SURELOCK_KEYS.items() if key in extra}
        names = {field: key for key, field in SURELOCK_KEYS.items()}
        return self._validated(given, names)

    def _validated(self, given: dict[str, Any], names: dict[str, str]) -> "SureLockOptions":
        preset = given["preset"] if "preset" in given else self.preset
        if preset is not None and preset not in tuple(PRESETS):
            raise InvalidDiffusionOption(
                names.get("preset", "preset"), f"{preset!r} is not one of {sorted(PRESETS)} (or null)"
            )
        # a preset's values under the explicit ones (a server preset under a request's keys)
        preset_values = PRESETS[preset] if "preset" in given and preset is not None else {}
        values = {**self.as_dict(), **preset_values, **given}
        for field, choices in (("candidates", CANDIDATE_CHOICES), ("kl_test", KL_TEST_CHOICES)):
            if values[field] not in choices:
                raise InvalidDiffusionOption(
                    names.get(field, field), f"{values[field]!r} is not one of {list(choices)}"
                )
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
