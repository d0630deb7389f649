"""Qwen3 (dense) <-> mymoe state-dict adapter (Hugging Face ``Qwen3ForCausalLM``): Llama's tensors plus the
per-head query and key RMSNorm (our ``qk_norm: head``, ``self_attn.{q,k}_norm.weight``), a head_dim apart
from hidden_size / heads, every layer of ours dense. Sliding-window layers are refused."""

from __future__ import annotations

from mymoe.config import ModelConfig
from mymoe.convert.hf_llama import dense_fields, dense_refusals, mlp_from_hf, mlp_to_hf  # noqa: F401

ARCHITECTURE = "Qwen3ForCausalLM"
MODEL_TYPE = "qwen3"
ATTENTION_OPTIONS = {"attention_bias": (True,), "qk_norm": ("head",)}


def refusals(model: ModelConfig) -> list[str]:
    problems = dense_refusals(model, "Qwen3")
    if model.qk_norm != "head":
        problems.append(
            f"qk_norm={model.qk_norm!r}: every Qwen3 attention RMS-normalises each query and key head "
            f"(train with qk_norm: head, or export as llama)"
        )
    return problems


def config(model: ModelConfig) -> dict:
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "intermediate_size": model.intermediate_size,
        "attention_bias": model.attention_bias,
        "use_sliding_window": False,
        "layer_types": ["full_attention"] * model.num_hidden_layers,
    }


def model_fields(hf: dict) -> tuple[dict, list[str]]:
    problems = []
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        problems.append(
            "sliding-window layers (use_sliding_window / layer_types): mymoe's Qwen3 import attends to "
            "the whole context"
        )
    return {**dense_fields(hf, problems), "qk_norm": "head"}, problems
