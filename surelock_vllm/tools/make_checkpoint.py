"""Build a small random-weight checkpoint in LLaDA-8B-Instruct's exact format.

Same config keys, same weight names, a real (byte-level BPE) tokenizer with
LLaDA's special tokens and chat template, and LLaDA-8B-Instruct's
generation_config (only `<|endoftext|>` as EOS; the engine adds the
end-of-turn stop itself): the files the vLLM plugin and the plain-torch
reference load for the real model.

    python -m surelock_vllm.tools.make_checkpoint checkpoints/llada-tiny
    python -m surelock_vllm.tools.make_checkpoint out/llada-small-126k --preset small-126k
    # a trained checkpoint's weights on LLaDA-8B's vocabulary and special-token ids:
    python -m surelock_vllm.tools.make_checkpoint out/llada-trained-126k --from checkpoints/llada-small
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>",  # EOS and pad, as in LLaDA
    "<|startoftext|>",  # BOS
    "<|mdm_mask|>",  # the mask token
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

# LLaDA-8B-Instruct's chat template (Llama-3 style, BOS on the first turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

PRESETS = {
    # head_dim 32: the smallest head size vLLM's CPU attention kernel takes.
    "tiny": dict(d_model=128, n_heads=4, n_layers=2, mlp_hidden_size=256),
    "small": dict(d_model=256, n_heads=8, n_layers=4, mlp_hidden_size=688),
    # the trained model (tools/train_small.py): wider heads and rope_theta 1e4 give
    # a 4-layer model the positional resolution its copy/reverse tasks need
    "trained": dict(d_model=256, n_heads=4, n_layers=4, mlp_hidden_size=688, rope_theta=10000.0),
    # the "small" body with LLaDA-8B's real vocabulary (126,464 tokens) and
    # special-token ids: the benchmark's measure of the LM head and the lock
    # test at the size users serve
    "small-126k": dict(d_model=256, n_heads=8, n_layers=4, mlp_hidden_size=688, vocab="llada"),
}

# LLaDA-8B-Instruct's vocabulary size and special-token ids (its tokenizer.json)
LLADA_VOCAB_SIZE = 126464
LLADA_SPECIAL_IDS = {
    "<|startoftext|>": 126080,
    "<|endoftext|>": 126081,
    "<|mdm_mask|>": 126336,
    "<|start_header_id|>": 126346,
    "<|end_header_id|>": 126347,
    "<|eot_id|>": 126348,
}


def build_tokenizer(llada_vocab: bool = False):
    """Byte-level BPE over the 256 bytes (no merges) plus LLaDA's specials.

    With `llada_vocab`, the vocabulary has LLaDA-8B's size and the specials sit
    at LLaDA-8B's ids; the ids between are reserved tokens that text never
    encodes to (no merges reach them), so prompts stay byte-level.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {sym: i for i, sym in enumerate(sorted(byte_symbols))}
    if llada_vocab:
        by_id = {i: t for t, i in LLADA_SPECIAL_IDS.items()}
        for i in range(len(vocab), LLADA_VOCAB_SIZE):
            vocab[by_id.get(i, f"<|reserved_{i}|>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        mask_token="<|mdm_mask|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 30
    return fast


def chat_prompt_ids(tokenizer, message: str) -> list[int]:
    """Token ids of one user turn plus the assistant header, as `LLM.chat` builds the prompt."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True
    )
    # some transformers versions return a BatchEncoding here, others a plain list
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def llada_config(tokenizer, preset: dict, max_sequence_length: int) -> dict:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)
    return {
        # Keys and values as in GSAI-ML/LLaDA-8B-Instruct's config.json, sizes scaled.
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": preset["d_model"],
        "embedding_dropout": 0.0,
        "embedding_size": vocab_size,
        "eos_token_id": ids["<|endoftext|>"],
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": ids["<|mdm_mask|>"],
        "max_sequence_length": max_sequence_length,
        "mlp_hidden_size": preset["mlp_hidden_size"],
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": preset["n_heads"],
        "n_kv_heads": preset["n_heads"],
        "n_layers": preset["n_layers"],
        "pad_token_id": ids["<|endoftext|>"],
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": preset.get("rope_theta", 500000.0),
        "scale_logits": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": vocab_size,
        "weight_tying": False,
    }


def random_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the checkpoint's names.

    Scaled so that a random model is confident and position-dependent: near-
    uniform posteriors would make unmasking order depend on rounding noise.
    """
    g = torch.Generator().manual_seed(seed)
    d, h, v = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    prefix = "model.transformer"
    sd = {f"{prefix}.wte.weight": normal(v, d, std=1.0)}
    for i in range(config["n_layers"]):
        b = f"{prefix}.blocks.{i}"
        sd[f"{b}.attn_norm.weight"] = 1.0 + normal(d, std=0.1)
        for name in ("q_proj", "k_proj", "v_proj", "attn_out"):
            sd[f"{b}.{name}.weight"] = normal(d, d, std=1.5 / d**0.5)
        sd[f"{b}.ff_norm.weight"] = 1.0 + normal(d, std=0.1)
        sd[f"{b}.ff_proj.weight"] = normal(h, d, std=1.0 / d**0.5)
        sd[f"{b}.up_proj.weight"] = normal(h, d, std=1.0 / d**0.5)
        sd[f"{b}.ff_out.weight"] = normal(d, h, std=1.0 / h**0.5)
    sd[f"{prefix}.ln_f.weight"] = torch.ones(d)
    sd[f"{prefix}.ff_out.weight"] = normal(v, d, std=4.0 / d**0.5)
    # The mask token is never a prediction target in LLaDA.
    sd[f"{prefix}.ff_out.weight"][config["mask_token_id"]] = -sd[f"{prefix}.ff_out.weight"][config["mask_token_id"]].abs()
    return sd


def generation_config(tokenizer) -> dict:
    """GSAI-ML/LLaDA-8B-Instruct's generation_config.json: one EOS id, `<|endoftext|>`
    (126081), though a chat turn ends with `<|eot_id|>` (126348)."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "transformers_version": "4.46.3",
    }


def write_checkpoint(
    out: Path,
    preset: str = "tiny",
    seed: int = 0,
    max_sequence_length: int = 1024,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    tokenizer = build_tokenizer(llada_vocab=PRESETS[preset].get("vocab") == "llada")
    return _write(Path(out), tokenizer, PRESETS[preset], max_sequence_length, state_dict, seed)


def _write(out: Path, tokenizer, shape: dict, max_sequence_length: int,
           state_dict: dict[str, torch.Tensor] | None, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    config = llada_config(tokenizer, shape, max_sequence_length)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
    if state_dict is None:
        state_dict = random_state_dict(config, seed)
    state_dict = {k: t.to(torch.bfloat16).contiguous() for k, t in state_dict.items()}
    save_file(state_dict, out / "model.safetensors", metadata={"format": "pt"})
    return out


def write_on_llada_vocab(src: Path, out: Path) -> Path:
    """`src`'s weights with LLaDA-8B's vocabulary (126,464 ids) and special-token ids.

    Every token of `src` keeps its embedding and LM-head row under its id in
    the new vocabulary (bytes keep theirs; the specials move to 126080-126348).
    The reserved ids between are never input (no text encodes to them) and
    get the LM-head row of the mask token, which training never targets, so
    they are not predicted either. A trained model so keeps its answers and
    its end-of-turn habits at the real vocabulary's cost and ids.
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    src = Path(src)
    old_config = json.loads((src / "config.json").read_text())
    old_vocab = AutoTokenizer.from_pretrained(src).get_vocab()
    tokenizer = build_tokenizer(llada_vocab=True)
    new_vocab = tokenizer.get_vocab()
    old_ids = torch.tensor(list(old_vocab.values()))
    new_ids = torch.tensor([new_vocab[t] for t in old_vocab])
    state = load_file(src / "model.safetensors")
    wte, head = "model.transformer.wte.weight", "model.transformer.ff_out.weight"
    embedding = torch.zeros((LLADA_VOCAB_SIZE, state[wte].shape[1]), dtype=state[wte].dtype)
    embedding[new_ids] = state[wte][old_ids]
    lm_head = state[head][old_config["mask_token_id"]].repeat(LLADA_VOCAB_SIZE, 1)
    lm_head[new_ids] = state[head][old_ids]
    state[wte], state[head] = embedding, lm_head
    shape = {
        "d_model": old_config["d_model"], "n_heads": old_config["n_heads"], "n_layers": old_config["n_layers"],
        "mlp_hidden_size": old_config["mlp_hidden_size"], "rope_theta": old_config["rope_theta"],
    }
    return _write(Path(out), tokenizer, shape, old_config["max_sequence_length"], state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=1024)
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="re-lay this checkpoint's weights on LLaDA-8B's vocabulary and special-token ids "
                             "(--preset and --seed do not apply)")
    args = parser.parse_args()
    if args.source is not None:
        path = write_on_llada_vocab(args.source, args.out)
    else:
        path = write_checkpoint(args.out, args.preset, args.seed, args.max_sequence_length)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
