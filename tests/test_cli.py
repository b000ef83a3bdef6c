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
