"""Recipes: YAML + command-line overrides, errors with file:line and the nearest valid key."""
import argparse
from pathlib import Path

import pytest

from loratune.commands.train import add_parser, config_from_args
from loratune.recipe import RecipeError, build, dump_yaml, load_yaml
from loratune.train import TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _parse(*argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    return config_from_args(parser.parse_args(["train", *argv]))


def test_defaults_are_the_embedded_demo():
    cfg = TrainConfig()
    assert cfg.model == "builtin:tiny-qwen3" and cfg.train_data == "builtin:train"


def test_yaml_with_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: some/dir\nlr: 1.0e-4\nlora:\n  r: 16\n  lora_alpha: 32\n")
    cfg = _parse(str(recipe), "--lr", "3e-4", "--lora.r", "4", "--quantize", "nf4", "--packing", "false")
    assert (cfg.model, cfg.lr, cfg.quantize, cfg.packing) == ("some/dir", 3e-4, "nf4", False)
    assert (cfg.lora.r, cfg.lora.lora_alpha) == (4, 32)
    cfg = _parse(str(recipe), "--target-modules", "[q_proj, v_proj]")
    assert cfg.lora.target_modules == ("q_proj", "v_proj")


def test_unknown_key_names_line_and_suggests(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: x\nlearning_rate: 1e-4\n")
    with pytest.raises(RecipeError, match=r"r.yaml:2: unknown key 'learning_rate'"):
        _parse(str(recipe))
    recipe.write_text("model: x\nlora:\n  rank: 8\n")
    with pytest.raises(RecipeError, match=r"r.yaml:3: unknown key 'lora.rank'"):
        _parse(str(recipe))
    recipe.write_text("lr: 1e-4\nbatch_sise: 4\n")
    with pytest.raises(RecipeError, match="did you mean 'batch_size'"):
        _parse(str(recipe))


def test_bad_values_name_the_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.0002\nquantize: int3\n")
    with pytest.raises(RecipeError, match=r"r.yaml:2: quantize must be one of none, nf4; got 'int3'"):
        _parse(str(recipe))
    recipe.write_text("lora:\n  r: 0\n")
    with pytest.raises(RecipeError, match=r"r.yaml:2: LoraConfig.r must be an integer ≥ 1"):
        _parse(str(recipe))
    recipe.write_text("lr: [oops\n")
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: invalid YAML"):
        _parse(str(recipe))


def test_dumped_recipe_round_trips(tmp_path):
    cfg = TrainConfig(lr=1e-3, max_steps=7)
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(cfg))
    data, lines = load_yaml(path)
    assert build(TrainConfig, data, str(path), lines) == cfg
    assert "# Peak learning rate of AdamW." in path.read_text()


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_parse(name):
    data, lines = load_yaml(RECIPES / name)
    build(TrainConfig, data, name, lines)
