"""Rank sweeps: the same short training at several LoRA ranks r, compared on held-out loss and exact match.

Every rank runs :func:`loratune.train.train` with the recipe unchanged except for the adapter's ``r`` (and
``lora_alpha``/``use_rslora`` as the *alpha rule* says) and its output directory ``OUT/r{r}``: same data, seed,
steps, learning rate and schedule. For each rank the sweep records the held-out loss, the exact match after
training (when the recipe has ``eval_generate > 0``), the trainable parameters, the adapter file size and the time,
and recommends **the smallest r within a stated margin of the best** (:func:`recommend`).

Alpha rules (how ``lora_alpha`` follows r; r₀, α₀ are the recipe's):

* ``proportional`` (default): α = (α₀/r₀)·r, so the scaling s = α/r stays α₀/r₀ at every rank (the common
  "α = 2r" practice when the recipe has r=8, α=16). Needs standard LoRA (``use_rslora: false``).
* ``fixed``: α = α₀ and ``use_rslora`` as in the recipe, so s = α₀/r (or α₀/√r) changes with r.
* ``rslora``: ``use_rslora: true`` and α = α₀ at every rank, so s = α₀/√r (rank-stabilised LoRA).

Resuming: a finished rank writes ``OUT/r{r}/sweep_result.json``; a rerun skips every rank whose result is there
and was made with the same configuration. The configuration is compared by a fingerprint of the full training
config minus r, lora_alpha, use_rslora, output_dir and the settings that cannot change the result (threads,
log_every, save_every, keep_last), plus the alpha rule. A rank whose result (or interrupted run) was made with a
different configuration is an error that names the differing options (:class:`SweepConfigMismatch`), never silently
reused; ``overwrite=True`` retrains it instead. A rank interrupted after writing a checkpoint (``save_every``)
resumes from it. The fingerprint covers the recipe, not the contents of the data files.

Outputs in ``OUT`` (rewritten atomically after every rank, so a long sweep shows its progress): ``sweep.md`` (the
table and the recommendation), ``sweep.json`` (the same, machine-readable) and ``sweep.png`` (eval loss and exact
match against r on a log₂ axis).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .fileio import write_atomic, write_figure
from .recipe import build, load_yaml, to_dict
from .train import TrainConfig, TrainingDiverged, latest_checkpoint, train

ALPHA_RULES = ("proportional", "fixed", "rslora")
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32)
DEFAULT_MARGIN = 0.02
"""Default margin: 2% relative on eval loss, and 2 points (0.02) of exact-match accuracy."""
RESULT_NAME = "sweep_result.json"
SWEEP_FILES = ("sweep.md", "sweep.json", "sweep.png")
DEFAULT_SWEEP_DIR = "runs/loratune-sweep"
"""Where a sweep goes when the recipe leaves ``output_dir`` at TrainConfig's default (``runs/loratune``)."""
NO_EFFECT = ("threads", "log_every", "save_every", "keep_last")
"""Config fields that cannot change a run's result; changing them does not invalidate finished ranks."""


class SweepConfigMismatch(ValueError):
    """A rank directory holds a result (or an interrupted run) made with a different configuration."""


# ==============================================================================================================
# The configuration of each rank
# ==============================================================================================================
def parse_ranks(text: str | Iterable[int]) -> list[int]:
    """``"1,2,4"`` (or a list) → sorted distinct ranks, each an integer ≥ 1."""
    items = text.replace(" ", "").split(",") if isinstance(text, str) else list(text)
    ranks = []
    for item in items:
        if item == "":
            continue
        try:
            r = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"ranks must be integers ≥ 1 separated by commas, got {item!r}") from None
        if isinstance(item, bool) or r < 1 or (not isinstance(item, str) and r != item):
            raise ValueError(f"ranks must be integers ≥ 1, got {item!r}")
        ranks.append(r)
    if not ranks:
        raise ValueError("give at least one rank, e.g. --ranks 1,2,4,8")
    return sorted(set(ranks))


def _number(x: float) -> int | float:
    """An integral float as int (so recipes read ``lora_alpha: 4``, not ``4.0``)."""
    return int(x) if float(x).is_integer() else float(x)


def rank_config(cfg: TrainConfig, r: int, alpha_rule: str, sweep_dir: str | os.PathLike) -> TrainConfig:
    """The training config of rank ``r``: ``cfg`` with r, lora_alpha/use_rslora per ``alpha_rule`` and
    ``output_dir = sweep_dir/r{r}``."""
    check_sweepable(cfg, alpha_rule)
    lora = cfg.lora
    if alpha_rule == "proportional":
        new = lora.replace(r=r, lora_alpha=_number(lora.lora_alpha * r / lora.r))
    elif alpha_rule == "fixed":
        new = lora.replace(r=r)
    else:  # rslora
        new = lora.replace(r=r, use_rslora=True)
    return dataclasses.replace(cfg, lora=new, output_dir=str(Path(sweep_dir) / f"r{r}"))


def check_sweepable(cfg: TrainConfig, alpha_rule: str) -> None:
    """Refuse configurations in which a rank sweep would not mean what it says."""
    if alpha_rule not in ALPHA_RULES:
        raise ValueError(f"alpha rule must be one of {', '.join(ALPHA_RULES)}; got {alpha_rule!r}")
    if alpha_rule == "proportional" and cfg.lora.use_rslora:
        raise ValueError("--alpha-rule proportional keeps s = lora_alpha/r constant, which needs use_rslora: false; "
                         "with rsLoRA use --alpha-rule rslora (alpha fixed, s = alpha/√r) or fixed")
    if cfg.lora.rank_pattern or cfg.lora.alpha_pattern:
        raise ValueError("the recipe sets lora.rank_pattern/alpha_pattern, which override r/alpha per module; "
                         "a rank sweep varies the one global r, so remove them for the sweep")
    if not cfg.eval_data and cfg.eval_fraction <= 0:
        raise ValueError("a sweep compares held-out loss: set eval_data, or eval_fraction > 0")


def scaling(cfg: TrainConfig) -> float:
    """The adapter scaling s of a config: lora_alpha/r, or lora_alpha/√r with rsLoRA."""
    lora = cfg.lora
    return lora.lora_alpha / math.sqrt(lora.r) if lora.use_rslora else lora.lora_alpha / lora.r


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def sweep_identity(cfg: TrainConfig, alpha_rule: str) -> dict[str, Any]:
    """What every rank of one sweep shares, the same whether computed from the recipe or from any rank's config:
    the config minus r, output_dir and :data:`NO_EFFECT`, with the alpha rule and its parameter (proportional:
    lora_alpha/r instead of lora_alpha; rslora: use_rslora dropped, as the rule sets it)."""
    data = to_dict(cfg)
    for key in NO_EFFECT + ("output_dir",):
        data.pop(key, None)
    lora = data["lora"]
    lora.pop("r")
    if alpha_rule == "proportional":
        lora["alpha_per_r"] = float(f"{lora.pop('lora_alpha') / cfg.lora.r:.12g}")
    elif alpha_rule == "rslora":
        lora.pop("use_rslora")
    return _canonical({"alpha_rule": alpha_rule, "config": data})


def fingerprint(identity: dict[str, Any]) -> str:
    """A short sha256 of :func:`sweep_identity`'s canonical JSON."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def describe_difference(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``lr: 0.0002 → 0.001, lora.init: gaussian → kaiming`` for the options that differ."""
    a, b = _flatten(old), _flatten(new)
    diffs = [f"{k.removeprefix('config.')}: {a.get(k, '(unset)')} → {b.get(k, '(unset)')}"
             for k in sorted(set(a) | set(b)) if a.get(k, object()) != b.get(k, object())]
    more = f", and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more if diffs else "(no visible difference)"


# ==============================================================================================================
# Results and the recommendation
# ==============================================================================================================
@dataclass
class RankResult:
    """One rank's outcome, as stored in ``OUT/r{r}/sweep_result.json``."""

    r: int
    lora_alpha: float
    use_rslora: bool
    scaling: float
    eval_loss: float | None
    exact_match: float | None = None
    """Held-out exact-match accuracy (0..1) after training; None when the recipe has eval_generate 0."""
    exact_match_text: str | None = None
    exact_match_before: float | None = None
    """The base model's exact match (the same for every rank)."""
    trainable_params: int = 0
    """Parameters in the adapter file = the parameters trained (A and B, plus trained biases/modules_to_save)."""
    adapter_bytes: int = 0
    """Size of adapter_model.safetensors (as saved: fp32)."""
    train_seconds: float = 0.0
    """Time in the training loop (TrainResult.seconds; across resumes)."""
    wall_seconds: float = 0.0
    """Wall time of the whole rank: loading, training, evaluation and exact-match generation."""
    steps: int = 0
    final_loss: float | None = None
    diverged: str | None = None
    """The error message when the loss became NaN/inf (the rank then has no metrics)."""
    fingerprint: str = ""
    identity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RankResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Recommendation:
    """The smallest r whose eval loss is within ``margin`` (relative) of the best loss and, when exact match was
    measured, whose accuracy is within ``accuracy_margin`` (absolute, as a fraction) of the best accuracy."""

    r: int | None
    best_loss_r: int | None
    best_loss: float | None
    best_accuracy_r: int | None
    best_accuracy: float | None
    margin: float
    accuracy_margin: float | None
    candidates: list[int]
    rule: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sentence(self) -> str:
        if self.best_loss_r is None:
            return "no recommendation: no rank finished with an eval loss"
        if self.r is None:
            return f"no rank meets both margins ({self.note}); best eval loss at r={self.best_loss_r}, " \
                   f"best exact match at r={self.best_accuracy_r}"
        text = f"recommended r = {self.r}: {self.rule}"
        return text + (f" ({self.note})" if self.note else "")


def recommend(results: Sequence[RankResult], margin: float = DEFAULT_MARGIN,
              accuracy_margin: float | None = None) -> Recommendation:
    """Choose the smallest r within ``margin`` of the best.

    * loss: eval_loss ≤ best_loss × (1 + margin) (relative margin; the best rank always qualifies);
    * exact match, only when every scored rank measured it: accuracy ≥ best_accuracy − accuracy_margin, an absolute
      margin in accuracy points (``accuracy_margin`` defaults to ``margin``: 0.02 = 2 points).

    Ranks that diverged or have no eval loss are left out. When no rank meets both conditions, ``r`` is None.
    """
    if not (isinstance(margin, (int, float)) and margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a number ≥ 0, got {margin!r}")
    acc_margin = margin if accuracy_margin is None else accuracy_margin
    if not (isinstance(acc_margin, (int, float)) and acc_margin >= 0 and math.isfinite(acc_margin)):
        raise ValueError(f"accuracy margin must be a number ≥ 0, got {accuracy_margin!r}")
    scored = sorted((x for x in results if x.diverged is None and x.eval_loss is not None
                     and math.isfinite(x.eval_loss)), key=lambda x: x.r)
    use_acc = bool(scored) and all(x.exact_match is not None for x in scored)
    loss_rule = f"the smallest r whose eval loss is within {100 * margin:g}% of the best"
    rule = loss_rule + (f" and whose exact match is within {100 * acc_margin:g} points of the best" if use_acc else "")
    if not scored:
        return Recommendation(None, None, None, None, None, margin, acc_margin if use_acc else None, [], rule,
                              "no rank finished with an eval loss")
    best = min(scored, key=lambda x: (x.eval_loss, x.r))
    limit = best.eval_loss * (1 + margin)  # cross-entropy ≥ 0
    ok = [x for x in scored if x.eval_loss <= limit]
    best_acc = max(scored, key=lambda x: (x.exact_match, -x.r)) if use_acc else None
    if use_acc:
        ok = [x for x in ok if x.exact_match >= best_acc.exact_match - acc_margin - 1e-12]
    chosen = ok[0] if ok else None
    note = ""
    if chosen is None:
        note = f"eval loss ≤ {limit:.4f} and exact match ≥ {100 * (best_acc.exact_match - acc_margin):.1f}%"
    else:
        parts = [f"eval loss {chosen.eval_loss:.4f} vs best {best.eval_loss:.4f} at r={best.r}"]
        if use_acc:
            parts.append(f"exact match {100 * chosen.exact_match:.1f}% vs best {100 * best_acc.exact_match:.1f}% "
                         f"at r={best_acc.r}")
        note = "; ".join(parts)
        if chosen.r == max(x.r for x in scored):
            note += "; it is the largest rank swept: a larger r might do better still"
    return Recommendation(chosen.r if chosen else None, best.r, best.eval_loss, best_acc.r if best_acc else None,
                          best_acc.exact_match if best_acc else None, margin, acc_margin if use_acc else None,
                          [x.r for x in ok], rule, note)


@dataclass
class SweepReport:
    """The whole sweep: one result per finished rank, the recommendation, and where the outputs are."""

    out: Path
    ranks: list[int]
    alpha_rule: str
    fingerprint: str
    results: list[RankResult]
    recommendation: Recommendation
    trained: list[int] = field(default_factory=list)
    """Ranks trained (or resumed) by this call."""
    skipped: list[int] = field(default_factory=list)
    """Ranks whose finished result was reused."""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def exact_match_measured(self) -> bool:
        return any(x.exact_match is not None for x in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "ranks": self.ranks, "alpha_rule": self.alpha_rule,
                "fingerprint": self.fingerprint, "recommendation": self.recommendation.to_dict(),
                "results": [{k: v for k, v in x.to_dict().items() if k != "identity"} for x in self.results],
                "trained": self.trained, "skipped": self.skipped, "config": self.config}


# ==============================================================================================================
# The sweep
# ==============================================================================================================
def sweep_dir_for(cfg: TrainConfig) -> Path:
    """The sweep's root: the config's output_dir, or :data:`DEFAULT_SWEEP_DIR` when that is TrainConfig's default."""
    default = TrainConfig.__dataclass_fields__["output_dir"].default
    return Path(DEFAULT_SWEEP_DIR if cfg.output_dir == default else cfg.output_dir)


def read_result(rank_dir: Path) -> RankResult | None:
    """The finished result in ``rank_dir``, or None."""
    path = rank_dir / RESULT_NAME
    if not path.is_file():
        return None
    try:
        return RankResult.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}: unreadable sweep result ({err}); delete it to retrain this rank") from None


def _adapter_key(r: int, lora_alpha: float, use_rslora: bool) -> tuple[int, float, bool]:
    return int(r), float(f"{float(lora_alpha):.12g}"), bool(use_rslora)


def _interrupted_run(rank_dir: Path) -> TrainConfig | None:
    """The config of an unfinished run in ``rank_dir`` (its train_config.yaml), or None."""
    path = rank_dir / "train_config.yaml"
    if not path.is_file():
        return None
    data, lines = load_yaml(path)
    return build(TrainConfig, data, str(path), lines)


def run_sweep(cfg: TrainConfig, ranks: Iterable[int] | str = DEFAULT_RANKS, alpha_rule: str = "proportional",
              margin: float = DEFAULT_MARGIN, accuracy_margin: float | None = None,
              out: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
              log: Callable[[str], Any] = print) -> SweepReport:
    """Train ``cfg`` once per rank (skipping finished ranks), then write the table, JSON and plot to ``out``.

    ``out`` defaults to :func:`sweep_dir_for` ``(cfg)``. Raises :class:`SweepConfigMismatch` before training
    anything when a rank directory holds a result made with a different configuration (unless ``overwrite``).
    """
    ranks = parse_ranks(ranks)
    recommend([], margin, accuracy_margin)  # validate the margins before any work
    check_sweepable(cfg, alpha_rule)
    root = Path(out) if out is not None else sweep_dir_for(cfg)
    identity = sweep_identity(cfg, alpha_rule)
    fp = fingerprint(identity)
    configs = {r: rank_config(cfg, r, alpha_rule, root) for r in ranks}

    # -- decide what to do with each rank before training anything: a mismatch must fail fast ------------------
    plan: dict[int, str] = {}
    for r in ranks:
        rank_dir = root / f"r{r}"
        want = _adapter_key(r, configs[r].lora.lora_alpha, configs[r].lora.use_rslora)
        done = read_result(rank_dir)
        if done is not None:
            if done.fingerprint == fp and _adapter_key(done.r, done.lora_alpha, done.use_rslora) == want:
                plan[r] = "skip"
                continue
            if not overwrite:
                raise SweepConfigMismatch(
                    f"{rank_dir / RESULT_NAME} was made with a different configuration "
                    f"({describe_difference(done.identity, identity)}); use another output directory, "
                    "or --overwrite to retrain the ranks that differ")
            plan[r] = "fresh"
            continue
        old_cfg = _interrupted_run(rank_dir)
        if old_cfg is None:
            if rank_dir.is_dir() and any(rank_dir.iterdir()):
                raise ValueError(f"{rank_dir} exists and is not a loratune run (no train_config.yaml); "
                                 "move it away or choose another output directory")
            if rank_dir.exists() and not rank_dir.is_dir():
                raise NotADirectoryError(f"{rank_dir} exists and is not a directory")
            plan[r] = "fresh"
            continue
        old = sweep_identity(old_cfg, alpha_rule)
        same = old == identity and _adapter_key(old_cfg.lora.r, old_cfg.lora.lora_alpha, old_cfg.lora.use_rslora) == want
        if not same and not overwrite:
            got = _adapter_key(old_cfg.lora.r, old_cfg.lora.lora_alpha, old_cfg.lora.use_rslora)
            what = describe_difference(old, identity) if old != identity else \
                f"r, lora_alpha, use_rslora: {got} → {want}"
            raise SweepConfigMismatch(
                f"{rank_dir} holds an unfinished run with a different configuration ({what}); "
                "use another output directory, or --overwrite")
        plan[r] = "resume" if same and latest_checkpoint(rank_dir) is not None else "fresh"

    root.mkdir(parents=True, exist_ok=True)
    if any(v != "skip" for v in plan.values()):
        warm_up(cfg)
    results: dict[int, RankResult] = {}
    report = SweepReport(root, ranks, alpha_rule, fp, [], recommend([], margin, accuracy_margin),
                         config=to_dict(cfg))
    for r in ranks:
        rank_cfg = configs[r]
        rank_dir = Path(rank_cfg.output_dir)
        if plan[r] == "skip":
            results[r] = read_result(rank_dir)  # type: ignore[assignment]
            report.skipped.append(r)
            log(f"sweep r={r}: already done ({rank_dir / RESULT_NAME}), skipping")
            continue
        if plan[r] == "fresh" and rank_dir.exists():
            # Stale files from another configuration or a run without checkpoints: start this rank clean.
            shutil.rmtree(rank_dir)
        lora = rank_cfg.lora
        log(f"sweep r={r}: {'resuming' if plan[r] == 'resume' else 'training'} with lora_alpha={lora.lora_alpha:g}"
            f"{' (rsLoRA)' if lora.use_rslora else ''}, s={scaling(rank_cfg):g} → {rank_dir}")
        results[r] = train_rank(rank_cfg, identity, fp, resume=plan[r] == "resume", progress=progress, log=log)
        report.trained.append(r)
        _finish(report, results, margin, accuracy_margin)
        write_outputs(report)
        res = results[r]
        if res.diverged:
            log(f"sweep r={r}: diverged: {res.diverged}")
        else:
            em = f", exact match {res.exact_match_text}" if res.exact_match is not None else ""
            log(f"sweep r={r}: eval loss {res.eval_loss:.4f}{em}, {res.trainable_params:,} trainable params, "
                f"{res.wall_seconds:.0f}s")
    _finish(report, results, margin, accuracy_margin)
    write_outputs(report)
    return report


def _finish(report: SweepReport, results: dict[int, RankResult], margin: float, accuracy_margin: float | None) -> None:
    report.results = [results[r] for r in sorted(results)]
    report.recommendation = recommend(report.results, margin, accuracy_margin)


def warm_up(cfg: TrainConfig) -> None:
    """Pay the one-off costs (importing the tokenizer and model code) before the first rank, so that the first
    rank's time is comparable with the others: the tokenizer is loaded and the model built on the meta device
    from its config (no weights). A failure here is left for :func:`train` to report properly."""
    from .models import load_tokenizer
    from .plan import meta_model
    from .train import resolve

    try:
        load_tokenizer(resolve(cfg.tokenizer) or resolve(cfg.model), trust_remote_code=cfg.trust_remote_code)
        meta_model(resolve(cfg.model), trust_remote_code=cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - train() raises the same error with its own message
        pass


def train_rank(cfg: TrainConfig, identity: dict[str, Any], fp: str, resume: bool = False, progress: bool = True,
               log: Callable[[str], Any] = print) -> RankResult:
    """Train one rank and write its ``sweep_result.json`` (last, atomically: its presence marks the rank done)."""
    lora = cfg.lora
    base = dict(r=lora.r, lora_alpha=lora.lora_alpha, use_rslora=lora.use_rslora, scaling=scaling(cfg),
                fingerprint=fp, identity=identity)
    t0 = time.perf_counter()
    try:
        res = train(cfg, resume=resume, progress=progress, log=log)
    except TrainingDiverged as err:
        result = RankResult(eval_loss=None, diverged=str(err), wall_seconds=time.perf_counter() - t0, **base)
    else:
        weights = res.adapter_dir / "adapter_model.safetensors"
        after, before = res.report.get("after"), res.report.get("before")
        result = RankResult(
            eval_loss=res.eval_loss, exact_match=after["accuracy"] if after else None,
            exact_match_text=after["text"] if after else None,
            exact_match_before=before["accuracy"] if before else None,
            trainable_params=count_adapter_params(weights), adapter_bytes=weights.stat().st_size,
            train_seconds=res.seconds, wall_seconds=time.perf_counter() - t0, steps=res.steps,
            final_loss=res.final_loss, **base)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RESULT_NAME, json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def count_adapter_params(weights: Path) -> int:
    """Number of parameters stored in a safetensors file (read from its header, no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            total += math.prod(f.get_slice(key).get_shape())
    return total


# ==============================================================================================================
# Outputs: table, JSON, plot (all atomic)
# ==============================================================================================================
def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{s % 60:02.0f}s"


def format_table(report: SweepReport) -> str:
    """The sweep as a Markdown table followed by the recommendation; the rank marked ◀ is the recommended one."""
    rec = report.recommendation
    em = report.exact_match_measured
    head = ["r", "lora_alpha", "s", "trainable params", "adapter size", "eval loss", "vs best"]
    head += ["exact match"] if em else []
    head += ["train time", "total time"]
    rows = []
    for x in report.results:
        mark = " ◀" if x.r == rec.r else ""
        if x.diverged:
            rows.append([f"{x.r}{mark}", f"{x.lora_alpha:g}", f"{x.scaling:.4g}", "", "", "diverged", ""]
                        + ([""] if em else []) + ["", _seconds(x.wall_seconds)])
            continue
        rel = f"{100 * (x.eval_loss / rec.best_loss - 1):+.1f}%" if rec.best_loss and x.eval_loss is not None else ""
        row = [f"{x.r}{mark}", f"{x.lora_alpha:g}", f"{x.scaling:.4g}", f"{x.trainable_params:,}",
               _size(x.adapter_bytes), f"{x.eval_loss:.4f}" if x.eval_loss is not None else "-", rel]
        if em:
            row.append(x.exact_match_text or "-")
        row += [_seconds(x.train_seconds), _seconds(x.wall_seconds)]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    right = {i for i, h in enumerate(head) if h not in ("r",)}

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    out = [line(head), "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                                      for i, w in enumerate(widths)) + "|"]
    out += [line(r) for r in rows]
    before = next((x.exact_match_before for x in report.results if x.exact_match_before is not None), None)
    if before is not None:
        out.append("")
        out.append(f"Base model before training (exact match): {100 * before:.1f}%.")
    out.append("")
    out.append(rec.sentence() + ".")
    missing = [r for r in report.ranks if r not in {x.r for x in report.results}]
    if missing:
        out.append(f"Not run yet: r = {', '.join(map(str, missing))}.")
    return "\n".join(out)


def format_markdown(report: SweepReport) -> str:
    """``sweep.md``: how the sweep was made, the table and the recommendation."""
    cfg = report.config
    lines = [f"# LoRA rank sweep: r = {', '.join(map(str, report.ranks))}", ""]
    if cfg:
        lora = cfg["lora"]
        steps = cfg["max_steps"] or f"{cfg['epochs']:g} epoch(s)"
        alpha = lora["lora_alpha"]
        rule = {"proportional": f"proportional (lora_alpha = {_number(alpha / lora['r']):g}·r, so s = alpha/r "
                                f"= {alpha / lora['r']:g} at every r)",
                "fixed": f"fixed (lora_alpha = {alpha:g} at every r{', rsLoRA' if lora['use_rslora'] else ''})",
                "rslora": f"rslora (lora_alpha = {alpha:g} at every r, use_rslora: s = alpha/√r)"}[report.alpha_rule]
        targets = lora["target_modules"]
        eval_data = f"`{cfg['eval_data']}`" if cfg["eval_data"] else f"{cfg['eval_fraction']:g} of the train data"
        lines += [
            f"- model `{cfg['model']}`, train data `{cfg['train_data']}`, eval data {eval_data}",
            f"- {steps} steps, lr {cfg['lr']:g}, batch size {cfg['batch_size']} × grad_accum {cfg['grad_accum']}, "
            f"seed {cfg['seed']}, target modules {targets if isinstance(targets, str) else ', '.join(targets)}, "
            f"init {lora['init']}",
            f"- alpha rule: {rule}",
        ]
    lines += [f"- config fingerprint `{report.fingerprint}` (shared by every rank)", "", format_table(report), ""]
    return "\n".join(lines)


def plot_sweep(report: SweepReport, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Eval loss (and exact match, when measured) against r on a log₂ axis, the recommended r marked; atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    path = Path(path)
    ok = [x for x in report.results if x.diverged is None and x.eval_loss is not None]
    em = [x for x in ok if x.exact_match is not None]
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log", base=2)
    if ok:
        ax.plot([x.r for x in ok], [x.eval_loss for x in ok], "o-", color="tab:blue", label="eval loss")
    ax.set_xlabel("LoRA rank r (log₂)")
    ax.set_ylabel("eval loss (nats/token)", color="tab:blue")
    ticks = sorted({x.r for x in report.results} | set(report.ranks))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlim(ticks[0] / 1.4, ticks[-1] * 1.4)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if em:
        ax2 = ax.twinx()
        ax2.plot([x.r for x in em], [100 * x.exact_match for x in em], "s--", color="tab:orange", label="exact match")
        before = next((x.exact_match_before for x in em if x.exact_match_before is not None), None)
        if before is not None:
            ax2.axhline(100 * before, color="tab:orange", lw=0.8, ls=":", label="exact match before training")
        ax2.set_ylabel("exact match (%)", color="tab:orange")
        ax2.set_ylim(-2, 102)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    rec = report.recommendation
    if rec.best_loss is not None:
        band = ax.axhspan(rec.best_loss, rec.best_loss * (1 + rec.margin), color="tab:blue", alpha=0.12, lw=0)
        handles.append(band)
        labels.append(f"eval loss within {100 * rec.margin:g}% of the best")
    if rec.r is not None:
        handles.append(ax.axvline(rec.r, color="tab:red", ls="--", lw=1.0))
        labels.append(f"recommended r = {rec.r}")
    if handles:
        ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(f"rank sweep ({report.alpha_rule} alpha), margin {100 * rec.margin:g}%", fontsize=10)
    return write_figure(fig, path, dpi=dpi)


def write_outputs(report: SweepReport) -> None:
    """``sweep.md``, ``sweep.json`` and ``sweep.png`` in the sweep directory, each atomically."""
    report.out.mkdir(parents=True, exist_ok=True)
    write_atomic(report.out / "sweep.md", format_markdown(report))
    write_atomic(report.out / "sweep.json", json.dumps(report.to_dict(), indent=2) + "\n")
    plot_sweep(report, report.out / "sweep.png")
