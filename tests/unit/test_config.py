"""ModelConfig: every config.json variant of docs/model.md section 9, presets, field-naming errors."""

import json

import pytest

from ernie_hal.core.model.config import PRESETS, ConfigError, ModelConfig, preset

DENSE_03B = {  # the original remote-code era 0.3B-PT config (docs/model.md [CFG-0.3B])
    "architectures": ["Ernie4_5_ForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 131072,
    "model_type": "ernie4_5", "num_attention_heads": 16, "num_hidden_layers": 18, "num_key_value_heads": 2,
    "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_theta": 500000, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_bias": False, "use_cache": False, "vocab_size": 103424}

MOE_21B = {
    "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "hidden_size": 2560,
    "intermediate_size": 12288, "num_hidden_layers": 28, "num_attention_heads": 20, "num_key_value_heads": 4,
    "vocab_size": 103424, "rope_theta": 500000, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "moe_num_experts": 64, "moe_k": 6, "moe_intermediate_size": 1536, "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1, "moe_layer_end_index": 27, "moe_layer_interval": 1, "dtype": "bfloat16"}


def test_dense_original_config_matches_preset():
    cfg = ModelConfig.from_dict(DENSE_03B)
    assert cfg.head_dim == 128 and not cfg.is_moe
    assert cfg == PRESETS["ernie-4.5-0.3b"]


def test_moe_head_dim_absent_is_derived_and_layer_rule():
    cfg = ModelConfig.from_dict(MOE_21B)
    assert cfg.head_dim == 128
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert cfg.shared_intermediate_size == 3072
    assert cfg == PRESETS["ernie-4.5-21b-a3b"]


def test_v5_variants_rope_parameters_and_hf_attribute_names():
    raw = dict(MOE_21B)
    del raw["rope_theta"], raw["moe_num_experts"], raw["moe_k"]
    raw.update(rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}, num_experts=64,
               num_experts_per_tok=6, moe_layer_end_index=-1)
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_theta == 500000.0 and cfg.moe_num_experts == 64 and cfg.moe_k == 6
    assert cfg.moe_end == 27


def test_300b_layer_rule_and_preset_truncation():
    cfg = PRESETS["ernie-4.5-300b-a47b"]
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 53)] == [False, False, True, True]
    two = preset("ernie-4.5-300b-a47b", layers=2)
    assert two.num_hidden_layers == 2 and two.hidden_size == 8192 and two.is_moe_layer(1)


@pytest.mark.parametrize("change, field", [
    ({"hidden_size": "big"}, "hidden_size"),                 # wrong type
    ({"vocab_size": None}, "vocab_size"),                    # missing
    ({"num_key_value_heads": 3}, "num_key_value_heads"),     # not a divisor
    ({"torch_dtype": "int8"}, "dtype"),                      # unsupported dtype
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"use_bias": True}, "use_bias"),
])
def test_bad_fields_are_named(change, field):
    raw = dict(DENSE_03B)
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(raw)


def test_moe_k_larger_than_experts_is_rejected():
    with pytest.raises(ConfigError, match="moe_k"):
        ModelConfig.from_dict(dict(MOE_21B, moe_k=65))


def test_round_trip_through_hf_dict(tmp_path):
    for name, cfg in PRESETS.items():
        (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
        assert ModelConfig.from_file(str(tmp_path)) == cfg, name


def test_unreadable_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(str(tmp_path))
