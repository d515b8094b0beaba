"""LLaDA's end-of-text and end-of-turn token ids, read once from the checkpoint.

LLaDA-8B-Instruct ends an assistant turn with `<|eot_id|>` (126348) and pads
the rest of the canvas with `<|endoftext|>` (126081), but its
generation_config lists only 126081 as EOS, and vLLM takes its stop tokens
from generation_config alone. The scheduler adds the end-of-turn token to each
request's stop tokens (unless it sets `ignore_eos`), and the runner needs both
ids for `confidence_eos_eot_inf`.
"""

from __future__ import annotations

from dataclasses import dataclass

END_OF_TURN_TOKEN = "<|eot_id|>"


@dataclass(frozen=True)
class SpecialTokens:
    eos_id: int | None  # <|endoftext|>: the config's eos_token_id
    eot_id: int | None  # <|eot_id|>, when the tokenizer has it


def special_tokens(model_config) -> SpecialTokens:
    """The ids of a LLaDA engine's model (its tokenizer is loaded once per process)."""
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    eos_id = getattr(model_config.hf_config, "eos_token_id", None)
    tokenizer = cached_tokenizer_from_config(model_config)  # None with --skip-tokenizer-init
    eot_id = None
    if tokenizer is not None:
        eot_id = tokenizer.get_vocab().get(END_OF_TURN_TOKEN)
    return SpecialTokens(eos_id=eos_id, eot_id=eot_id)
