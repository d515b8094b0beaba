"""LLaDA's HF config parses without remote code, with the real model's shapes."""

import json

import pytest
from transformers import AutoConfig

from conftest import CHECKPOINT, FIXTURES
from surelock_vllm.configuration_llada import LLaDAConfig

REAL = FIXTURES / "llada-8b-instruct"


@pytest.fixture(autouse=True)
def _registered():
    AutoConfig.register("llada", LLaDAConfig, exist_ok=True)


def test_real_llada_8b_config_parses_with_its_shapes():
    config = AutoConfig.from_pretrained(REAL)  # no trust_remote_code
    assert isinstance(config, LLaDAConfig)
    assert config.architectures == ["LLaDAModelLM"]
    assert (config.num_hidden_layers, config.hidden_size) == (32, 4096)
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 32)  # no GQA
    assert config.head_dim == 128
    assert config.vocab_size == config.embedding_size == 126464
    assert config.intermediate_size == 12288
    assert config.mask_token_id == 126336
    assert config.eos_token_id == 126081
    assert config.max_position_embeddings == 4096
    assert config.rope_theta == 500000.0
    config.check_supported()


def test_vllm_model_config_reads_llada_shapes():
    """vLLM's own ModelConfig resolves the architecture and sizes of the real config."""
    import surelock_vllm

    surelock_vllm.register()
    from vllm.config import ModelConfig

    mc = ModelConfig(model=str(REAL), tokenizer=str(CHECKPOINT), dtype="bfloat16", skip_tokenizer_init=True)
    assert mc.architecture == "LLaDAModelLM"
    assert mc.get_hidden_size() == 4096
    assert mc.get_head_size() == 128
    assert mc.get_total_num_kv_heads() == 32
    assert mc.get_vocab_size() == 126464
    assert mc.max_model_len == 4096


def test_shipped_checkpoint_uses_the_real_keys_and_weight_names():
    from safetensors import safe_open

    real = json.loads((REAL / "config.json").read_text())
    tiny = json.loads((CHECKPOINT / "config.json").read_text())
    assert set(real) <= set(tiny)
    with safe_open(CHECKPOINT / "model.safetensors", "pt") as f:
        names = set(f.keys())
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    for i in range(tiny["n_layers"]):
        for piece in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"):
            expected.add(f"model.transformer.blocks.{i}.{piece}.weight")
    assert names == expected


def test_unsupported_variant_is_refused_by_name():
    config = LLaDAConfig(block_type="sequential")
    with pytest.raises(ValueError, match="block_type"):
        config.check_supported()


@pytest.mark.parametrize(("override", "file_temperature", "expected"), [
    ({}, None, 0.0),  # LLaDA's default, where vLLM's is 1.0
    ({"temperature": 0.7}, None, 0.7),  # --override-generation-config wins
    ({}, 0.6, 0.6),  # so does a temperature in the checkpoint's generation_config.json
])
def test_config_hook_defaults_the_temperature_to_zero(tmp_path, override, file_temperature, expected):
    import shutil

    import surelock_vllm
    from surelock_vllm.engine.config_hook import default_temperature_zero

    surelock_vllm.register()
    from vllm.config import ModelConfig

    model = tmp_path / "model"
    shutil.copytree(CHECKPOINT, model)
    if file_temperature is not None:
        path = model / "generation_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "temperature": file_temperature}))
    mc = ModelConfig(model=str(model), dtype="float32", skip_tokenizer_init=True,
                     override_generation_config=dict(override))
    default_temperature_zero(mc)
    assert mc.get_diff_sampling_param().get("temperature") == expected
