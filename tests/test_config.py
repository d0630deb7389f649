"""Config loading, overrides and every validation error the foundation promises."""

from pathlib import Path

import pytest

from mymoe.config import ConfigError, apply_overrides, config_from_dict, load_config, validate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["tiny", "mymoe-768", "mymoe-design", "mixtral-8x7b", "deepseek-v3-small"])
def test_shipped_configs_load_and_validate(name):
    config = load_config(str(CONFIGS / f"{name}.yaml"))
    assert config.model.num_attention_heads % config.model.num_key_value_heads == 0


def test_mymoe_768_has_the_promised_shape():
    model = load_config(str(CONFIGS / "mymoe-768.yaml")).model
    assert (model.num_hidden_layers, model.hidden_size, model.num_attention_heads, model.num_key_value_heads) == (
        12,
        768,
        4,
        2,
    )


def test_dotted_overrides_both_forms_and_flat_moe_keys():
    config = load_config(
        str(CONFIGS / "tiny.yaml"),
        [
            "--model.n_routed_experts=8",
            "--train.lr",
            "1e-3",
            "--model.moe.capacity_factor=1.25",
            "--data.train_prefixes=[a, b]",
        ],
    )
    assert config.model.moe.n_routed_experts == 8
    assert config.train.lr == pytest.approx(1e-3)
    assert config.model.moe.capacity_factor == 1.25
    assert config.data.train_prefixes == ["a", "b"]


def test_config_hash_is_stable_and_sensitive():
    a = load_config(str(CONFIGS / "tiny.yaml"))
    b = load_config(str(CONFIGS / "tiny.yaml"))
    c = load_config(str(CONFIGS / "tiny.yaml"), ["--train.seed=7"])
    assert a.hash() == b.hash() != c.hash()


def build(**sections):
    return validate(config_from_dict(sections))


BAD = [
    (
        {"model": {"hidden_size": 100, "num_attention_heads": 8}},
        "num_attention_heads=8 must divide model.hidden_size=100",
    ),
    (
        {"model": {"num_attention_heads": 8, "num_key_value_heads": 3, "hidden_size": 256}},
        "num_key_value_heads=3 must divide model.num_attention_heads=8 (try 1, 2, 4, 8)",
    ),
    ({"model": {"moe": {"n_routed_experts": 4, "num_experts_per_tok": 5}}}, "num_experts_per_tok=5 is larger than"),
    ({"model": {"moe": {"n_routed_experts": 8, "n_group": 3}}}, "n_group=3 must divide model.moe.n_routed_experts=8"),
    ({"model": {"moe": {"n_group": 2, "topk_group": 3}}}, "topk_group=3 is larger than model.moe.n_group=2"),
    ({"model": {"moe": {"capacity_factor": 0}}}, "capacity_factor=0.0 must be positive"),
    ({"model": {"moe": {"capacity_factor": -1.5}}}, "capacity_factor=-1.5 must be positive"),
    ({"model": {"moe": {"eval_capacity_factor": 0}}}, "eval_capacity_factor=0.0 must be positive"),
    ({"model": {"rope_scaling": {"type": "longrope", "factor": 4}}}, "rope_scaling.type='longrope' is unknown"),
    ({"model": {"rope_scaling": {"type": "yarn", "factor": 0.5}}}, "rope_scaling.factor=0.5 must be a number >= 1"),
    ({"model": {"moe": {"scoring_func": "relu"}}}, "scoring_func='relu' must be 'softmax', 'sigmoid' or 'identity'"),
    ({"model": {"moe": {"drop_policy": "random"}}}, "drop_policy='random'"),
    ({"parallel": {"expert_parallel_size": 3}}, "expert_parallel_size=3 must divide model.moe.n_routed_experts=8"),
    ({"parallel": {"a2a_chunks": -1}}, "parallel.a2a_chunks=-1 must be >= 0"),
    ({"model": {"first_k_dense_replace": 9}}, "first_k_dense_replace=9"),
    ({"train": {"log_interval": 0}}, "train.log_interval=0 must be a positive integer"),
    ({"train": {"eval_steps": 0}}, "train.eval_steps=0 must be a positive integer"),
    ({"train": {"max_tokens": 0}}, "train.max_tokens=0 must be positive"),
    ({"peft": {"lora_rank": 4, "lora_targets": ["qkv"]}}, "peft.lora_targets has unknown ['qkv']"),
    ({"model": {"attention_type": "mla"}, "peft": {"prefix_length": 2}}, "peft.prefix_length needs"),
]


@pytest.mark.parametrize("sections,message", BAD, ids=[m.split("=")[0].split(" ")[0] for _, m in BAD])
def test_bad_values_raise_errors_naming_field_and_fix(sections, message):
    with pytest.raises(ConfigError) as error:
        build(**sections)
    assert message in str(error.value)


def test_unknown_yaml_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError, match="unknown key 'hiden_size' in 'config.model'. Did you mean hidden_size"):
        load_config(str(path))
    path.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(str(path))


def test_wrong_types_and_missing_files():
    with pytest.raises(ConfigError, match="model.hidden_size='wide' must be an integer"):
        config_from_dict({"model": {"hidden_size": "wide"}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/config.yaml")
    with pytest.raises(ConfigError, match="has no value"):
        apply_overrides({}, ["--train.lr"])


def test_world_size_not_divisible_by_expert_parallel_size():
    config = config_from_dict({"parallel": {"expert_parallel_size": 4}})
    with pytest.raises(ConfigError, match="expert_parallel_size=4 must divide the world size 6"):
        validate(config, world_size=6)
