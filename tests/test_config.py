import pytest

from loratune.config import LoraConfig, layer_index, matches


def test_defaults_match_the_source_document_setup():
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.target_modules) == (8, 16, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert c.scaling_for("model.layers.0.self_attn.q_proj") == 2.0


@pytest.mark.parametrize("kwargs, words", [
    ({"r": 0}, "r must be an integer ≥ 1"),
    ({"r": 2.5}, "r must be an integer"),
    ({"lora_alpha": -1}, "lora_alpha must be a finite number > 0"),
    ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
    ({"init": "xavier"}, "init must be one of gaussian, kaiming, zeros"),
    ({"bias": "some"}, "bias must be one of none, lora_only, all"),
    ({"target_modules": []}, "target_modules must name at least one module"),
    ({"target_modules": "q_proj("}, "not a valid regular expression"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a number > 0"),
    ({"layers_to_transform": [-1]}, "layers_to_transform must be a non-empty list of layer indices"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list"),
])
def test_invalid_values_name_the_field_and_range(kwargs, words):
    with pytest.raises(ValueError) as err:
        LoraConfig(**kwargs)
    assert words in str(err.value)


def test_config_is_frozen_and_hashable():
    c = LoraConfig(rank_pattern={"q_proj": 4})
    with pytest.raises(Exception):
        c.r = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.rank_pattern["k_proj"] = 2  # type: ignore[index]
    assert hash(c) == hash(LoraConfig(rank_pattern={"q_proj": 4}))
    assert c.replace(r=4).r == 4


def test_rank_alpha_patterns_and_rslora():
    c = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 2})
    assert c.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert c.rank_for("model.layers.0.self_attn.k_proj") == 8
    assert c.alpha_for("model.layers.1.self_attn.v_proj") == 2
    assert c.alpha_for("model.layers.0.self_attn.v_proj") == 16
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling_for("x.q_proj") == pytest.approx(2.0)


def test_matching_rules():
    assert matches(["q_proj"], "model.layers.0.self_attn.q_proj")
    assert not matches(["proj"], "model.layers.0.self_attn.q_proj")  # suffix must be a whole dotted part
    assert matches(r".*\.(q|v)_proj", "model.layers.0.self_attn.v_proj")
    assert not matches(r"q_proj", "model.layers.0.self_attn.q_proj")  # a string is a full-match regex
    assert layer_index("model.layers.3.self_attn.q_proj") == 3
    assert layer_index("lm_head") is None


def test_peft_dict_round_trip():
    c = LoraConfig(r=4, lora_alpha=8, init="kaiming", use_rslora=True, rank_pattern={"q_proj": 2},
                   layers_to_transform=[0], modules_to_save=["lm_head"], bias="lora_only")
    d = c.to_peft_dict("some/model")
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM" and d["init_lora_weights"] is True
    assert LoraConfig.from_peft_dict(d) == c


def test_peft_dict_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match="DoRA"):
        LoraConfig.from_peft_dict({"r": 8, "target_modules": ["q_proj"], "use_dora": True})
    with pytest.raises(ValueError, match="missing required field"):
        LoraConfig.from_peft_dict({"lora_alpha": 8})
    with pytest.raises(ValueError, match="x.json: LoraConfig.r"):
        LoraConfig.from_peft_dict({"r": -2, "target_modules": ["q_proj"]}, source="x.json")
