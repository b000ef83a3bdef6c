"""Data-parallel training under torchrun: 2 CPU processes with gloo on the tiny model.

Each torchrun launch costs two fresh Python processes importing torch + transformers, so the runs are shared
across tests (module-scoped, made on first use): a single-process reference, a 2-rank DDP run and a 2-rank FSDP2
run, all over the same global batch (batch_size 2 × grad_accum 4: two micro-batches per rank, so DDP's no_sync /
FSDP2's deferred reduce-scatter path is exercised), in fp32 without dropout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import make_run_dir

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch build")

HERE = Path(__file__).resolve().parent
STEPS = 6


def _args(d: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(d / "model"), "--train-data", str(d / "train.jsonl"), "--eval-data", str(d / "eval.jsonl"),
            "--batch-size", "2", "--grad-accum", "4", "--max-steps", str(STEPS), "--lr", "3e-3", "--warmup-ratio", "0",
            "--threads", "1", "--save-every", "3", "--output-dir", str(out), "--no-progress", "--autocast", "none",
            "--dtype", "fp32", "--lora.lora_dropout", "0", "--lora.target_modules", "all-linear", "--lora.r", "4",
            "--eval-generate", "0", *extra]


def torchrun(*args: str, worker: bool = False, env: dict | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m loratune train ARGS`` (``--standalone``
    picks a free rendezvous port itself); with ``worker``, tests/dist_worker.py instead of ``-m loratune``."""
    target = [str(HERE / "dist_worker.py")] if worker else ["-m", "loratune"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target,
           "train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=full_env)


def single(*args: str) -> int:
    """``loratune train ARGS`` in this process (the reference)."""
    from loratune.cli import main

    return main(["train", *args])


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def steps(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_run(got: Path, want: Path, atol: float) -> None:
    """Same adapter within ``atol`` and the same per-step loss and gradient norm (the norm is what catches a
    gradient reduced with the wrong scale: Adam's update itself hardly depends on it)."""
    a, b = adapter(got), adapter(want)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)
    rows_a, rows_b = steps(got), steps(want)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == list(range(1, STEPS + 1))
    for ra, rb in zip(rows_a, rows_b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
        assert ra["tokens"] == rb["tokens"]


class Runs:
    """The shared runs, made on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.d = make_run_dir(root)
        self._done: dict[str, Path] = {}

    def single(self) -> Path:
        if "single" not in self._done:
            out = self.root / "single"
            assert single(*_args(self.d, out)) == 0
            self._done["single"] = out
        return self._done["single"]

    def ddp(self) -> Path:
        if "ddp" not in self._done:
            out, audit = self.root / "ddp", self.root / "audit"
            audit.mkdir()
            res = torchrun(*_args(self.d, out), worker=True,
                           env={"LORATUNE_TEST_AUDIT": str(audit), "LORATUNE_TEST_WATCH": str(out)})
            assert res.returncode == 0, res.stdout + res.stderr
            self.ddp_output = res.stdout
            self._done["ddp"] = out
        return self._done["ddp"]

    def fsdp(self) -> Path:
        if "fsdp" not in self._done:
            out = self.root / "fsdp"
            res = torchrun(*_args(self.d, out, "--fsdp", "true"))
            assert res.returncode == 0, res.stdout + res.stderr
            self._done["fsdp"] = out
        return self._done["fsdp"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist"))


def test_ddp_equals_single_process_over_the_same_global_batch(runs):
    assert_same_run(runs.ddp(), runs.single(), atol=1e-4)


def test_only_rank_0_writes(runs):
    out = runs.ddp()
    audit = runs.root / "audit"
    rank0, rank1 = (audit / "rank0.log").read_text(), (audit / "rank1.log").read_text()
    assert rank1 == "", f"rank 1 wrote under the output dir:\n{rank1}"
    for name in ("metrics.jsonl", "train_config.yaml", "summary.json", "loss.png", "checkpoints", "adapter"):
        assert name in rank0, name
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert files == sorted(str(p.relative_to(runs.single())) for p in runs.single().rglob("*"))
    assert runs.ddp_output.count("eval loss after") == 1  # one log, rank 0's


def test_fsdp2_equals_ddp_in_peft_format(runs):
    fsdp, ddp = runs.fsdp(), runs.ddp()
    assert_same_run(fsdp, ddp, atol=1e-5)
    assert json.loads((fsdp / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((ddp / "adapter" / "adapter_config.json").read_text())
    a = adapter(fsdp)
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in a)
    assert a["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)  # full, not a shard


def _resumable_copy(run: Path, dest: Path) -> Path:
    """``run`` as if it had been killed just before writing its adapter, its last checkpoint at step 3 (the rows of
    steps 4-6 and the final eval row already written: resume must drop them, :func:`assert_same_run` checks)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "adapter")
    assert [p.name for p in (dest / "checkpoints").iterdir()] == ["step-0000003"]
    return dest


def test_two_rank_run_resumes_from_its_checkpoint(runs):
    ddp = runs.ddp()
    again = _resumable_copy(ddp, runs.root / "ddp-resumed")
    res = torchrun(*_args(runs.d, again), "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resumed from" in res.stdout and "at step 3/6" in res.stdout
    assert_same_run(again, ddp, atol=1e-6)


def test_fsdp2_run_resumes_from_its_checkpoint(runs):
    fsdp = runs.fsdp()
    again = _resumable_copy(fsdp, runs.root / "fsdp-resumed")
    res = torchrun(*_args(runs.d, again, "--fsdp", "true"), "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_run(again, fsdp, atol=1e-6)


def test_fsdp2_resume_restores_trained_biases_and_modules_to_save(tmp_path):
    """Under FSDP2 the trained biases and modules_to_save are sharded like the base: resume must restore them
    (sharded as they are) and end exactly where the uninterrupted run does."""
    d = make_run_dir(tmp_path, attention_bias=True)
    extra = ("--fsdp", "true", "--lora.bias", "all", "--lora.modules_to_save", "[norm]",
             "--lora.target_modules", "[q_proj, v_proj]")
    res = torchrun(*_args(d, tmp_path / "fsdp", *extra))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "base_model.model.model.norm.weight" in adapter(tmp_path / "fsdp")
    again = _resumable_copy(tmp_path / "fsdp", tmp_path / "resumed")
    res = torchrun(*_args(d, again, *extra), "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_run(again, tmp_path / "fsdp", atol=0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_process_resumes_a_two_rank_checkpoint(runs, mode, capsys):
    """The global batch does not depend on the world size, so one process continues a 2-rank run."""
    again = _resumable_copy(getattr(runs, mode)(), runs.root / f"{mode}-on-one")
    assert single(*_args(runs.d, again), "--resume") == 0
    assert "(written by 2 ranks)" in capsys.readouterr().out
    assert_same_run(again, runs.single(), atol=1e-4)


@pytest.mark.parametrize("case", ["missing", "different"])
def test_a_rank_without_the_same_data_stops_every_rank(runs, tmp_path, case):
    """Rank 1 reads train-1.jsonl, rank 0 train-0.jsonl: rank 1's is missing, or holds other examples."""
    d = runs.d
    shutil.copy(d / "train.jsonl", tmp_path / "train-0.jsonl")
    if case == "different":
        lines = (d / "train.jsonl").read_text().splitlines(keepends=True)
        (tmp_path / "train-1.jsonl").write_text("".join(lines[:40]))
    args = _args(d, tmp_path / "out")
    args[args.index("--train-data") + 1] = str(tmp_path / "train-{rank}.jsonl")
    res = torchrun(*args, worker=True)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("loratune train: error:")]
    if case == "missing":  # rank 0 names the rank that failed; rank 1 prints its own error
        assert len(errors) == 2 and sum("rank 1 of 2" in e for e in errors) == 1, res.stderr
        assert all("train-1.jsonl" in e for e in errors), res.stderr
    else:  # both ranks detect it; rank 0 prints it
        assert len(errors) == 1 and "rank 1 of 2" in errors[0] and "different training/eval data" in errors[0], res.stderr
        assert "40 examples" in errors[0] and "64 examples" in errors[0]
    assert "exitcode  : 2" in res.stderr  # stopped with the user-error code, none hung
    assert not (tmp_path / "out").exists()


# -- misconfigured worlds are refused before any process group exists: checked in this process ------------------
def _as_rank(monkeypatch, rank: int, world: int, **extra: str) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    for k, v in extra.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("extra, words", [
    (["--grad-accum", "3"], "grad_accum must be a multiple of the world size 2"),
    (["--fsdp", "true", "--quantize", "nf4"], "fsdp cannot shard nf4-quantized base weights"),
    (["--fsdp", "true", "--eval-generate", "2"], "eval_generate needs the whole model on one device"),
])
def test_misconfigured_world_is_one_line_exit_2(tiny_run_dir, monkeypatch, capsys, extra, words):
    _as_rank(monkeypatch, 0, 2)
    args = _args(tiny_run_dir, tiny_run_dir / "out")
    args[args.index("--grad-accum") + 1] = "2"
    assert single(*args, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("loratune train: error: ") and words in err[-1]
    assert not (tiny_run_dir / "out").exists()


def test_same_error_on_every_rank_is_printed_by_rank_0_only(tiny_run_dir, monkeypatch, capsys):
    _as_rank(monkeypatch, 1, 2)
    assert single(*_args(tiny_run_dir, tiny_run_dir / "out"), "--grad-accum", "3") == 2
    assert "error" not in capsys.readouterr().err


def test_incomplete_torchrun_environment(tiny_run_dir, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert single(*_args(tiny_run_dir, tiny_run_dir / "out")) == 2
    assert "RANK set but WORLD_SIZE is not" in capsys.readouterr().err
