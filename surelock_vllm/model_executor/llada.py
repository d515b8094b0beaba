"""LLaDA (`LLaDAModelLM`) as a native vLLM model.

Built like vLLM's llama.py, from vLLM's tensor-parallel layers, with one
difference that matters: attention is bidirectional. The layers are ordinary
`DECODER` attention layers (so K/V live in vLLM's paged KV cache), and the
diffusion runner builds their metadata with `causal=False`.

The forward pass takes a flat list of rows (tokens with their canvas
positions) of any number of requests. Nothing in it assumes the rows form a
whole canvas: the SureLock runner feeds only unlocked rows, whose queries then
attend over the request's whole canvas in the paged KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from surelock_vllm.configuration_llada import LLaDAConfig
from surelock_vllm.engine.attention import surelock_attention_backend


class LLaDAMLP(nn.Module):
    """SiLU-gated MLP: ff_out(silu(ff_proj(x)) * up_proj(x))."""

    def __init__(self, config: LLaDAConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        # ff_proj is the gate, up_proj the value: merged, in that order.
        self.gate_up_proj = MergedColumnParallelLinear(
            config.d_model,
            [config.mlp_hidden_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.ff_out = RowParallelLinear(
            config.mlp_hidden_size,
            config.d_model,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.ff_out",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.ff_out(self.act_fn(gate_up))
        return x


class LLaDAAttention(nn.Module):
    """Bidirectional multi-head attention over the request's paged KV cache."""

    def __init__(
        self,
        config: LLaDAConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        self.num_heads = config.n_heads // tp_size
        self.num_kv_heads = max(1, config.n_kv_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.d_model,
            self.head_dim,
            config.n_heads,
            config.n_kv_heads,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.attn_out = RowParallelLinear(
            config.n_heads * self.head_dim,
            config.d_model,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.attn_out",
        )
        # fp32 cos/sin cache, applied to fp32 q and k (forward)
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_sequence_length,
            is_neox_style=True,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            dtype=torch.float32,
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
            # Scattered non-causal rows over paged KV (engine/attention.py).
            attn_backend=surelock_attention_backend(),
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # LLaDA rotates in fp32 (rope_full_precision: true). vLLM's rotary
        # embedding casts its cos/sin cache to the activations' dtype, so under
        # bf16 it is handed fp32 copies and the result is cast back.
        q, k = self.rotary_emb(positions, q.float(), k.float())
        q, k = q.to(v.dtype), k.to(v.dtype)
        attn_output = self.attn(q, k, v)
        output, _ = self.attn_out(attn_output)
        return output


class LLaDABlock(nn.Module):
    def __init__(
        self,
        config: LLaDAConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.self_attn = LLaDAAttention(config, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.ff_norm = RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.mlp = LLaDAMLP(config, quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(positions, self.attn_norm(hidden_states))
        return hidden_states + self.mlp(self.ff_norm(hidden_states))


class LLaDATransformer(nn.Module):
    """`model.transformer` of the checkpoint: wte, blocks, ln_f."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: LLaDAConfig = vllm_config.model_config.hf_config
        self.wte = VocabParallelEmbedding(
            config.embedding_size, config.d_model, prefix=f"{prefix}.wte"
        )
        self.blocks = nn.ModuleList(
            LLaDABlock(
                config,
                vllm_config.cache_config,
                vllm_config.quant_config,
                prefix=f"{prefix}.blocks.{i}",
            )
            for i in range(config.n_layers)
        )
        self.ln_f = RMSNorm(config.d_model, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.wte(input_ids)
        for block in self.blocks:
            hidden_states = block(positions, hidden_states)
        return self.ln_f(hidden_states)


class LLaDAModelLM(nn.Module):
    """vLLM model class for `GSAI-ML/LLaDA-8B-Instruct` and LLaDA-format checkpoints."""

    # checkpoint name piece -> (vLLM parameter, shard id)
    stacked_params_mapping = [
        (".self_attn.qkv_proj", ".q_proj", "q"),
        (".self_attn.qkv_proj", ".k_proj", "k"),
        (".self_attn.qkv_proj", ".v_proj", "v"),
        (".mlp.gate_up_proj", ".ff_proj", 0),
        (".mlp.gate_up_proj", ".up_proj", 1),
    ]
    # checkpoint name piece -> vLLM module name piece (unstacked weights)
    renamed_params = [
        (".attn_out.", ".self_attn.attn_out."),
        (".ff_out.", ".mlp.ff_out."),
    ]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: LLaDAConfig = vllm_config.model_config.hf_config
        config.check_supported()
        self.config = config
        self.transformer = LLaDATransformer(
            vllm_config=vllm_config, prefix=f"{prefix}transformer"
        )
        self.lm_head = ParallelLMHead(
            config.embedding_size,
            config.d_model,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}lm_head",
        )
        self.logits_processor = LogitsProcessor(config.vocab_size, config.embedding_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for ckpt_name, tensor in weights:
            name = self._vllm_name(ckpt_name)
            for param_piece, ckpt_piece, shard_id in self.stacked_params_mapping:
                if ckpt_piece in name and ".blocks." in name:
                    name = name.replace(ckpt_piece, param_piece)
                    param = params[name]
                    param.weight_loader(param, tensor, shard_id)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded

    @classmethod
    def _vllm_name(cls, ckpt_name: str) -> str:
        """`model.transformer.blocks.3.attn_out.weight` -> `transformer.blocks.3.self_attn.attn_out.weight`."""
        name = ckpt_name.removeprefix("model.")
        if name == "transformer.ff_out.weight":
            return "lm_head.weight"
        if ".blocks." in name:
            for old, new in cls.renamed_params:
                name = name.replace(old, new)
        return name
