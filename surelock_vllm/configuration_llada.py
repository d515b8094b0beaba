"""The HF config of LLaDA (`model_type: "llada"`), without remote code.

LLaDA checkpoints ship an OLMo-style config (`d_model`, `n_heads`, ...) and a
`configuration_llada.py` that transformers would only run with
`trust_remote_code`. This class reads the same keys, and exposes the standard
names (`hidden_size`, `num_attention_heads`, ...) that vLLM's ModelConfig reads.
"""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    # vLLM and transformers read the standard names; LLaDA's files use OLMo's.
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_hidden_size: int | None = 12288,
        mlp_ratio: int = 4,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        max_sequence_length: int = 4096,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        mask_token_id: int = 126336,
        eos_token_id: int = 126081,
        pad_token_id: int = 126081,
        activation_type: str = "silu",
        block_type: str = "llama",
        layer_norm_type: str = "rms",
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        weight_tying: bool = False,
        rope: bool = True,
        alibi: bool = False,
        scale_logits: bool = False,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = (
            mlp_hidden_size if mlp_hidden_size is not None else mlp_ratio * d_model
        )
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size if embedding_size else vocab_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.mask_token_id = mask_token_id
        self.activation_type = activation_type
        self.block_type = block_type
        self.layer_norm_type = layer_norm_type
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.weight_tying = weight_tying
        self.rope = rope
        self.alibi = alibi
        self.scale_logits = scale_logits
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=weight_tying,
            **kwargs,
        )

    @property
    def num_key_value_heads(self) -> int:
        return self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def check_supported(self) -> None:
        """LLaDA-8B's variant is the only one the model classes implement."""
        unsupported = {
            "block_type": (self.block_type, "llama"),
            "activation_type": (self.activation_type, "silu"),
            "layer_norm_type": (self.layer_norm_type, "rms"),
            "include_bias": (self.include_bias, False),
            "include_qkv_bias": (self.include_qkv_bias, False),
            "rope": (self.rope, True),
            "alibi": (self.alibi, False),
            "scale_logits": (self.scale_logits, False),
        }
        for key, (value, expected) in unsupported.items():
            if value != expected:
                raise ValueError(
                    f"LLaDA config key {key!r}={value!r} is not supported "
                    f"(only {expected!r}, as in LLaDA-8B)"
                )
