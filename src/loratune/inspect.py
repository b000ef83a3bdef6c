"""``loratune inspect``: the singular-value spectrum of every ΔW in a trained adapter, and a suggested rank r.

For a LoRA module with A: r×in and B: out×r the update is ΔW = s·B·A (out×in), s = alpha/r (alpha/√r with
rsLoRA, per-module r and alpha from rank_pattern/alpha_pattern). Its singular values are computed **from the
factors only**, never forming the dense out×in matrix (see :func:`factor_spectrum`), in float64.

From the spectrum σ_1 ≥ σ_2 ≥ … ≥ σ_m (m = min(r, out, in)):

* ‖ΔW‖_F = √(Σ σ_i²), the size of the update;
* the effective rank at energy p, k_p = the smallest k with Σ_{i≤k} σ_i² ≥ p·Σ_i σ_i² (:func:`effective_rank`),
  reported for p = 90% and 99%: how many directions carry (almost) all of the update;
* the stable rank ‖ΔW‖_F² / σ_1² (a smooth lower bound on the rank: 1 when one direction dominates).

**Suggested r** (:func:`suggest_rank`): the 90th percentile (nearest-rank method) of the 99%-energy effective
ranks k_99 over the modules whose ΔW is not zero, rounded up to a power of two. In words: "the smallest power of
two r with which at least 90% of the modules could keep 99% of their update's energy". The 90th percentile rather
than the maximum keeps one outlier module from setting r for all of them (give that module more rank with
rank_pattern instead; the per-type table suggests one r per module type for that). Caveats: it describes the
ΔW this training run found at this r; when many modules need their full rank (``saturated``) the spectrum cannot
tell whether a larger r would help, and a smaller r trained from scratch may land elsewhere — confirm with a sweep.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .adapters import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from .config import LoraConfig, layer_index
from .fileio import write_figure

SUGGEST_ENERGY = 0.99
"""Energy fraction whose effective rank the suggestion is based on."""
SUGGEST_PERCENTILE = 90.0
"""Default percentile (over modules) of the 99%-energy effective ranks."""
ENERGY_RTOL = 1e-12
"""Relative slack in the energy comparison, so that an exact split (e.g. 90% in the first direction) is not
missed by float64 rounding of the partial sums."""

_LINEAR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_(?P<ab>[AB])\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_embedding_(?P<ab>[AB])$")


# -- the mathematics ---------------------------------------------------------------------------------------------
def factor_spectrum(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Singular values of ΔW = s·B·A from the factors only, descending, float64, length min(r, out, in).

    Shapes: A is r×in, B is out×r (PEFT's lora_A/lora_B; for an embedding lora_embedding_A is r×num_embeddings
    and lora_embedding_B is dim×r, and its ΔW = (s·B·A)ᵀ has the same singular values).

    With reduced QR factorisations (m_B = min(out, r), m_A = min(in, r))::

        B  = Q_B R_B     Q_B: out×m_B (orthonormal columns), R_B: m_B×r
        Aᵀ = Q_A R_A     Q_A: in×m_A  (orthonormal columns), R_A: m_A×r
        ΔW = s·B·A = s·Q_B R_B R_Aᵀ Q_Aᵀ = Q_B (s·R_B R_Aᵀ) Q_Aᵀ

    and multiplying by matrices with orthonormal columns keeps singular values, so σ(ΔW) = σ(s·R_B R_Aᵀ), an
    m_B×m_A matrix: O((out+in)·r²) time and O((out+in)·r) memory instead of O(out·in·r) and O(out·in).
    When r > min(out, in) the reduced QR already truncates to the dimension, so this needs no special case.
    """
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"LoRA factors must be matrices; got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"A is r×in and B is out×r with the same r; got A {tuple(A.shape)}, B {tuple(B.shape)}")
    a, b = A.detach().to("cpu", torch.float64), B.detach().to("cpu", torch.float64)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("LoRA factors contain NaN or inf")
    m = min(A.shape[0], A.shape[1], B.shape[0])
    if m == 0:
        return torch.zeros(0, dtype=torch.float64)
    _, r_b = torch.linalg.qr(b, mode="r")      # m_B×r
    _, r_a = torch.linalg.qr(a.t(), mode="r")  # m_A×r
    core = (r_b @ r_a.t()) * float(scaling)  # m_B×m_A
    return torch.linalg.svdvals(core).abs()  # |s|·σ: a negative scaling (never valid in a config) can't flip signs


def effective_rank(singular_values: Sequence[float] | torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ energy·Σ_i σ_i² (σ sorted descending first); 0 when every σ is zero.

    ``energy`` is a fraction in (0, 1]. A relative slack of :data:`ENERGY_RTOL` absorbs rounding of the
    partial sums, so e.g. σ = (3, 1) at energy 0.9 gives k = 1 (9 of 10 exactly).
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a fraction in (0, 1], got {energy!r}")
    sv = torch.as_tensor(singular_values, dtype=torch.float64).abs().flatten()
    sq = torch.sort(sv, descending=True).values ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(sq, 0)
    reached = cumulative >= energy * total * (1.0 - ENERGY_RTOL)
    return int(torch.nonzero(reached)[0, 0]) + 1


def percentile_nearest_rank(values: Sequence[int], percentile: float) -> int:
    """The nearest-rank percentile: sorted ascending, the value at position ⌈p/100·n⌉ (1-based); p=100 is the max."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(percentile / 100.0 * len(ordered))) - 1]


def next_power_of_two(k: int) -> int:
    """The smallest power of two ≥ k (k ≥ 1): 1→1, 3→4, 8→8, 9→16."""
    if k < 1:
        raise ValueError(f"expected k ≥ 1, got {k}")
    return 1 << (k - 1).bit_length()


def suggest_rank(effective_ranks: Iterable[int], percentile: float = SUGGEST_PERCENTILE) -> int | None:
    """The suggested r: the nearest-rank ``percentile`` of the (99%-energy) effective ranks, up to a power of two.

    Zeros (modules whose ΔW is zero, e.g. untrained) carry no information and are left out; None when nothing
    is left. Example: k_99 = [3, 5, 6, 6, 7, 7, 8, 8, 9, 12] → 90th percentile 9 → r = 16.
    """
    ranks = [int(k) for k in effective_ranks if k > 0]
    if not ranks:
        return None
    return next_power_of_two(percentile_nearest_rank(ranks, percentile))


# -- per module ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleSpectrum:
    """One LoRA module of an adapter and the spectrum of its ΔW = s·B·A."""

    name: str
    """Module name in the model, e.g. ``model.layers.0.self_attn.q_proj``."""
    kind: str
    """"linear" (lora_A/lora_B; also Conv1D) or "embedding" (lora_embedding_A/B)."""
    a_shape: tuple[int, int]
    """A as stored: r×in (r×num_embeddings for an embedding)."""
    b_shape: tuple[int, int]
    """B as stored: out×r (dim×r for an embedding)."""
    scaling: float
    """s = alpha/r, or alpha/√r with rsLoRA, with this module's r and alpha."""
    singular_values: tuple[float, ...]
    """σ_1 ≥ … ≥ σ_m of ΔW, m = min(r, out, in)."""

    @property
    def module_type(self) -> str:
        """The last part of the name (q_proj, down_proj, embed_tokens): how modules are grouped."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def layer(self) -> int | None:
        """The layer number in the name (``model.layers.3.…`` → 3), None for e.g. embed_tokens."""
        return layer_index(self.name)

    @property
    def r(self) -> int:
        return self.a_shape[0]

    @property
    def max_rank(self) -> int:
        """min(r, out, in): the most directions ΔW can have."""
        return min(self.a_shape[0], self.a_shape[1], self.b_shape[0])

    @property
    def params(self) -> int:
        """Trainable parameters: r·in + out·r."""
        return math.prod(self.a_shape) + math.prod(self.b_shape)

    @property
    def frobenius_norm(self) -> float:
        """‖ΔW‖_F = √(Σ σ_i²)."""
        return math.sqrt(math.fsum(s * s for s in self.singular_values))

    @property
    def stable_rank(self) -> float | None:
        """‖ΔW‖_F² / σ_1² ∈ [1, rank]; None when ΔW = 0."""
        if not self.singular_values or self.singular_values[0] == 0.0:
            return None
        return math.fsum(s * s for s in self.singular_values) / self.singular_values[0] ** 2

    @property
    def numerical_rank(self) -> int:
        """Number of σ_i > σ_1·max(out, in)·ε_float64 (NumPy's matrix_rank tolerance for the dense ΔW)."""
        if not self.singular_values:
            return 0
        tol = self.singular_values[0] * max(self.a_shape[1], self.b_shape[0]) * torch.finfo(torch.float64).eps
        return sum(1 for s in self.singular_values if s > tol)

    def effective_rank(self, energy: float) -> int:
        """k_p: see :func:`effective_rank`."""
        return effective_rank(self.singular_values, energy)

    @cached_property
    def k90(self) -> int:
        return self.effective_rank(0.90)

    @cached_property
    def k99(self) -> int:
        return self.effective_rank(0.99)

    @property
    def saturated(self) -> bool:
        """True when 99% of the energy needs every available direction (k_99 = min(r, out, in) > 1)."""
        return self.max_rank > 1 and self.k99 == self.max_rank

    def to_dict(self) -> dict[str, Any]:
        return dict(name=self.name, module_type=self.module_type, layer=self.layer, kind=self.kind,
                    a_shape=list(self.a_shape), b_shape=list(self.b_shape), r=self.r, params=self.params,
                    scaling=self.scaling, frobenius_norm=self.frobenius_norm, stable_rank=self.stable_rank,
                    numerical_rank=self.numerical_rank, effective_rank_90=self.k90, effective_rank_99=self.k99,
                    saturated=self.saturated, singular_values=list(self.singular_values))


def module_spectrum(name: str, A: torch.Tensor, B: torch.Tensor, scaling: float, kind: str = "linear") -> ModuleSpectrum:
    """The :class:`ModuleSpectrum` of one module from its factors (A: r×in, B: out×r)."""
    sv = factor_spectrum(A, B, scaling)
    return ModuleSpectrum(name=name, kind=kind, a_shape=(int(A.shape[0]), int(A.shape[1])),
                          b_shape=(int(B.shape[0]), int(B.shape[1])), scaling=float(scaling),
                          singular_values=tuple(float(s) for s in sv))


# -- per module type and for the adapter ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TypeSummary:
    """All modules of one type (e.g. every q_proj) together."""

    module_type: str
    modules: tuple[ModuleSpectrum, ...]
    percentile: float = SUGGEST_PERCENTILE

    @property
    def ranks(self) -> list[int]:
        return sorted({m.r for m in self.modules})

    @property
    def scalings(self) -> list[float]:
        return sorted({m.scaling for m in self.modules})

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def nonzero_k99(self) -> list[int]:
        return [m.k99 for m in self.modules if m.k99 > 0]

    @property
    def mean_norm(self) -> float:
        return statistics.fmean(m.frobenius_norm for m in self.modules)

    @property
    def k99_percentile(self) -> int | None:
        ks = self.nonzero_k99
        return percentile_nearest_rank(ks, self.percentile) if ks else None

    @property
    def suggested_r(self) -> int | None:
        """The same rule as for the adapter, on this type's modules only (a rank_pattern candidate)."""
        return suggest_rank(self.nonzero_k99, self.percentile)

    def to_dict(self) -> dict[str, Any]:
        ks = self.nonzero_k99
        return dict(module_type=self.module_type, modules=len(self.modules), ranks=self.ranks,
                    scalings=self.scalings, params=self.params, mean_frobenius_norm=self.mean_norm,
                    median_effective_rank_90=_median([m.k90 for m in self.modules if m.k90 > 0]),
                    median_effective_rank_99=_median(ks), max_effective_rank_99=max(ks) if ks else None,
                    percentile_effective_rank_99=self.k99_percentile,
                    saturated_modules=sum(m.saturated for m in self.modules), suggested_r=self.suggested_r)


def _median(values: list[int]) -> float | None:
    return float(statistics.median(values)) if values else None


@dataclass(frozen=True)
class Suggestion:
    """The suggested r for the whole adapter and how it was reached."""

    r: int | None
    percentile: float
    energy: float
    percentile_rank: int | None
    """The ``percentile``-th percentile of k_99 over non-zero modules, before rounding up to a power of two."""
    modules_used: int
    zero_modules: int
    saturated_modules: int
    trained_ranks: list[int]

    @property
    def rule(self) -> str:
        p = f"{self.percentile:g}th percentile" if self.percentile < 100 else "maximum"
        return (f"{p} over modules of k{self.energy * 100:g}% (smallest k with σ_1²+…+σ_k² ≥ "
                f"{self.energy * 100:g}% of ‖ΔW‖_F²), rounded up to a power of two; zero ΔW left out")

    @property
    def notes(self) -> list[str]:
        out = []
        if self.r is None:
            out.append("every ΔW is zero (an untrained adapter?): the spectrum suggests nothing")
            return out
        if self.zero_modules:
            out.append(f"{self.zero_modules} module(s) have ΔW = 0 and were left out")
        if self.saturated_modules:
            out.append(f"{self.saturated_modules} of {self.modules_used} module(s) need every direction they have for "
                       f"{self.energy * 100:g}% of the energy: the spectrum cannot tell whether an r above the trained "
                       f"{_ranks(self.trained_ranks)} would help; compare with a run at a larger r")
        if self.r >= max(self.trained_ranks):
            out.append(f"the suggestion is not below the trained r ({_ranks(self.trained_ranks)}): keep it, or sweep larger")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(r=self.r, rule=self.rule, percentile=self.percentile, energy=self.energy,
                    percentile_effective_rank=self.percentile_rank, modules_used=self.modules_used,
                    zero_modules=self.zero_modules, saturated_modules=self.saturated_modules,
                    trained_ranks=self.trained_ranks, notes=self.notes)


def _ranks(ranks: list[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"


@dataclass
class AdapterReport:
    """What ``loratune inspect`` reports: every module's spectrum, per-type summaries and the suggested r."""

    path: str
    config: LoraConfig
    modules: list[ModuleSpectrum]
    other_tensors: list[str] = field(default_factory=list)
    """Non-LoRA tensors in the file (trained biases, modules_to_save), not analysed."""
    percentile: float = SUGGEST_PERCENTILE
    plot: str | None = None
    """Where the spectrum plot was written, if it was."""

    @property
    def types(self) -> list[TypeSummary]:
        """One summary per module type, in the order the types first appear."""
        groups: dict[str, list[ModuleSpectrum]] = {}
        for m in self.modules:
            groups.setdefault(m.module_type, []).append(m)
        return [TypeSummary(t, tuple(ms), self.percentile) for t, ms in groups.items()]

    @property
    def suggestion(self) -> Suggestion:
        ks = [m.k99 for m in self.modules]
        used = [k for k in ks if k > 0]
        return Suggestion(
            r=suggest_rank(used, self.percentile), percentile=self.percentile, energy=SUGGEST_ENERGY,
            percentile_rank=percentile_nearest_rank(used, self.percentile) if used else None,
            modules_used=len(used), zero_modules=len(ks) - len(used),
            saturated_modules=sum(m.saturated for m in self.modules if m.k99 > 0),
            trained_ranks=sorted({m.r for m in self.modules}))

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "adapter": self.path,
            "config": dict(r=c.r, lora_alpha=c.lora_alpha, use_rslora=c.use_rslora, rank_pattern=dict(c.rank_pattern),
                           alpha_pattern=dict(c.alpha_pattern),
                           target_modules=c.target_modules if isinstance(c.target_modules, str) else list(c.target_modules)),
            "lora_modules": len(self.modules),
            "lora_params": self.params,
            "other_tensors": list(self.other_tensors),
            "modules": [m.to_dict() for m in self.modules],
            "module_types": [t.to_dict() for t in self.types],
            "suggestion": self.suggestion.to_dict(),
            "plot": self.plot,
        }


# -- reading an adapter -------------------------------------------------------------------------------------------
def _natural_key(name: str) -> tuple:
    """Sort model.layers.10 after model.layers.9."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def lora_factor_pairs(tensors: dict[str, torch.Tensor], where: str = WEIGHTS_NAME
                      ) -> tuple[dict[str, tuple[str, torch.Tensor, torch.Tensor]], list[str]]:
    """Pair up PEFT's keys: {module name: (kind, A, B)} in natural order, and the sorted non-LoRA keys."""
    found: dict[str, dict[str, Any]] = {}
    other: list[str] = []
    for key, tensor in tensors.items():
        for kind, pattern in (("linear", _LINEAR_KEY), ("embedding", _EMBEDDING_KEY)):
            m = pattern.match(key)
            if m:
                entry = found.setdefault(m["name"], {"kind": kind})
                if entry["kind"] != kind:
                    raise ValueError(f"{where}: {m['name']} has both lora_A/B and lora_embedding_A/B tensors")
                entry[m["ab"]] = tensor
                break
        else:
            other.append(key)
    pairs: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
    for name in sorted(found, key=_natural_key):
        entry = found[name]
        for ab in "AB":
            if ab not in entry:
                raise ValueError(f"{where}: {name} has a LoRA {'B' if ab == 'A' else 'A'} tensor but no {ab}")
        A, B = entry["A"], entry["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{where}: {name}: A must be r×in and B out×r; got A {tuple(A.shape)}, B {tuple(B.shape)}")
        for ab, t in (("A", A), ("B", B)):
            if not t.is_floating_point():
                raise ValueError(f"{where}: {name} {ab} has dtype {t.dtype}; adapter tensors must be floating point")
            if not torch.isfinite(t).all():
                raise ValueError(f"{where}: {name} {ab} contains NaN or inf")
        pairs[name] = (entry["kind"], A, B)
    return pairs, sorted(other)


def inspect_adapter(path: str | os.PathLike, percentile: float = SUGGEST_PERCENTILE) -> AdapterReport:
    """Read an adapter directory and compute every module's spectrum (nothing is written).

    The scaling of each module comes from ``adapter_config.json`` (:meth:`LoraConfig.scaling_for`: alpha/r or
    alpha/√r, with rank_pattern/alpha_pattern), and each module's stored rank must agree with the config's.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    config, tensors = read_adapter(path)
    where = str(Path(path) / WEIGHTS_NAME)
    pairs, other = lora_factor_pairs(tensors, where)
    if not pairs:
        raise ValueError(f"{where}: no LoRA tensors (…lora_A.weight/…lora_B.weight or …lora_embedding_A/B) found")
    modules = []
    for name, (kind, A, B) in pairs.items():
        expected = config.rank_for(name)
        if A.shape[0] != expected:
            raise ValueError(f"{where}: {name} has rank {A.shape[0]} but {Path(path) / CONFIG_NAME} gives r={expected} "
                             "for it (r / rank_pattern)")
        modules.append(module_spectrum(name, A, B, config.scaling_for(name), kind))
    return AdapterReport(path=str(path), config=config, modules=modules, other_tensors=other, percentile=percentile)


# -- output -------------------------------------------------------------------------------------------------------
def report_to_json(report: AdapterReport) -> str:
    """Machine-readable report (all singular values included)."""
    return json.dumps(report.to_dict(), indent=2)


def _g(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _table(head: Sequence[str], body: list[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return [line(head), "  ".join("-" * w for w in widths), *map(line, body)]


def format_report(report: AdapterReport, modules: bool = True) -> str:
    """The human-readable report: one row per module (unless ``modules`` is False), one per type, the suggestion."""
    c = report.config
    out = [f"adapter {report.path}: r={c.r}, lora_alpha={c.lora_alpha:g}, "
           f"s = alpha/{'√r (rsLoRA)' if c.use_rslora else 'r'}"
           + (f", rank_pattern {dict(c.rank_pattern)}" if c.rank_pattern else "")
           + (f", alpha_pattern {dict(c.alpha_pattern)}" if c.alpha_pattern else "")
           + f"; {len(report.modules)} LoRA modules, {report.params:,} params"
           + (f" ({len(report.other_tensors)} other tensors not analysed)" if report.other_tensors else ""),
           "ΔW = s·B·A; σ = its singular values; kP = smallest k with σ_1²+…+σ_k² ≥ P% of ‖ΔW‖_F²; "
           "stable rank = ‖ΔW‖_F²/σ_1²", ""]
    if modules:
        body = [(m.name, "×".join(map(str, m.a_shape)), "×".join(map(str, m.b_shape)), f"{m.params:,}", _g(m.scaling),
                 _g(m.frobenius_norm), _g(m.singular_values[0] if m.singular_values else None), _g(m.stable_rank, 3),
                 str(m.k90), str(m.k99) + ("*" if m.saturated else ""), str(m.max_rank)) for m in report.modules]
        out += _table(("module", "A (r×in)", "B (out×r)", "params", "s", "‖ΔW‖_F", "σ_1", "stable rank",
                       "k90", "k99", "of"), body)
        if any(m.saturated for m in report.modules):
            out.append("* k99 = min(r, out, in): this module uses every direction it has")
        out.append("")
    p = f"p{report.percentile:g}" if report.percentile < 100 else "max"
    body = []
    for t in report.types:
        d = t.to_dict()
        body.append((t.module_type, str(len(t.modules)), _ranks(t.ranks), f"{t.params:,}",
                     "/".join(_g(s) for s in t.scalings), _g(t.mean_norm), _g(d["median_effective_rank_90"], 3),
                     _g(d["median_effective_rank_99"], 3), _g(d["percentile_effective_rank_99"]),
                     _g(d["max_effective_rank_99"]), str(d["saturated_modules"]), _g(t.suggested_r)))
    out += _table(("module type", "modules", "r", "params", "s", "mean ‖ΔW‖_F", "median k90", "median k99",
                   f"{p} k99", "max k99", "saturated", "suggested r"), body)
    s = report.suggestion
    out += ["", f"suggested r: {s.r if s.r is not None else '-'}"
            + (f"  ({p} of k99 = {s.percentile_rank}, over {s.modules_used} modules)" if s.r is not None else ""),
            f"  rule: {s.rule}"]
    out += [f"  note: {n}" for n in s.notes]
    if report.plot:
        out.append(f"plot: {report.plot}")
    return "\n".join(out)


def plot_spectra(report: AdapterReport, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a PNG of the normalised spectra σ_i/σ_1 vs i: one panel per module type, one line per module
    (coloured by layer), the suggested r as a dashed line. Written atomically (:func:`loratune.fileio.write_figure`).
    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"plot path {path} is a directory; give a file name such as {path / 'spectrum.png'}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write plot {path}: directory {path.parent} does not exist")

    types = report.types
    ncols = min(3, len(types))
    nrows = math.ceil(len(types) / ncols)
    fig = Figure(figsize=(4.2 * ncols + 0.8, 3.2 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    layers = [m.layer for m in report.modules if m.layer is not None]
    norm = Normalize(vmin=min(layers, default=0), vmax=max(max(layers, default=1), min(layers, default=0) + 1))
    cmap = "viridis"
    mappable = ScalarMappable(norm=norm, cmap=cmap)
    suggestion = report.suggestion
    for ax, t in zip(axes.flat, types):
        width = 1
        for m in t.modules:
            sv = m.singular_values
            if not sv or sv[0] == 0.0:
                continue
            xs = range(1, len(sv) + 1)
            color = mappable.to_rgba(m.layer) if m.layer is not None else "black"
            ax.plot(xs, [s / sv[0] for s in sv], color=color, lw=1.0, alpha=0.8, marker="." if len(sv) <= 32 else None)
            width = max(width, len(sv))
        if suggestion.r is not None and suggestion.r < width:
            ax.axvline(suggestion.r, color="tab:red", ls="--", lw=1.0, label=f"suggested r = {suggestion.r}")
            ax.legend(loc="upper right", fontsize=8)
        k = t.k99_percentile
        n = len(t.modules)
        ax.set_title(f"{t.module_type} ({n} module{'s' if n != 1 else ''}, r={_ranks(t.ranks)}, "
                     f"k99 p{report.percentile:g}={k if k is not None else '-'})", fontsize=9)
        ax.set_xlabel("index i")
        ax.set_ylabel(r"$\sigma_i / \sigma_1$")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, width + 0.5)
        ax.set_ylim(0.0, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(types):]:
        ax.set_visible(False)
    if layers:
        bar = fig.colorbar(mappable, ax=axes, label="layer", shrink=0.9)
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    fig.suptitle(f"ΔW spectra of {report.path}" + (f" — suggested r = {suggestion.r}" if suggestion.r else ""),
                 fontsize=10)

    write_figure(fig, path, dpi=dpi)
    report.plot = str(path)
    return path
