import pytest
import torch

from conftest import make_char_tokenizer, make_tiny_qwen3, randomize_lora_B
from loratune import LoraConfig, get_lora_model
from loratune.generate import exact_match, generate, prompt_and_reference, render


def test_prompt_and_reference_for_every_format():
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a"}]}
    assert prompt_and_reference(chat, True) == (chat["messages"][:2], "a")
    assert prompt_and_reference({"prompt": "p", "completion": "c"}, True) == ([{"role": "user", "content": "p"}], "c")
    assert prompt_and_reference({"prompt": "p", "completion": "c"}, False) == ("p", "c")
    prompt, ref = prompt_and_reference({"instruction": "i", "input": "x", "output": "o"}, False)
    assert prompt.endswith("### Input:\nx\n\n### Response:\n") and ref == "o"
    assert prompt_and_reference({"text": "t"}, False) == ("t", None)


def _model_and_tok():
    tok = make_char_tokenizer()
    model = make_tiny_qwen3(vocab_size=128, initializer_range=0.2)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def test_render_uses_the_chat_template():
    _, tok = _model_and_tok()
    assert render(tok, [{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_batched_left_padded_generation_matches_one_by_one():
    model, tok = _model_and_tok()
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "a much longer prompt"}]]
    together = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    alone = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone


def test_generation_with_adapter_differs_and_disabling_restores():
    model, tok = _model_and_tok()
    prompts = [[{"role": "user", "content": f"x{i}"}] for i in range(4)]
    base = generate(model, tok, prompts, max_new_tokens=5)
    lm = get_lora_model(model, LoraConfig(target_modules="all-linear"))
    randomize_lora_B(lm, std=1.0)
    adapted = generate(lm.model, tok, prompts, max_new_tokens=5)
    assert adapted != base
    with lm.disable_adapters():
        assert generate(lm.model, tok, prompts, max_new_tokens=5) == base


def test_exact_match_counts():
    model, tok = _model_and_tok()
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "?"}]} for i in range(3)]
    outs = generate(model, tok, [r["messages"][:1] for r in records], max_new_tokens=4)
    for r, o in zip(records, outs):
        r["messages"][1]["content"] = o
    records[0]["messages"][1]["content"] += "zz"
    em = exact_match(model, tok, records, max_new_tokens=4)
    assert (em.correct, em.total) == (2, 3) and str(em) == "66.7% (2/3)"
    with pytest.raises(ValueError, match="no record with a reference answer"):
        exact_match(model, tok, [{"text": "plain"}])
