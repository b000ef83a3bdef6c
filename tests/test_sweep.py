"""Rank sweeps: a real two-rank sweep on a tiny model (table, JSON, plot, skip on rerun, config guard), the
recommendation rule on hand-made results, the alpha rules and the fingerprint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loratune.config import LoraConfig
from loratune.sweep import (RankResult, SweepConfigMismatch, fingerprint, format_table, parse_ranks, rank_config,
                            recommend, run_sweep, sweep_identity, SweepReport, plot_sweep, write_outputs)
from loratune.train import TrainConfig

PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(d: Path, **kw) -> TrainConfig:
    base = dict(model=str(d / "model"), train_data=str(d / "train.jsonl"), eval_data=str(d / "eval.jsonl"),
                batch_size=8, max_steps=6, lr=2e-2, warmup_ratio=0.0, output_dir=str(d / "sweep"), threads=1,
                eval_generate=2, max_new_tokens=4, lora=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    base.update(kw)
    return TrainConfig(**base)


def _quiet(*_a, **_k):
    pass


def _mtimes(out: Path) -> dict[str, int]:
    """Modification times of every rank's adapter files and result: retraining would rewrite them."""
    files = list(out.glob("r*/adapter/*")) + list(out.glob("r*/sweep_result.json"))
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


# -- the real thing: a two-rank sweep -----------------------------------------------------------------------------
def test_two_rank_sweep_writes_table_plot_and_skips_on_rerun(tiny_run_dir):
    d = tiny_run_dir
    out = d / "sweep"
    lines: list[str] = []
    rep = run_sweep(_cfg(d), ranks="2,1", progress=False, log=lines.append)
    assert rep.ranks == [1, 2] and rep.trained == [1, 2] and rep.skipped == []

    # every rank is a normal training output dir, plus its sweep_result.json
    for r in (1, 2):
        rank = out / f"r{r}"
        assert {"adapter", "metrics.jsonl", "summary.json", "train_config.yaml", "sweep_result.json"} <= \
            {p.name for p in rank.iterdir()}
        assert json.loads((rank / "adapter" / "adapter_config.json").read_text())["r"] == r

    data = json.loads((out / "sweep.json").read_text())
    rows = {row["r"]: row for row in data["results"]}
    assert sorted(rows) == [1, 2] and data["alpha_rule"] == "proportional"
    # proportional: alpha = (16/8)·r, s = 2 at every rank
    assert [(rows[r]["lora_alpha"], rows[r]["scaling"]) for r in (1, 2)] == [(2, 2.0), (4, 4 / 2)]
    # all-linear on the tiny Qwen3 (2 layers × 7 linears): params = r·Σ(in+out), so exactly twice at r=2
    assert rows[2]["trainable_params"] == 2 * rows[1]["trainable_params"] > 0
    assert rows[2]["adapter_bytes"] > rows[1]["adapter_bytes"] > 0
    for row in rows.values():
        assert row["eval_loss"] > 0 and row["steps"] == 6 and row["wall_seconds"] >= row["train_seconds"] > 0
        assert 0.0 <= row["exact_match"] <= 1.0 and row["exact_match_text"].endswith("/2)")
        assert row["fingerprint"] == data["fingerprint"]
    assert data["recommendation"]["r"] in (1, 2)

    md = (out / "sweep.md").read_text()
    assert "| r " in md and "eval loss" in md and "exact match" in md and "trainable params" in md
    assert f"recommended r = {data['recommendation']['r']}" in md
    assert (out / "sweep.png").read_bytes()[:8] == PNG
    assert not list(out.glob(".*tmp*"))

    # rerun: nothing is retrained (adapter files untouched, the log says so), the outputs are rewritten
    before = _mtimes(out)
    lines.clear()
    again = run_sweep(_cfg(d), ranks=[1, 2], progress=False, log=lines.append)
    assert again.trained == [] and again.skipped == [1, 2]
    assert sum("skipping" in line for line in lines) == 2 and not any("training" in line for line in lines)
    assert _mtimes(out) == before
    assert [x.eval_loss for x in again.results] == [rows[1]["eval_loss"], rows[2]["eval_loss"]]

    # threads is not part of the fingerprint; a new rank next to finished ones trains only itself
    more = run_sweep(_cfg(d, threads=2), ranks=[1, 2, 4], progress=False, log=_quiet)
    assert more.trained == [4] and more.skipped == [1, 2] and _mtimes(out).items() > before.items()
    assert len(json.loads((out / "sweep.json").read_text())["results"]) == 3

    # a changed recipe must not reuse the old results: an error naming the difference, before any training
    with pytest.raises(SweepConfigMismatch, match=r"lr: 0\.02 → 0\.01"):
        run_sweep(_cfg(d, lr=1e-2), ranks=[1, 2], progress=False, log=_quiet)
    with pytest.raises(SweepConfigMismatch, match="alpha_rule: proportional → fixed"):
        run_sweep(_cfg(d), ranks=[1], alpha_rule="fixed", progress=False, log=_quiet)
    assert {k: v for k, v in _mtimes(out).items() if k in before} == before

    # --overwrite retrains what differs
    redo = run_sweep(_cfg(d, lr=1e-2), ranks=[1], overwrite=True, progress=False, log=_quiet)
    assert redo.trained == [1]
    assert json.loads((out / "r1" / "sweep_result.json").read_text())["fingerprint"] == redo.fingerprint != data["fingerprint"]


def test_unfinished_rank_resumes_from_its_checkpoint_and_foreign_dirs_are_refused(tiny_run_dir):
    from loratune.train import train

    d = tiny_run_dir
    cfg = _cfg(d, save_every=3, eval_generate=0)
    # A rank that stopped before its sweep_result.json: its checkpoint at step 3 is there.
    train(rank_config(cfg, 2, "proportional", d / "sweep"), progress=False, log=_quiet)
    assert (d / "sweep" / "r2" / "checkpoints" / "step-0000003" / "state.json").is_file()
    lines: list[str] = []
    rep = run_sweep(cfg, ranks=[2], progress=False, log=lines.append)
    assert rep.trained == [2] and any(line.startswith("sweep r=2: resuming") for line in lines)
    assert any("resumed from" in line for line in lines) and rep.results[0].steps == 6

    # an unfinished run made with another configuration is not resumed
    (d / "sweep" / "r4").mkdir()
    other = rank_config(_cfg(d, lr=1e-3), 4, "proportional", d / "sweep")
    from loratune.recipe import dump_yaml
    (d / "sweep" / "r4" / "train_config.yaml").write_text(dump_yaml(other))
    with pytest.raises(SweepConfigMismatch, match=r"unfinished run .*lr: 0\.001 → 0\.02"):
        run_sweep(cfg, ranks=[4], progress=False, log=_quiet)
    # a directory that is not a run is never deleted
    (d / "sweep" / "r8").mkdir()
    (d / "sweep" / "r8" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a loratune run"):
        run_sweep(cfg, ranks=[8], progress=False, log=_quiet)
    assert (d / "sweep" / "r8" / "notes.txt").read_text() == "mine"


def test_sweep_cli(tiny_run_dir):
    """`loratune sweep` as a user runs it: table on stdout, files written; a changed option is a one-line error."""
    d = tiny_run_dir
    args = [sys.executable, "-m", "loratune", "sweep", "--ranks", "1,2", "--model", str(d / "model"),
            "--train-data", str(d / "train.jsonl"), "--eval-data", str(d / "eval.jsonl"), "--max-steps", "4",
            "--batch-size", "8", "--lr", "2e-2", "--threads", "1", "--lora.target_modules", "all-linear",
            "--alpha-rule", "rslora", "--output-dir", str(d / "cli"), "--no-progress", "--eval-generate", "0"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "recommended r = " in res.stdout and "| r " in res.stdout and "sweep.png" in res.stdout
    for name in ("sweep.md", "sweep.json", "sweep.png"):
        assert (d / "cli" / name).is_file()
    rows = json.loads((d / "cli" / "sweep.json").read_text())["results"]
    assert [(x["lora_alpha"], x["use_rslora"]) for x in rows] == [(16, True), (16, True)]
    assert "exact match" not in (d / "cli" / "sweep.md").read_text()  # eval_generate 0: loss only

    res = subprocess.run(args + ["--seed", "1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("loratune sweep: error: ")
    assert "seed: 0 → 1" in res.stderr and "--overwrite" in res.stderr


# -- the recommendation rule --------------------------------------------------------------------------------------
def _res(r, loss, em=None, diverged=None):
    return RankResult(r=r, lora_alpha=2 * r, use_rslora=False, scaling=2.0, eval_loss=loss, exact_match=em,
                      diverged=diverged)


def test_recommend_smallest_rank_within_loss_margin():
    rows = [_res(1, 1.30), _res(2, 1.10), _res(4, 1.02), _res(8, 1.00), _res(16, 1.01)]
    rec = recommend(rows, margin=0.02)
    assert (rec.r, rec.best_loss_r, rec.best_loss, rec.candidates) == (4, 8, 1.00, [4, 8, 16])
    assert "within 2% of the best" in rec.sentence() and rec.accuracy_margin is None
    assert recommend(rows, margin=0.0).r == 8
    assert recommend(rows, margin=0.10).r == 2
    assert recommend(rows, margin=0.5).r == 1
    # exactly at the edge counts as within
    assert recommend([_res(1, 1.05), _res(2, 1.0)], margin=0.05).r == 1
    assert "largest rank swept" in recommend([_res(1, 2.0), _res(2, 1.0)]).note


def test_recommend_with_exact_match_needs_both_margins():
    rows = [_res(1, 1.01, em=0.50), _res(2, 1.00, em=0.80), _res(4, 1.005, em=0.79), _res(8, 1.20, em=0.90)]
    rec = recommend(rows, margin=0.02)  # accuracy within 2 points of 0.90: none of the low-loss ranks
    assert rec.r is None and rec.best_accuracy_r == 8 and rec.best_loss_r == 2
    assert "no rank meets both margins" in rec.sentence()
    rec = recommend(rows, margin=0.02, accuracy_margin=0.12)  # ≥ 0.78: r=2 and r=4 qualify on accuracy
    assert rec.r == 2 and rec.candidates == [2, 4]
    assert "exact match is within 12 points" in rec.rule
    rows[-1] = _res(8, 1.20, em=0.81)
    assert recommend(rows, margin=0.02).r == 2          # 0.80 ≥ 0.81 − 0.02; r=1 fails on accuracy
    assert recommend(rows, margin=0.02, accuracy_margin=0.40).r == 1


def test_recommend_ignores_diverged_and_handles_empty():
    rows = [_res(1, None, diverged="loss became nan"), _res(2, 1.0), _res(4, 0.99)]
    assert recommend(rows).r == 2
    empty = recommend([])
    assert empty.r is None and "no rank finished" in empty.sentence()
    with pytest.raises(ValueError):
        recommend(rows, margin=-0.1)


def test_table_and_plot_from_hand_made_results(tmp_path):
    rows = [_res(1, 1.3, em=0.2), _res(2, None, diverged="loss became nan at step 3"), _res(4, 1.0, em=0.6)]
    for x in rows:
        x.trainable_params, x.adapter_bytes, x.exact_match_text = 1000 * x.r, 4000 * x.r, "text"
        x.exact_match_before = 0.0
    rep = SweepReport(tmp_path, [1, 2, 4, 8], "proportional", "abc", rows, recommend(rows),
                      config={})
    table = format_table(rep)
    assert "diverged" in table and "Not run yet: r = 8" in table and "4 ◀" in table
    assert "Base model before training (exact match): 0.0%" in table
    plot_sweep(rep, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG
    write_outputs(rep)
    assert json.loads((tmp_path / "sweep.json").read_text())["recommendation"]["r"] == 4


# -- alpha rules and the fingerprint ------------------------------------------------------------------------------
def test_alpha_rules(tmp_path):
    cfg = TrainConfig(lora=LoraConfig(r=8, lora_alpha=16))
    prop = {r: rank_config(cfg, r, "proportional", tmp_path) for r in (1, 2, 32)}
    assert [(c.lora.r, c.lora.lora_alpha, c.lora.use_rslora) for c in prop.values()] == \
        [(1, 2, False), (2, 4, False), (32, 64, False)]
    assert all(c.lora.scaling_for("x") == 2.0 for c in prop.values())
    assert prop[2].output_dir == str(tmp_path / "r2") and prop[2].lr == cfg.lr and prop[2].seed == cfg.seed
    fixed = rank_config(cfg, 4, "fixed", tmp_path)
    assert (fixed.lora.lora_alpha, fixed.lora.use_rslora, fixed.lora.scaling_for("x")) == (16, False, 4.0)
    rs = rank_config(cfg, 4, "rslora", tmp_path)
    assert (rs.lora.lora_alpha, rs.lora.use_rslora, rs.lora.scaling_for("x")) == (16, True, 8.0)
    assert rank_config(TrainConfig(lora=LoraConfig(r=3, lora_alpha=5)), 6, "proportional", tmp_path).lora.lora_alpha == 10
    with pytest.raises(ValueError, match="use_rslora"):
        rank_config(TrainConfig(lora=LoraConfig(use_rslora=True)), 4, "proportional", tmp_path)
    with pytest.raises(ValueError, match="rank_pattern"):
        rank_config(TrainConfig(lora=LoraConfig(rank_pattern={"q_proj": 4})), 4, "fixed", tmp_path)
    with pytest.raises(ValueError, match="alpha rule"):
        rank_config(cfg, 4, "double", tmp_path)
    with pytest.raises(ValueError, match="held-out"):
        rank_config(TrainConfig(eval_data=None, eval_fraction=0.0), 4, "fixed", tmp_path)


def test_fingerprint_ignores_r_alpha_and_outputs_but_not_the_recipe(tmp_path):
    cfg = TrainConfig(lora=LoraConfig(r=8, lora_alpha=16))
    fp = fingerprint(sweep_identity(cfg, "proportional"))
    # every rank's own config gives the sweep's fingerprint (that is how an unfinished rank is recognised)
    for rule in ("proportional", "fixed", "rslora"):
        want = fingerprint(sweep_identity(cfg, rule))
        assert all(fingerprint(sweep_identity(rank_config(cfg, r, rule, tmp_path), rule)) == want for r in (1, 4, 64))
    import dataclasses
    same = dataclasses.replace(cfg, output_dir="elsewhere", threads=3, log_every=5, save_every=10, keep_last=4)
    assert fingerprint(sweep_identity(same, "proportional")) == fp
    # r=4, alpha=8 has the same alpha/r: a proportional sweep from it is the same sweep
    assert fingerprint(sweep_identity(dataclasses.replace(cfg, lora=cfg.lora.replace(r=4, lora_alpha=8)),
                                      "proportional")) == fp
    for changed in (dict(lr=1e-3), dict(seed=1), dict(max_steps=7), dict(eval_generate=3),
                    dict(lora=cfg.lora.replace(lora_alpha=32)), dict(lora=cfg.lora.replace(init="kaiming")),
                    dict(lora=cfg.lora.replace(target_modules=("q_proj",)))):
        assert fingerprint(sweep_identity(dataclasses.replace(cfg, **changed), "proportional")) != fp, changed
    assert fingerprint(sweep_identity(cfg, "fixed")) != fp


def test_parse_ranks():
    assert parse_ranks("32,1, 4,4,2") == [1, 2, 4, 32]
    assert parse_ranks([8, 2]) == [2, 8]
    for bad in ("0,1", "a", "", "1.5"):
        with pytest.raises(ValueError):
            parse_ranks(bad)
