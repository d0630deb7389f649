"""Llama <-> mymoe state-dict adapter (Hugging Face ``LlamaForCausalLM``): a dense model, every layer of ours
dense (first_k_dense_replace = num_hidden_layers).

    model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}   = the same names (bias: attention_bias)
    model.layers.N.mlp.{gate,up,down}_proj.weight           = the same names (our dense SwiGLU)

Such a model trains and generates as it is, and is what ``mymoe-convert upcycle`` turns into an MoE.
Llama's MLP biases (mlp_bias) have no place in ours and are refused.
"""

from __future__ import annotations

from mymoe.config import ModelConfig
from mymoe.convert.hf_experts import dense_mlp_from_hf

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
ATTENTION_OPTIONS = {"attention_bias": (True,)}


def dense_refusals(model: ModelConfig, family: str) -> list[str]:
    if model.first_k_dense_replace != model.num_hidden_layers:
        return [
            f"first_k_dense_replace={model.first_k_dense_replace} of {model.num_hidden_layers} layers: {family} "
            f"is a dense model, without MoE layers (export an MoE as mixtral, qwen2_moe, qwen3_moe, olmoe or "
            f"deepseek_v2/v3)"
        ]
    if model.attention_type != "gqa":
        return [f"attention_type={model.attention_type}: {family} has grouped-query attention"]
    return []


def dense_fields(hf: dict, problems: list) -> dict:
    """Our model fields of a dense Hugging Face model: every layer dense, the MoE section unused."""
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true: mymoe's MLPs have no biases")
    return {
        "intermediate_size": hf["intermediate_size"],
        "first_k_dense_replace": hf["num_hidden_layers"],
        "attention_bias": bool(hf.get("attention_bias", False)),
    }


def refusals(model: ModelConfig) -> list[str]:
    return dense_refusals(model, "Llama")


def config(model: ModelConfig) -> dict:
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "intermediate_size": model.intermediate_size,
        "attention_bias": model.attention_bias,
        "mlp_bias": False,
        "pretraining_tp": 1,
    }


def model_fields(hf: dict) -> tuple[dict, list[str]]:
    problems = []
    if (hf.get("pretraining_tp") or 1) != 1:
        problems.append(
            f"pretraining_tp={hf['pretraining_tp']}: transformers then splits the projections into "
            f"slices; save the model with pretraining_tp=1"
        )
    return dense_fields(hf, problems), problems


def mlp_to_hf(prefix: str, mlp: dict) -> dict:
    return {f"{prefix}.mlp.{name}": value for name, value in mlp.items()}


def mlp_from_hf(prefix: str, tensors: dict, num_experts: int, is_moe: bool) -> dict:
    return dense_mlp_from_hf(f"{prefix}.mlp", tensors)
