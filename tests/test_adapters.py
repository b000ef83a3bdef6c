"""PEFT-format adapter files: round trips, interop with the real `peft` package both ways, refusal of bad files."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_gpt2, make_tiny_qwen3
from loratune import LoraConfig, LoraModel, get_lora_model, load_adapter, save_adapter
from loratune.adapters import CONFIG_NAME, WEIGHTS_NAME
from loratune.inject import lora_layers

peft = pytest.importorskip("peft")
TOL = dict(rtol=1e-5, atol=1e-5)


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _ids(vocab=128):
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0))


CASES = {
    "qwen3-qkvo": (make_tiny_qwen3, dict(r=4, lora_alpha=8)),
    "qwen3-rslora-patterns": (make_tiny_qwen3, dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"v_proj": 3})),
    "qwen3-embedding-layers": (make_tiny_qwen3, dict(r=4, target_modules=["embed_tokens", "o_proj", "up_proj"],
                                                     layers_to_transform=[1])),
    "gpt2-conv1d": (make_tiny_gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2-bias": (make_tiny_gpt2, dict(r=2, target_modules=["c_attn"], bias="lora_only")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loratune_adapter_loads_in_peft(case, tmp_path):
    make, kw = CASES[case]
    model = get_lora_model(make(), LoraConfig(**kw))
    _randomize(model)
    if kw.get("bias") == "lora_only":
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.bias.add_(0.5)
    ids = _ids()
    ours = model(ids).logits
    model.save_pretrained(tmp_path / "ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ad")
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_loratune(case, tmp_path):
    make, kw = CASES[case]
    kw = dict(kw)
    pcfg = peft.LoraConfig(task_type="CAUSAL_LM", **kw, **({"fan_in_fan_out": True} if "gpt2" in case else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(make(), pcfg)
    _randomize(pmodel, seed=3)
    ids = _ids()
    theirs = pmodel(input_ids=ids).logits
    pmodel.save_pretrained(tmp_path / "ad")
    ours = LoraModel.from_pretrained(make(), tmp_path / "ad")
    torch.testing.assert_close(ours(ids).logits, theirs, **TOL)
    assert not any(p.requires_grad for p in ours.parameters())


def test_several_adapters_both_ways(tmp_path):
    ids = _ids()
    model = get_lora_model(make_tiny_qwen3(), LoraConfig(r=4), "first")
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "gate_proj"]), "second")
    _randomize(model)
    outs = {}
    for name in ("first", "second"):
        model.set_adapter(name)
        outs[name] = model(ids).logits
        model.save_pretrained(tmp_path / name, adapter_name=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(make_tiny_qwen3(), tmp_path / "first", adapter_name="first")
        pm.load_adapter(tmp_path / "second", adapter_name="second")
    for name in ("first", "second"):
        pm.set_adapter(name)
        torch.testing.assert_close(pm(input_ids=ids).logits, outs[name], **TOL)
    # and back: PEFT writes each adapter not named "default" into a sub-directory of its name
    pm.save_pretrained(tmp_path / "peft")
    back = LoraModel(make_tiny_qwen3())
    back.load_adapter(tmp_path / "peft" / "second", "second")
    back.load_adapter(tmp_path / "peft" / "first", "first")
    for name in ("first", "second"):
        back.set_adapter(name)
        torch.testing.assert_close(back(ids).logits, outs[name], **TOL)


def test_file_format_and_keys(tmp_path):
    model = get_lora_model(make_tiny_qwen3(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    save_adapter(model.model, tmp_path / "ad", base_model_name_or_path="tiny/qwen3")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    keys = set(load_file(tmp_path / "ad" / WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    assert len(keys) == 2 * 2 + 2
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert cfg["base_model_name_or_path"] == "tiny/qwen3" and cfg["peft_type"] == "LORA"
    # saving again over an existing directory replaces it atomically, leaving no temp dirs
    save_adapter(model.model, tmp_path / "ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def _saved(tmp_path, **kw):
    model = get_lora_model(make_tiny_qwen3(), LoraConfig(r=4, **kw))
    _randomize(model)
    return model.save_pretrained(tmp_path / "ad")


def _edit_weights(path, fn):
    tensors = load_file(path / WEIGHTS_NAME)
    fn(tensors)
    save_file(tensors, path / WEIGHTS_NAME)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(3, 64)),
     "q_proj.lora_A.weight has shape (3, 64), the model needs (4, 64)"),
    (lambda t: t.__setitem__("base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight", torch.zeros(4, 64)),
     "unexpected key base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"),
    (lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
     "missing 1 tensor(s) the config targets, e.g. base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
    (lambda t: t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].fill_(float("inf")),
     "contains NaN or inf"),
])
def test_bad_weights_refused_model_unchanged(tmp_path, edit, words):
    path = _saved(tmp_path)
    _edit_weights(path, edit)
    model = make_tiny_qwen3()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_adapter(model, path)
    assert words in str(err.value) and str(path / WEIGHTS_NAME) in str(err.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not list(lora_layers(model))


def test_bad_config_refused(tmp_path):
    path = _saved(tmp_path)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    del cfg["r"]
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing required field"):
        load_adapter(make_tiny_qwen3(), path)
    (path / CONFIG_NAME).write_text("{ not json")
    with pytest.raises(ValueError, match=r"adapter_config.json:1: invalid JSON"):
        load_adapter(make_tiny_qwen3(), path)
    cfg["r"] = 4
    cfg["target_modules"] = ["query_key_value"]
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not fit this model: .*matched no module"):
        load_adapter(make_tiny_qwen3(), path)


def test_pickle_files_are_never_read(tmp_path):
    path = _saved(tmp_path)
    (path / WEIGHTS_NAME).rename(path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle file; loratune only reads safetensors"):
        load_adapter(make_tiny_qwen3(), path)
