"""Hugging Face export and import: pick the architecture, write or read config.json + model.safetensors.

Attention, norms, embedding and head have the same names in mymoe and in every supported architecture
(``model.layers.N.self_attn.q_proj.weight`` ...), so only each layer's ``mlp`` goes through the
per-architecture adapter (hf_<family>.py), and for DeepSeek-V2/V3 the rotary rows of the attention
weights (``attention_to_hf`` / ``attention_from_hf``). Attention biases and q/k norms keep their names too;
an adapter's ATTENTION_OPTIONS says which of them its architecture has. With a tokenizer the export also
holds files AutoTokenizer loads with our ids and the special ids transformers' generate needs
(hf_tokenizer). The multi-token prediction
head and the candidate head are not written: no supported architecture runs one in transformers. Export writes the Hub's layout
(one tensor per expert, as ``save_pretrained`` writes it); import reads that layout and also the fused
``experts.gate_up_proj`` / ``experts.down_proj`` one. A model whose computation the target cannot
reproduce exactly is refused with every reason, and nothing is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mymoe.checkpoint.storage import CheckpointError
from mymoe.config import Config, ConfigError, config_from_dict, validate
from mymoe.convert import (
    hf_deepseek_v2,
    hf_deepseek_v3,
    hf_gpt_oss,
    hf_granitemoe,
    hf_llama,
    hf_mixtral,
    hf_olmoe,
    hf_qwen2_moe,
    hf_qwen3,
    hf_qwen3_moe,
    hf_tokenizer,
)
from mymoe.convert.atomic import atomic_output
from mymoe.convert.consolidate import model_tensors, save_weights
from mymoe.model import MoECausalLM

ADAPTERS = {
    "mixtral": hf_mixtral,
    "qwen2_moe": hf_qwen2_moe,
    "qwen3_moe": hf_qwen3_moe,
    "olmoe": hf_olmoe,
    "deepseek_v2": hf_deepseek_v2,
    "deepseek_v3": hf_deepseek_v3,
    "granitemoe": hf_granitemoe,
    "gpt_oss": hf_gpt_oss,
    "llama": hf_llama,
    "qwen3": hf_qwen3,
}


def choose_format(model) -> str:
    """The architecture whose attention and routing match: Llama or Qwen3 for a model without MoE layers;
    DeepSeek-V2 for latent attention with softmax routing, DeepSeek-V3 for latent attention and for
    sigmoid, group-limited or biased routing; OLMoE and Qwen3-MoE for normalised queries and keys,
    Qwen2-MoE with shared experts or q/k/v biases, Mixtral otherwise."""
    config, moe = model.config, model.config.moe
    if config.first_k_dense_replace == config.num_hidden_layers:
        return "qwen3" if config.qk_norm == "head" else "llama"
    biased = any(bool(layer.gate.expert_bias.any()) for layer in model.iter_moe_layers())
    if config.attention_type == "mla" and moe.scoring_func == "softmax" and not biased:
        return "deepseek_v2"
    if config.attention_type == "mla" or moe.scoring_func == "sigmoid" or moe.n_group > 1 or biased:
        return "deepseek_v3"
    scaled = any(
        getattr(config, field) != 1 for field in ("embedding_multiplier", "residual_multiplier", "logits_scaling")
    )
    if scaled or config.attention_multiplier is not None:
        return "granitemoe"
    if config.attention_sinks or moe.expert_activation == "clamped_swiglu":
        return "gpt_oss"
    if config.qk_norm == "full" or config.clip_qkv is not None:
        return "olmoe"
    if config.qk_norm == "head":
        return "qwen3_moe"
    return "qwen2_moe" if moe.n_shared_experts or config.qkv_bias else "mixtral"


# the options of our grouped-query attention, and what each adds; an adapter's ATTENTION_OPTIONS names the
# values its architecture computes
ATTENTION_OPTIONS = {
    "attention_bias": "biases on the q, k, v and o projections",
    "qkv_bias": "biases on the q, k and v projections",
    "qk_norm": "query and key norms",
    "clip_qkv": "clamping of queries, keys and values",
    "attention_multiplier": "softmax scale other than 1 / sqrt(head_dim)",
    "attention_sinks": "sink logits",
    "sliding_window": "sliding-window layers",
}


def attention_option_problems(config, name: str) -> list[str]:
    """The attention options this model uses that architecture `name` does not compute."""

    def computes(adapter, option, value) -> bool:  # True among the values: any value of a numeric option
        allowed = getattr(adapter, "ATTENTION_OPTIONS", {}).get(option, ())
        return value in allowed or (True in allowed and not isinstance(value, str))

    problems = []
    for option, what in ATTENTION_OPTIONS.items():
        value = getattr(config, option)
        if value in (None, False) or computes(ADAPTERS[name], option, value):
            continue
        others = [other for other, adapter in ADAPTERS.items() if computes(adapter, option, value)]
        problems.append(
            f"{option}={value!r}: {ADAPTERS[name].ARCHITECTURE}'s attention has no {what} (export as "
            f"{' or '.join(others) or 'nothing transformers runs'}, or train without it)"
        )
    return problems


def tutorial_option_problems(config, name: str) -> list[str]:
    """The MoE-layer tutorial's options that no supported architecture computes (dropout acts in training
    only, so it never changes what an export computes; attention_dropout is written to config.json)."""
    architecture = ADAPTERS[name].ARCHITECTURE
    problems = []
    has_moe = config.first_k_dense_replace < config.num_hidden_layers
    if has_moe and config.moe.expert_activation == "gelu":
        problems.append(
            f"expert_activation='gelu': {architecture}'s experts are gated (act(gate(x)) * up(x)); none of "
            f"the supported architectures has plain two-layer GELU experts"
        )
    if config.first_k_dense_replace and config.hidden_act == "gelu":
        problems.append(
            f"hidden_act='gelu': our dense FFN is then the plain w1 -> GELU -> w2, while {architecture}'s "
            f"hidden_act only swaps the activation of its gated FFN"
        )
    if config.norm_type == "layernorm":
        problems.append(
            f"norm_type='layernorm': {architecture} normalises with RMSNorm (Phi-MoE has LayerNorm, "
            f"which mymoe does not write)"
        )
    if not config.is_causal:
        problems.append(f"is_causal=false: {architecture} is a causal language model; no encoder format is written")
    return problems


def export_refusals(model, name: str) -> list[str]:
    config, moe = model.config, model.config.moe
    problems = list(ADAPTERS[name].refusals(config)) + attention_option_problems(config, name)
    problems += tutorial_option_problems(config, name)
    if "granite_scaling" not in getattr(ADAPTERS[name], "COMPUTES", ()):
        problems += [
            f"{field}={getattr(config, field)}: {name} has no such scaling (export as granitemoe)"
            for field in ("embedding_multiplier", "residual_multiplier", "logits_scaling")
            if getattr(config, field) != 1
        ]
    eval_factor = moe.eval_capacity_factor if moe.eval_capacity_factor is not None else moe.capacity_factor
    if eval_factor is not None:
        problems.append(
            f"capacity factor {eval_factor} at inference: mymoe drops tokens past capacity, "
            f"{name} never does (set eval_capacity_factor or capacity_factor to null)"
        )
    if any(getattr(module, "prefix", None) is not None for module in model.modules()):
        problems.append(
            f"prefix-tuning adapters: {name} has no trainable attention prefixes (LoRA merges into "
            f"the weights, prefixes cannot)"
        )
    computes = getattr(ADAPTERS[name], "COMPUTES", ())  # what beyond Mixtral's routing the architecture has
    if config.first_k_dense_replace < config.num_hidden_layers and "router_bias" not in computes:
        if moe.router_bias:
            problems.append(f"router_bias=true: {name}'s router has no bias on its logits (export as gpt_oss)")
        if moe.expert_mlp_bias or moe.expert_activation != "swiglu":
            problems.append(
                f"expert_mlp_bias={moe.expert_mlp_bias}, expert_activation={moe.expert_activation!r}: "
                f"{name}'s experts are SwiGLU without biases (export as gpt_oss)"
            )
    if config.first_k_dense_replace < config.num_hidden_layers:
        problems += dynamics_refusals(moe, name)
    if name == "deepseek_v3" or config.first_k_dense_replace == config.num_hidden_layers:
        return problems  # DeepSeek-V3 routing has groups, scaling and the bias; a dense model has no routing
    if config.attention_type == "mla" and "mla" not in computes:
        problems.append(
            f"attention_type=mla: {name} has grouped-query attention, not multi-head latent attention "
            f"(export as deepseek_v2 or deepseek_v3)"
        )
    if moe.n_group > 1 and moe.topk_group < moe.n_group and "group_limit" not in computes:
        problems.append(
            f"group-limited routing (n_group={moe.n_group}, topk_group={moe.topk_group}): {name} "
            f"chooses among all experts"
        )
    if moe.routed_scaling_factor != 1.0 and "routed_scaling" not in computes:
        problems.append(f"routed_scaling_factor={moe.routed_scaling_factor}: {name} does not scale expert outputs")
    if any(bool(layer.gate.expert_bias.any()) for layer in model.iter_moe_layers()):
        problems.append(
            f"the routers carry a non-zero balancing bias (bias_update_rate={moe.bias_update_rate}): "
            f"{name} has no selection bias"
        )
    return problems


# the training dynamics that add parameters to a MoE layer (mymoe/model/moe/dynamics.py), and what they add
DYNAMICS_PARAMETERS = {
    "moe_warmup_steps": "a dense path mixed into the MoE output during warm-up (dense_ffn)",
    "flexible_ffn": "a dense FFN mixed with the MoE output by a learned weight (dense_ffn, ffn_mix_logit)",
    "token_importance": "a learned token score that orders capacity and scales the routed output (importance)",
}


def dynamics_refusals(moe, name: str) -> list[str]:
    """Every training-dynamics option this model's MoE layers use: none has a counterpart in transformers."""
    return [
        f"{field}={getattr(moe, field)}: {what}, which {name} does not compute (train with {field} off to export)"
        for field, what in DYNAMICS_PARAMETERS.items()
        if getattr(moe, field)
    ]


def rope_parameters(config) -> dict:
    scaling = dict(config.rope_scaling or {})
    kind = scaling.pop("type", scaling.pop("rope_type", "default"))
    scaling.pop("rope_type", None)
    if kind == "yarn":
        scaling.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return {"rope_type": kind, "rope_theta": config.rope_theta, **scaling}


def hf_config(model, name: str) -> dict:
    config = model.config
    common = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope_parameters(config),
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": config.initializer_range,
        "attention_dropout": config.attention_dropout,
        "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
        "use_cache": True,
        # no tokenizer, no special ids: left out, each family's defaults (OLMoE's eos 50279) would apply
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    return {**common, **ADAPTERS[name].config(config)}


def split_layers(state: dict) -> tuple[dict, dict[int, dict]]:
    """(tensors outside any mlp, {layer: {name after 'mlp.': tensor}})."""
    plain, mlps = {}, {}
    for key, value in state.items():
        if key.startswith("model.layers.") and ".mlp." in key:
            layer = int(key.split(".")[2])
            mlps.setdefault(layer, {})[key.split(".mlp.", 1)[1]] = value
        else:
            plain[key] = value
    return plain, mlps


def without_extra_heads(model, state: dict, architecture: str) -> dict:
    """The state without the heads transformers would not run (each one's leaving noted on stderr): the
    multi-token prediction head and the candidate head; the main head (lm_head) alone is the exported model."""
    heads = {
        "mtp.": (
            model.mtp,
            "the multi-token prediction head",
            f"{architecture} in transformers runs the main model only",
        ),
        "candidate_head.": (model.candidate_head, "the candidate head", f"{architecture} has one output head"),
    }
    for prefix, (module, what, why) in heads.items():
        if module is not None:
            state = {key: value for key, value in state.items() if not key.startswith(prefix)}
            print(f"note: {what} is not exported: {why}", file=sys.stderr)
    return state


def export_hf(
    model, out_dir: str | Path, name: str = "auto", tokenizer: Optional[str] = None, overwrite: bool = False
) -> dict:
    name = choose_format(model) if name == "auto" else name
    problems = export_refusals(model, name)
    if problems:
        raise CheckpointError(
            f"cannot export as {name} without changing what the model computes, nothing was "
            f"written:\n  " + "\n  ".join(problems)
        )
    prepared = None
    if tokenizer is not None:  # read, converted and checked before anything is written
        prepared = hf_tokenizer.prepare(tokenizer, model.config.vocab_size, model.config.max_position_embeddings)
    state = without_extra_heads(model, model_tensors(model), ADAPTERS[name].ARCHITECTURE)
    dropped = [name for name in ("hidden_dropout", "expert_dropout") if getattr(model.config, name)]
    if dropped:
        print(
            f"note: {' and '.join(dropped)} act only in training and {ADAPTERS[name].ARCHITECTURE}'s config has "
            f"no such field: not written (attention_dropout is)",
            file=sys.stderr,
        )
    plain, mlps = split_layers(state)
    if hasattr(ADAPTERS[name], "attention_to_hf"):
        plain = ADAPTERS[name].attention_to_hf(plain, model.config)
    tensors = dict(plain)
    for layer, mlp in mlps.items():
        # adapters without a selection bias read no gate.expert_bias (checked to be zero above)
        tensors.update(ADAPTERS[name].mlp_to_hf(f"model.layers.{layer}", mlp))
    with atomic_output(Path(out_dir), overwrite) as temporary:
        temporary.mkdir()
        save_file(
            {key: value.contiguous() for key, value in tensors.items()},
            str(temporary / "model.safetensors"),
            metadata={"format": "pt"},
        )
        config = hf_config(model, name)
        if prepared is not None:
            config.update(prepared["ids"])
            hf_tokenizer.write(prepared, temporary)
            (temporary / "generation_config.json").write_text(
                json.dumps(hf_tokenizer.generation_config(prepared["ids"]), indent=2) + "\n"
            )
        (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"architecture": ADAPTERS[name].ARCHITECTURE, "tensors": len(tensors)}


# ---------------------------------------------------------------------------------------------------
# import


def read_hf_tensors(directory: Path, unfuse: bool = True) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{directory} has no *.safetensors file: save the model with save_pretrained(..., safe_serialization=True)"
        )
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return unfuse_experts(tensors) if unfuse else tensors


def unfuse_experts(tensors: dict) -> dict:
    """Fused ``mlp.experts.gate_up_proj`` [E, 2 ffn, hidden] / ``mlp.experts.down_proj`` [E, hidden, ffn] (the
    in-memory layout of transformers 5) -> per-expert ``mlp.experts.e.{gate,up,down}_proj.weight``."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            base = key[: -len(".gate_up_proj")]
            for e, expert in enumerate(value):
                gate, up = expert.chunk(2, dim=0)
                out[f"{base}.{e}.gate_proj.weight"], out[f"{base}.{e}.up_proj.weight"] = gate, up
        elif key.endswith(".mlp.experts.down_proj"):
            base = key[: -len(".down_proj")]
            for e, down in enumerate(value):
                out[f"{base}.{e}.down_proj.weight"] = down
        else:
            out[key] = value
    return out


# families whose computation mymoe's model cannot reproduce yet, and what it lacks
NOT_YET = {
    "phimoe": "Phi-MoE normalises with LayerNorm (weights and biases) instead of RMSNorm, routes with sparsemixer "
    "and adds a bias to the head, which mymoe's model does not compute",
    "granitemoeshared": "Granite-MoE-Shared's shared MLP is not mapped yet (granitemoe without it is)",
}


def model_config_from_hf(hf: dict) -> tuple[str, dict]:
    name = hf.get("model_type")
    if name in NOT_YET:
        raise CheckpointError(
            f"model_type={name!r} cannot be imported, nothing was written: {NOT_YET[name]}. Fine-tune "
            f"it with transformers, or start from a family mymoe imports: {', '.join(ADAPTERS)}"
        )
    if name not in ADAPTERS:
        raise CheckpointError(
            f"model_type={name!r} in config.json is not supported: mymoe imports {', '.join(ADAPTERS)}"
        )
    fields, problems = ADAPTERS[name].model_fields(hf)
    quantization = (hf.get("quantization_config") or {}).get("quant_method")
    if quantization:
        problems.append(
            f"quantization_config quant_method={quantization!r} (GPT-OSS ships MXFP4 experts): mymoe reads "
            f"bf16 / fp32 tensors; load it with transformers dequantized (for MXFP4: "
            f"quantization_config=Mxfp4Config(dequantize=True)), save_pretrained, and import that"
        )
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", "default")
    if kind == "default" and hf.get("rope_scaling"):
        rope = dict(hf["rope_scaling"])
        kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind not in ("default", "linear", "dynamic", "yarn"):
        problems.append(f"rope type {kind!r}: mymoe has linear, dynamic and yarn")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(
            f"hidden_act={hf['hidden_act']!r}: mymoe's gated FFNs and experts use silu (SwiGLU); its 'gelu' "
            f"ones are the ungated two-layer FFN"
        )
    if problems:
        raise CheckpointError(
            f"cannot import this {name} model without changing what it computes, nothing was "
            f"written:\n  " + "\n  ".join(problems)
        )
    heads = hf["num_attention_heads"]
    model = {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "max_position_embeddings": hf["max_position_embeddings"],
        "rms_norm_eps": hf["rms_norm_eps"],
        "rope_theta": theta,
        "rope_scaling": {"type": kind, **rope} if kind != "default" else None,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "initializer_range": hf.get("initializer_range", 0.02),
        "attention_dropout": float(hf.get("attention_dropout") or 0.0),
        **fields,
    }
    return name, model


def hf_model(source: str | Path) -> tuple[MoECausalLM, Config, str]:
    """A Hugging Face folder -> (our model of the same computation with its weights, its config, the
    architecture it was read as), in memory."""
    source = Path(source)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: pass a folder written by save_pretrained")
    try:
        hf = json.loads(config_file.read_text())
        name, fields = model_config_from_hf(hf)
    except (ValueError, KeyError, TypeError) as error:
        what = f"has no {error.args[0]!r} key" if isinstance(error, KeyError) else f"cannot be read ({error})"
        raise CheckpointError(
            f"{config_file} {what}: it is not a complete Hugging Face config; write it again with save_pretrained"
        ) from None
    try:
        config = validate(config_from_dict({"model": fields}))
    except ConfigError as error:
        raise CheckpointError(f"{config_file} does not describe a model mymoe can build: {error}") from None
    tensors = read_hf_tensors(source, unfuse=not getattr(ADAPTERS[name], "READS_FUSED_EXPERTS", False))
    layers = config.model.num_hidden_layers
    beyond = sorted({int(key.split(".")[2]) for key in tensors if key.startswith("model.layers.")} - set(range(layers)))
    if beyond:
        print(
            f"note: layers {beyond} after the {layers} of the model (multi-token prediction) are not imported: "
            f"transformers does not run them either",
            file=sys.stderr,
        )
    if hasattr(ADAPTERS[name], "attention_from_hf"):
        tensors = ADAPTERS[name].attention_from_hf(tensors, config.model, hf)
    model = MoECausalLM(config.model)
    plain, mlps = split_layers(model.state_dict())
    biases = [
        key for key, value in tensors.items() if key.endswith("_proj.bias") and key not in plain and bool(value.any())
    ]
    if biases:
        raise CheckpointError(
            f"{len(biases)} projections carry non-zero biases ({biases[0]}, ...) with no place "
            f"in mymoe's model of this {name} config.json (mymoe has attention biases where the "
            f"config declares them, and no MLP biases), so the import would compute "
            f"differently; nothing was written"
        )
    state = {}
    for key in plain:
        source_key = (
            "model.embed_tokens.weight" if key == "lm_head.weight" and config.model.tie_word_embeddings else key
        )
        if source_key not in tensors:
            raise CheckpointError(f"{source} has no tensor '{source_key}', which a {name} model of this config needs")
        state[key] = tensors[source_key]
    for layer, mlp in mlps.items():
        prefix = f"model.layers.{layer}"
        try:
            converted = ADAPTERS[name].mlp_from_hf(
                prefix, tensors, config.model.moe.n_routed_experts, "gate.weight" in mlp
            )
        except KeyError as missing:
            raise CheckpointError(f"{source} has no tensor {missing} for layer {layer}") from None
        if "gate.expert_bias" in mlp and "gate.expert_bias" not in converted:  # a format without the bias
            converted["gate.expert_bias"] = mlp["gate.expert_bias"].zero_()
        state.update({f"{prefix}.mlp.{key}": value for key, value in converted.items()})
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"the tensors in {source} do not fit its config.json: {error}") from None
    return model, config, ADAPTERS[name].ARCHITECTURE


def import_hf(source: str | Path, out_file: str | Path, overwrite: bool = False) -> dict:
    """A Hugging Face folder -> a consolidated weights-only file (+ YAML config) of the same model."""
    model, config, architecture = hf_model(source)
    count = save_weights(model, config, out_file, overwrite, imported_from=architecture)
    return {"architecture": architecture, "tensors": count}
