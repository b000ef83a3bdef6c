"""loratune inspect: ΔW spectra from the LoRA factors, effective ranks, the suggested r, the CLI and the plot."""
import json
import math
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_qwen3
from loratune import LoraConfig, get_lora_model
from loratune.adapters import CONFIG_NAME, WEIGHTS_NAME
from loratune.cli import main
from loratune.inject import lora_layers
from loratune.inspect import (
    effective_rank, factor_spectrum, format_report, inspect_adapter, module_spectrum, next_power_of_two,
    percentile_nearest_rank, plot_spectra, suggest_rank,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _dense_svdvals(A, B, s):
    return torch.linalg.svdvals(s * (B.double() @ A.double()))


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the factor-based spectrum ---------------------------------------------------------------------------------
@pytest.mark.parametrize("out_f, in_f, r", [
    (64, 32, 8), (16, 48, 4), (5, 5, 1), (1, 7, 3), (7, 1, 3),
    (3, 5, 8),   # r > out and r > in
    (10, 4, 6),  # r > in
    (4, 10, 6),  # r > out
])
def test_factor_spectrum_matches_dense_svd(out_f, in_f, r):
    A, B = _randn(r, in_f, seed=1), _randn(out_f, r, seed=2)
    s = 0.7
    ours = factor_spectrum(A, B, s)
    assert ours.dtype == torch.float64 and ours.shape == (min(r, out_f, in_f),)
    torch.testing.assert_close(ours, _dense_svdvals(A, B, s)[: min(r, out_f, in_f)], rtol=1e-10, atol=1e-12)
    assert torch.all(ours[:-1] >= ours[1:])  # descending


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factor_spectrum_low_precision_factors_computed_in_float64(dtype):
    A, B = _randn(8, 40, seed=3).to(dtype), _randn(24, 8, seed=4).to(dtype)
    torch.testing.assert_close(factor_spectrum(A, B, 2.0), _dense_svdvals(A, B, 2.0)[:8], rtol=1e-10, atol=1e-12)


def test_factor_spectrum_never_forms_the_dense_matrix():
    # ΔW would be 200,000 × 300,000 (4.8e11 float64 entries); the factors are a few MB.
    out_f, in_f, r = 200_000, 300_000, 3
    rot = torch.linalg.qr(_randn(r, r, seed=5)).Q  # any r×r rotation between B and A leaves ΔW unchanged
    B = torch.zeros(out_f, r, dtype=torch.float64)
    B[0, 0], B[1, 1], B[2, 2] = 3.0, 2.0, 0.5
    A = torch.zeros(r, in_f, dtype=torch.float64)
    A[0, 10], A[1, 20], A[2, 30] = 1.0, 1.0, 1.0
    sv = factor_spectrum(rot.t() @ A, B @ rot, 4.0)  # (B·rot)(rotᵀ·A) = B·A
    torch.testing.assert_close(sv, torch.tensor([12.0, 8.0, 2.0], dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("zero_cols", [[1], [1, 4], [0, 2, 5]])
def test_rank_deficient_b_gives_exactly_k_nonzero_singular_values(zero_cols):
    out_f, in_f, r = 32, 24, 6
    A, B = _randn(r, in_f, seed=6), _randn(out_f, r, seed=7)
    B[:, zero_cols] = 0.0
    k = r - len(zero_cols)
    m = module_spectrum("layers.0.q_proj", A, B, 1.5)
    sv = torch.tensor(m.singular_values, dtype=torch.float64)
    assert m.numerical_rank == k
    assert torch.all(sv[:k] > 1e-3 * sv[0]) and torch.all(sv[k:] <= 1e-13 * sv[0])
    torch.testing.assert_close(sv[:k], _dense_svdvals(A, B, 1.5)[:k], rtol=1e-10, atol=0)


def test_rank_deficient_by_dependent_columns_and_zero_rows():
    A, B = _randn(3, 20, seed=8), _randn(16, 3, seed=9)
    B[:, 2] = 2 * B[:, 0]  # B·A = b0·(a0 + 2·a2) + b1·a1: rank 2
    assert module_spectrum("x", A, B, 1.0).numerical_rank == 2
    A2 = _randn(4, 20, seed=10)
    A2[3] = 0.0  # a zero row of A removes one direction too
    assert module_spectrum("x", A2, _randn(16, 4, seed=11), 1.0).numerical_rank == 3


def test_zero_update():
    m = module_spectrum("layers.0.v_proj", _randn(4, 8), torch.zeros(8, 4, dtype=torch.float64), 2.0)
    assert m.singular_values == (0.0,) * 4 and m.frobenius_norm == 0.0
    assert (m.k90, m.k99, m.numerical_rank, m.stable_rank, m.saturated) == (0, 0, 0, None, False)


def test_bad_factors_refused():
    with pytest.raises(ValueError, match="same r"):
        factor_spectrum(torch.zeros(4, 8), torch.zeros(8, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        factor_spectrum(torch.full((2, 3), float("nan")), torch.zeros(3, 2))


# -- effective rank and the suggested r ----------------------------------------------------------------------------
@pytest.mark.parametrize("sv, energy, k", [
    ([3, 1], 0.90, 1),                 # σ² = 9, 1: 9 of 10 is exactly 90%
    ([3, 1], 0.99, 2),
    ([1, 3], 0.90, 1),                 # sorted first
    ([4, 2, 1, 1, 1, 1], 0.50, 1),     # σ² = 16, 4, 1, 1, 1, 1 (24): partial sums 16, 20, 21, 22, 23, 24
    ([4, 2, 1, 1, 1, 1], 0.80, 2),     # 19.2 → 20
    ([4, 2, 1, 1, 1, 1], 0.90, 4),     # 21.6 → 22
    ([4, 2, 1, 1, 1, 1], 0.99, 6),     # 23.76 → 24
    ([2, 1, 0, 0], 1.00, 2),           # trailing zeros never count
    ([0.1] * 10, 0.90, 9),             # an exact boundary that float rounding of 0.1² would otherwise miss
    ([0.1] * 10, 0.99, 10),
    ([5], 0.99, 1),
    ([0, 0, 0], 0.99, 0),              # ΔW = 0
    ([], 0.99, 0),
])
def test_effective_rank_by_hand(sv, energy, k):
    assert effective_rank(sv, energy) == k
    assert effective_rank(torch.tensor(sv, dtype=torch.float32), energy) == k


def test_effective_rank_bad_energy():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="energy"):
            effective_rank([1.0], bad)


def test_suggested_r_rule():
    assert [next_power_of_two(k) for k in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]
    ks = [12, 3, 5, 6, 6, 7, 7, 8, 8, 9]
    assert percentile_nearest_rank(ks, 90) == 9      # sorted: position ⌈0.9·10⌉ = 9 → 9
    assert percentile_nearest_rank(ks, 50) == 7      # position 5
    assert percentile_nearest_rank(ks, 100) == 12    # the maximum
    assert percentile_nearest_rank(ks, 1) == 3       # position 1
    assert suggest_rank(ks) == 16 and suggest_rank(ks, 50) == 8 and suggest_rank(ks, 100) == 16
    # an outlier module does not set r for everyone at the 90th percentile; the maximum would
    ks = [4] * 18 + [30, 30]
    assert suggest_rank(ks) == 4 and suggest_rank(ks, 100) == 32
    assert suggest_rank([0, 0, 3]) == 4             # zero ΔW carries no information
    assert suggest_rank([0, 0]) is None and suggest_rank([]) is None
    assert suggest_rank([1]) == 1 and suggest_rank([2]) == 2
    with pytest.raises(ValueError):
        percentile_nearest_rank([1], 0)


# -- adapters --------------------------------------------------------------------------------------------------
def _adapter(tmp_path, name="ad", layers=2, seed=1, **kw):
    """A saved adapter with random (as if trained) A and B on a tiny Qwen3; returns (dir, LoraModel)."""
    model = get_lora_model(make_tiny_qwen3(num_hidden_layers=layers), LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.save_pretrained(tmp_path / name), model


PATTERNS = dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"v_proj": 3})


def test_adapter_spectra_match_the_layers_delta_weight(tmp_path):
    path, model = _adapter(tmp_path, **PATTERNS)
    report = inspect_adapter(path)
    layers = dict(lora_layers(model.model))
    assert [m.name for m in report.modules] == sorted(layers, key=lambda n: (n != "model.embed_tokens", n))
    for m in report.modules:
        layer = layers[m.name]
        assert m.scaling == pytest.approx(layer.scaling["default"], rel=1e-12)
        dense = torch.linalg.svdvals(layer.delta_weight("default").detach().double())[: m.max_rank]
        # the reference is a dense fp32 ΔW, so it is only fp32-accurate
        torch.testing.assert_close(torch.tensor(m.singular_values, dtype=torch.float64), dense, rtol=1e-5,
                                   atol=1e-5 * float(dense[0]))
    by_name = {m.name: m for m in report.modules}
    q, v, down1 = (by_name[f"model.layers.{i}.{n}"] for i, n in ((0, "self_attn.q_proj"), (0, "self_attn.v_proj"),
                                                                   (1, "mlp.down_proj")))
    assert (q.r, q.scaling) == (2, pytest.approx(8 / math.sqrt(2)))   # rank_pattern, rsLoRA
    assert (v.r, v.scaling) == (4, pytest.approx(3 / 2))              # alpha_pattern: 3/√4
    assert (down1.r, down1.scaling) == (6, pytest.approx(8 / math.sqrt(6)))
    emb = by_name["model.embed_tokens"]
    assert emb.kind == "embedding" and emb.a_shape == (4, 128) and emb.b_shape == (64, 4)
    assert emb.params == 4 * 128 + 64 * 4


def test_zero_adapter_has_no_suggestion(tmp_path):
    model = get_lora_model(make_tiny_qwen3(), LoraConfig(r=4))  # B = 0 at init: ΔW = 0
    report = inspect_adapter(model.save_pretrained(tmp_path / "ad"))
    assert report.suggestion.r is None and report.suggestion.zero_modules == len(report.modules) == 8
    assert "every ΔW is zero" in format_report(report)


def test_low_rank_updates_give_a_small_suggestion(tmp_path):
    """r = 8 trained, but every ΔW has rank 2 (B with 6 zero columns): the suggestion is 2, per type too."""
    path, _ = _adapter(tmp_path, r=8, target_modules=["q_proj", "o_proj"])
    tensors = load_file(path / WEIGHTS_NAME)
    for key, t in tensors.items():
        if key.endswith("lora_B.weight"):
            t[:, 2:] = 0.0
    save_file(tensors, path / WEIGHTS_NAME)
    report = inspect_adapter(path)
    assert {m.numerical_rank for m in report.modules} == {2} and {m.k99 for m in report.modules} <= {1, 2}
    s = report.suggestion
    assert s.r == 2 and s.saturated_modules == 0 and s.notes == []
    assert [t.suggested_r for t in report.types] == [2, 2] and [t.module_type for t in report.types] == ["o_proj", "q_proj"]


def test_bad_adapter_files(tmp_path):
    path, _ = _adapter(tmp_path, r=4)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(ValueError, match=r"self_attn\.k_proj has rank 4 but .*adapter_config.json gives r=8"):
        inspect_adapter(path)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    tensors = load_file(path / WEIGHTS_NAME)
    tensors.pop("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight")
    save_file(tensors, path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj has a LoRA A tensor but no B"):
        inspect_adapter(path)
    save_file({"base_model.model.score.weight": torch.zeros(2, 2)}, path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="no LoRA tensors"):
        inspect_adapter(path)
    with pytest.raises(ValueError, match="percentile"):
        inspect_adapter(path, percentile=0)


def test_table_for_many_layers(tmp_path, capsys):
    path, _ = _adapter(tmp_path, layers=12, r=4, target_modules=["q_proj", "v_proj"])
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 24 and rows.index("model.layers.10.self_attn.q_proj") > rows.index("model.layers.9.self_attn.v_proj")
    assert "suggested r:" in out and "rule: 90th percentile over modules of k99%" in out
    assert main(["inspect", str(path), "--summary", "--percentile", "100"]) == 0
    out = capsys.readouterr().out
    assert not any(line.startswith("model.layers.") for line in out.splitlines())
    types = [line.split()[0] for line in out.splitlines() if line.startswith(("q_proj ", "v_proj "))]
    assert types == ["q_proj", "v_proj"] and "rule: maximum over modules" in out


def test_plot_is_atomic_and_checked(tmp_path):
    path, _ = _adapter(tmp_path, r=4)
    report = inspect_adapter(path)
    target = tmp_path / "plots" / "spectrum.png"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_spectra(report, target)
    target.parent.mkdir()
    target.write_bytes(b"old")
    plot_spectra(report, target)
    assert target.read_bytes().startswith(PNG_SIGNATURE) and report.plot == str(target)
    assert [p.name for p in target.parent.iterdir()] == ["spectrum.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="is a directory"):
        plot_spectra(report, target.parent)


# -- the command line, as a user runs it -----------------------------------------------------------------------
def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "loratune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_cli_json_and_plot(tmp_path):
    path, _ = _adapter(tmp_path, **PATTERNS)
    before = sorted(p.name for p in path.iterdir())
    plot = tmp_path / "spectrum.png"
    res = run_cli("inspect", str(path), "--json", "--plot", str(plot))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["adapter"] == str(path) and data["plot"] == str(plot)
    assert data["config"]["use_rslora"] is True and data["config"]["rank_pattern"] == PATTERNS["rank_pattern"]
    assert data["lora_modules"] == len(data["modules"]) == 7  # embed_tokens + 2 × (q, v, down)
    assert data["lora_params"] == sum(m["params"] for m in data["modules"])
    mods = {m["name"]: m for m in data["modules"]}
    q = mods["model.layers.0.self_attn.q_proj"]
    assert q["a_shape"] == [2, 64] and q["b_shape"] == [64, 2] and q["scaling"] == pytest.approx(8 / math.sqrt(2))
    assert len(q["singular_values"]) == 2 and q["frobenius_norm"] == pytest.approx(math.hypot(*q["singular_values"]))
    assert mods["model.layers.1.mlp.down_proj"]["r"] == 6
    for m in data["modules"]:
        assert m["effective_rank_90"] == effective_rank(m["singular_values"], 0.9)
        assert m["effective_rank_99"] == effective_rank(m["singular_values"], 0.99)
    s = data["suggestion"]
    assert s["r"] == suggest_rank([m["effective_rank_99"] for m in data["modules"]]) and s["percentile"] == 90
    assert "90th percentile" in s["rule"]
    assert [t["module_type"] for t in data["module_types"]] == ["embed_tokens", "down_proj", "q_proj", "v_proj"]
    png = plot.read_bytes()
    assert png.startswith(PNG_SIGNATURE) and png[12:16] == b"IHDR" and png.endswith(b"IEND\xaeB`\x82")
    width, height = struct.unpack(">II", png[16:24])
    assert width > 200 and height > 200
    assert sorted(p.name for p in path.iterdir()) == before  # the adapter directory is never written to


def test_cli_bad_directory_is_one_line_exit_2(tmp_path):
    res = run_cli("inspect", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"loratune inspect: error: adapter directory {tmp_path / 'nowhere'} does not exist"
