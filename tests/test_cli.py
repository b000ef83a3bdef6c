"""The command line as a user runs it: a real subprocess, exit codes, one-line errors."""
import json
import subprocess
import sys


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "loratune", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_plan_prints_the_trainable_line():
    res = run_cli("plan", "qwen3-0.6b")
    assert res.returncode == 0, res.stderr
    assert "trainable params: 2,293,760 || all params: 598,343,680 || trainable%: 0.3834" in res.stdout
    assert "q_proj   2048×1024" in res.stdout


def test_plan_json_and_errors(tmp_path):
    res = run_cli("plan", "--json", "--r", "4")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["trainable_params"] == 2_293_760 // 2
    res = run_cli("plan", "--r", "0")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == "loratune plan: error: LoraConfig.r must be an integer ≥ 1, got 0"
    res = run_cli("plan", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and "loratune plan: error:" in res.stderr


def _train_tiny(d, out):
    res = run_cli("train", "--model", str(d / "model"), "--train-data", str(d / "train.jsonl"),
                  "--eval-data", str(d / "eval.jsonl"), "--max-steps", "8", "--batch-size", "8", "--lr", "2e-2",
                  "--threads", "1", "--output-dir", str(out), "--no-progress", "--lora.target_modules", "all-linear",
                  "--eval-generate", "0")
    assert res.returncode == 0, res.stderr
    return out / "adapter"


def test_train_generate_merge_eval(tiny_run_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from loratune.models import load_with_adapters

    d = tiny_run_dir
    adapter = _train_tiny(d, d / "out")
    gen = run_cli("generate", "--model", str(d / "model"), "--adapter", str(adapter), "--max-new-tokens", "4", "rev abc", "rev cab")
    assert gen.returncode == 0, gen.stderr
    assert len(gen.stdout.splitlines()) == 2

    merged = d / "merged"
    res = run_cli("merge", "--model", str(d / "model"), "--adapter", str(adapter), "--output", str(merged),
                  "--save-dtype", "fp32")
    assert res.returncode == 0, res.stderr
    assert "max |logit difference|" in res.stdout
    assert not (merged / "adapter_config.json").exists() and (merged / "model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(merged)
    unmerged, _ = load_with_adapters(str(d / "model"), [str(adapter)])
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, unmerged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    ev = run_cli("eval", "--model", str(d / "model"), "--adapter", str(adapter), "--data", str(d / "eval.jsonl"),
                 "--generate", "4", "--max-new-tokens", "4", "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["examples"] == 8 and result["scored"] == 4 and result["eval_loss"] > 0
    # the merged model evaluates to the same loss as base + adapter
    ev2 = run_cli("eval", "--model", str(merged), "--data", str(d / "eval.jsonl"), "--json")
    assert abs(json.loads(ev2.stdout.strip().splitlines()[-1])["eval_loss"] - result["eval_loss"]) < 1e-2


def test_merge_refuses_bad_adapter(tiny_run_dir, tmp_path):
    res = run_cli("merge", "--model", str(tiny_run_dir / "model"), "--adapter", str(tmp_path / "none"), "--output", str(tmp_path / "m"))
    assert res.returncode == 2 and "does not exist" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "m").exists()
