"""The model as plain PyTorch that runs in one CPU process: layers, attention, the MoE layer, the
Transformer. Parallelism is applied from outside by handing the MoE layers a different dispatcher."""

from mymoe.model.attention import Attention, KVCache
from mymoe.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from mymoe.model.transformer import Block, CausalLMOutput, MoECausalLM, MoETransformer

__all__ = [
    "Attention",
    "Block",
    "CausalLMOutput",
    "KVCache",
    "MoECausalLM",
    "MoETransformer",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
]
