"""Hugging Face export and import: pick the architecture, write or read config.json + model.safetensors.

Attention, norms, embedding and head have the same names in mymoe and in every supported architecture
(``model.layers.N.self_attn.q_proj.weight`` ...), so only each layer's ``mlp`` goes through the
per-architecture adapter (hf_mixtral, hf_qwen2_moe, hf_deepseek_v3), and for DeepSeek-V3 the rotary rows
of the attention weights (its ``attention_to_hf`` / ``attention_from_hf``). The multi-token prediction
head is not written: no supported architecture runs one in transformers. Export writes the Hub's layout
(one tensor per expert, as ``save_pretrained`` writes it); import reads that layout and also the fused
``experts.gate_up_proj`` / ``experts.down_proj`` one. A model whose computation the target cannot
reproduce exactly is refused with every reason, and nothing is written.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from mymoe.checkpoint.storage import CheckpointError
from mymoe.config import ConfigError, config_from_dict, validate
from mymoe.convert import hf_deepseek_v3, hf_mixtral, hf_qwen2_moe
from mymoe.convert.atomic import atomic_output
from mymoe.convert.consolidate import FORMAT, FORMAT_VERSION, config_path_beside, model_tensors

ADAPTERS = {"mixtral": hf_mixtral, "qwen2_moe": hf_qwen2_moe, "deepseek_v3": hf_deepseek_v3}


def choose_format(model) -> str:
    """The architecture whose attention and routing match: DeepSeek-V3 for latent attention and for sigmoid,
    group-limited or biased routing, Qwen2-MoE with shared experts, Mixtral otherwise."""
    moe = model.config.moe
    biased = any(bool(layer.gate.expert_bias.any()) for layer in model.iter_moe_layers())
    if model.config.attention_type == "mla" or moe.scoring_func == "sigmoid" or moe.n_group > 1 or biased:
        return "deepseek_v3"
    return "qwen2_moe" if moe.n_shared_experts else "mixtral"


def export_refusals(model, name: str) -> list[str]:
    config, moe = model.config, model.config.moe
    problems = list(ADAPTERS[name].refusals(config))
    eval_factor = moe.eval_capacity_factor if moe.eval_capacity_factor is not None else moe.capacity_factor
    if eval_factor is not None:
        problems.append(f"capacity factor {eval_factor} at inference: mymoe drops tokens past capacity, "
                        f"{name} never does (set eval_capacity_factor or capacity_factor to null)")
    if any(getattr(module, "prefix", None) is not None for module in model.modules()):
        problems.append(f"prefix-tuning adapters: {name} has no trainable attention prefixes (LoRA merges into "
                        f"the weights, prefixes cannot)")
    if name == "deepseek_v3":  # its routing has groups, scaling and the bias
        return problems
    if config.attention_type == "mla":
        problems.append(f"attention_type=mla: {name} has grouped-query attention, not multi-head latent attention "
                        f"(export as deepseek_v3)")
    if moe.n_group > 1 and moe.topk_group < moe.n_group:
        problems.append(f"group-limited routing (n_group={moe.n_group}, topk_group={moe.topk_group}): {name} "
                        f"chooses among all experts")
    if moe.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={moe.routed_scaling_factor}: {name} does not scale expert outputs")
    if any(bool(layer.gate.expert_bias.any()) for layer in model.iter_moe_layers()):
        problems.append(f"the routers carry a non-zero balancing bias (bias_update_rate={moe.bias_update_rate}): "
                        f"{name} has no selection bias")
    return problems


def rope_parameters(config) -> dict:
    scaling = dict(config.rope_scaling or {})
    kind = scaling.pop("type", scaling.pop("rope_type", "default"))
    scaling.pop("rope_type", None)
    if kind == "yarn":
        scaling.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return {"rope_type": kind, "rope_theta": config.rope_theta, **scaling}


def hf_config(model, name: str) -> dict:
    config = model.config
    common = {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
              "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
              "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
              "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
              "rope_parameters": rope_parameters(config), "tie_word_embeddings": config.tie_word_embeddings,
              "hidden_act": "silu", "initializer_range": config.initializer_range, "attention_dropout": 0.0,
              "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."), "use_cache": True}
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


def check_tokenizer(path: str, vocab_size: int) -> None:
    import sentencepiece as spm

    try:
        pieces = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"{path} is not a sentencepiece model: {error}") from None
    if pieces > vocab_size:
        raise CheckpointError(f"tokenizer {path} has {pieces} pieces but the model's vocab_size is {vocab_size}: "
                              f"ids past {vocab_size - 1} have no embedding; pass the tokenizer the model was "
                              f"trained with")


def export_hf(model, out_dir: str | Path, name: str = "auto", tokenizer: Optional[str] = None,
              overwrite: bool = False) -> dict:
    name = choose_format(model) if name == "auto" else name
    problems = export_refusals(model, name)
    if problems:
        raise CheckpointError(f"cannot export as {name} without changing what the model computes, nothing was "
                              f"written:\n  " + "\n  ".join(problems))
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config.vocab_size)
    state = model_tensors(model)
    if model.mtp is not None:
        state = {key: value for key, value in state.items() if not key.startswith("mtp.")}
        print(f"note: the multi-token prediction head is not exported: {ADAPTERS[name].ARCHITECTURE} in transformers "
              f"runs the main model only", file=sys.stderr)
    plain, mlps = split_layers(state)
    if hasattr(ADAPTERS[name], "attention_to_hf"):
        plain = ADAPTERS[name].attention_to_hf(plain, model.config)
    tensors = dict(plain)
    for layer, mlp in mlps.items():
        # adapters without a selection bias read no gate.expert_bias (checked to be zero above)
        tensors.update(ADAPTERS[name].mlp_to_hf(f"model.layers.{layer}", mlp))
    with atomic_output(Path(out_dir), overwrite) as temporary:
        temporary.mkdir()
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(temporary / "model.safetensors"),
                  metadata={"format": "pt"})
        (temporary / "config.json").write_text(json.dumps(hf_config(model, name), indent=2) + "\n")
        if tokenizer is not None:
            shutil.copy(tokenizer, temporary / "tokenizer.model")
    return {"architecture": ADAPTERS[name].ARCHITECTURE, "tensors": len(tensors)}


# ---------------------------------------------------------------------------------------------------
# import


def read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no *.safetensors file: save the model with "
                              f"save_pretrained(..., safe_serialization=True)")
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return unfuse_experts(tensors)


def unfuse_experts(tensors: dict) -> dict:
    """Fused ``mlp.experts.gate_up_proj`` [E, 2 ffn, hidden] / ``mlp.experts.down_proj`` [E, hidden, ffn] (the
    in-memory layout of transformers 5) -> per-expert ``mlp.experts.e.{gate,up,down}_proj.weight``."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            base = key[:-len(".gate_up_proj")]
            for e, expert in enumerate(value):
                gate, up = expert.chunk(2, dim=0)
                out[f"{base}.{e}.gate_proj.weight"], out[f"{base}.{e}.up_proj.weight"] = gate, up
        elif key.endswith(".mlp.experts.down_proj"):
            base = key[:-len(".down_proj")]
            for e, down in enumerate(value):
                out[f"{base}.{e}.down_proj.weight"] = down
        else:
            out[key] = value
    return out


def model_config_from_hf(hf: dict) -> tuple[str, dict]:
    name = hf.get("model_type")
    if name not in ADAPTERS:
        raise CheckpointError(f"model_type={name!r} in config.json is not supported: mymoe imports "
                              f"{', '.join(ADAPTERS)}")
    fields, problems = ADAPTERS[name].model_fields(hf)
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", "default")
    if kind == "default" and hf.get("rope_scaling"):
        rope = dict(hf["rope_scaling"])
        kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind not in ("default", "linear", "dynamic", "yarn"):
        problems.append(f"rope type {kind!r}: mymoe has linear, dynamic and yarn")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}: mymoe's experts are SwiGLU (silu)")
    if problems:
        raise CheckpointError(f"cannot import this {name} model without changing what it computes, nothing was "
                              f"written:\n  " + "\n  ".join(problems))
    heads = hf["num_attention_heads"]
    model = {"vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
             "num_hidden_layers": hf["num_hidden_layers"], "num_attention_heads": heads,
             "num_key_value_heads": hf.get("num_key_value_heads") or heads,
             "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
             "max_position_embeddings": hf["max_position_embeddings"], "rms_norm_eps": hf["rms_norm_eps"],
             "rope_theta": theta, "rope_scaling": {"type": kind, **rope} if kind != "default" else None,
             "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
             "initializer_range": hf.get("initializer_range", 0.02), **fields}
    return name, model


def import_hf(source: str | Path, out_file: str | Path, overwrite: bool = False) -> dict:
    """A Hugging Face folder -> a consolidated weights-only file (+ YAML config) of the same model."""
    from mymoe.model import MoECausalLM

    source, out_file = Path(source), Path(out_file)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: pass a folder written by save_pretrained")
    try:
        hf = json.loads(config_file.read_text())
        name, fields = model_config_from_hf(hf)
    except (ValueError, KeyError, TypeError) as error:
        what = f"has no {error.args[0]!r} key" if isinstance(error, KeyError) else f"cannot be read ({error})"
        raise CheckpointError(f"{config_file} {what}: it is not a complete Hugging Face config; write it again "
                              f"with save_pretrained") from None
    try:
        config = validate(config_from_dict({"model": fields}))
    except ConfigError as error:
        raise CheckpointError(f"{config_file} does not describe a model mymoe can build: {error}") from None
    tensors = read_hf_tensors(source)
    biases = [key for key, value in tensors.items() if key.endswith("_proj.bias") and bool(value.any())]
    if biases:
        raise CheckpointError(f"{len(biases)} projections carry non-zero biases ({biases[0]}, ...): mymoe's "
                              f"attention has none, so the import would compute differently; nothing was written")
    layers = config.model.num_hidden_layers
    beyond = sorted({int(key.split(".")[2]) for key in tensors if key.startswith("model.layers.")} - set(range(layers)))
    if beyond:
        print(f"note: layers {beyond} after the {layers} of the model (multi-token prediction) are not imported: "
              f"transformers does not run them either", file=sys.stderr)
    if hasattr(ADAPTERS[name], "attention_from_hf"):
        tensors = ADAPTERS[name].attention_from_hf(tensors, config.model, hf)
    model = MoECausalLM(config.model)
    plain, mlps = split_layers(model.state_dict())
    state = {}
    for key in plain:
        source_key = "model.embed_tokens.weight" if key == "lm_head.weight" and config.model.tie_word_embeddings \
            else key
        if source_key not in tensors:
            raise CheckpointError(f"{source} has no tensor '{source_key}', which a {name} model of this config needs")
        state[key] = tensors[source_key]
    for layer, mlp in mlps.items():
        prefix = f"model.layers.{layer}"
        try:
            converted = ADAPTERS[name].mlp_from_hf(prefix, tensors, config.model.moe.n_routed_experts,
                                                   "gate.weight" in mlp)
        except KeyError as missing:
            raise CheckpointError(f"{source} has no tensor {missing} for layer {layer}") from None
        if "gate.expert_bias" in mlp and "gate.expert_bias" not in converted:  # a format without the bias
            converted["gate.expert_bias"] = mlp["gate.expert_bias"].zero_()
        state.update({f"{prefix}.mlp.{key}": value for key, value in converted.items()})
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"the tensors in {source} do not fit its config.json: {error}") from None
    tensors_out = model_tensors(model)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config.to_dict()),
                "imported_from": ADAPTERS[name].ARCHITECTURE}
    with atomic_output(out_file, overwrite) as temporary, \
            atomic_output(config_path_beside(out_file), overwrite) as temporary_config:
        save_file({key: value.contiguous() for key, value in tensors_out.items()}, str(temporary), metadata=metadata)
        temporary_config.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return {"architecture": ADAPTERS[name].ARCHITECTURE, "tensors": len(tensors_out)}
