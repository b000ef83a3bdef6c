"""LoraConfig: what to adapt and how, validated at construction.

The fields and their meaning follow PEFT's ``LoraConfig`` so that an ``adapter_config.json`` written by
either library reads the same in the other (see :func:`LoraConfig.to_peft_dict` / :func:`LoraConfig.from_peft_dict`).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

INITS = ("gaussian", "kaiming", "zeros")
BIASES = ("none", "lora_only", "all")
ALL_LINEAR = "all-linear"


def _as_tuple(value: Any, name: str) -> tuple[str, ...] | str | None:
    """Lists become tuples (so the frozen config is hashable); a string stays a string (a regex)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = tuple(sorted(value) if isinstance(value, (set, frozenset)) else value)
        for item in items:
            if not isinstance(item, str) or not item:
                raise ValueError(f"LoraConfig.{name}: every entry must be a non-empty module name, got {item!r}")
        return items
    raise ValueError(f"LoraConfig.{name}: expected a list of module names or a regex string, got {type(value).__name__}")


@dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of a LoRA adapter: ``h = W·x + s·B·(A·x)``, A: r×in, B: out×r, s = lora_alpha / r."""

    r: int = 8
    """Rank of the update: A is r×in, B is out×r. Valid: integer ≥ 1."""
    lora_alpha: float = 16
    """Numerator of the scaling s = lora_alpha / r (or lora_alpha / √r with rsLoRA). Valid: > 0."""
    lora_dropout: float = 0.0
    """Dropout probability on the LoRA branch's input only. Valid: 0 ≤ p < 1."""
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Modules to adapt: a list matches a module name exactly or as a dotted suffix; a string is a regex that must
    match the full name; "all-linear" is every linear layer except the output head."""
    exclude_modules: tuple[str, ...] | str | None = None
    """Modules never adapted, with the same matching rules as target_modules."""
    init: str = "gaussian"
    """Initialisation of A: "gaussian" N(0, (1/r)²) (PEFT's "gaussian"), "kaiming" (Kaiming-uniform, PEFT's
    default) or "zeros" (A and B both zero; only for tests). B always starts at zero."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: s = lora_alpha / √r instead of lora_alpha / r."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex: r}, a regex matching a dotted suffix of the module name."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: {regex: alpha}, matched like rank_pattern."""
    layers_to_transform: tuple[int, ...] | None = None
    """Only adapt modules inside these layer indices (the first number in the module name, e.g. layers.3.)."""
    modules_to_save: tuple[str, ...] | None = None
    """Extra modules trained in full and stored in the adapter file (e.g. a classification head)."""
    bias: str = "none"
    """Which biases train: "none", "lora_only" (biases of adapted layers) or "all"."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields in place once, at construction
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be an integer ≥ 1, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not (
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0
        ):
            raise ValueError(f"LoraConfig.lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {', '.join(INITS)}; got {self.init!r}")
        if self.bias not in BIASES:
            raise ValueError(f"LoraConfig.bias must be one of {', '.join(BIASES)}; got {self.bias!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora must be true or false, got {self.use_rslora!r}")
        targets = _as_tuple(self.target_modules, "target_modules")
        if targets is None or (not isinstance(targets, str) and len(targets) == 0) or targets == "":
            raise ValueError("LoraConfig.target_modules must name at least one module (a list, a regex or 'all-linear')")
        set_(self, "target_modules", targets)
        set_(self, "exclude_modules", _as_tuple(self.exclude_modules, "exclude_modules") or None)
        mts = _as_tuple(self.modules_to_save, "modules_to_save")
        if isinstance(mts, str):
            raise ValueError("LoraConfig.modules_to_save must be a list of module names, not a string")
        set_(self, "modules_to_save", mts or None)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value != ALL_LINEAR:
                _check_regex(value, f"LoraConfig.{name}")
        layers = self.layers_to_transform
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        if layers is not None:
            layers = tuple(layers)
            if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
                raise ValueError(
                    f"LoraConfig.layers_to_transform must be a non-empty list of layer indices ≥ 0, got {self.layers_to_transform!r}"
                )
        set_(self, "layers_to_transform", layers)
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            pattern = dict(getattr(self, name) or {})
            for key, value in pattern.items():
                _check_regex(key, f"LoraConfig.{name} key")
                if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                    raise ValueError(f"LoraConfig.{name}[{key!r}] must be a number > 0, got {value!r}")
            set_(self, name, _FrozenDict(pattern))

    # -- per-module values -------------------------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """The rank of ``module_name``: the first matching rank_pattern entry, else ``r``."""
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """The alpha of ``module_name``: the first matching alpha_pattern entry, else ``lora_alpha``."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        """s = alpha / r, or alpha / √r with rsLoRA."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def replace(self, **changes: Any) -> "LoraConfig":
        """A copy with some fields changed (validated again)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(changes)
        return LoraConfig(**data)

    # -- PEFT's adapter_config.json ----------------------------------------------------------------------------
    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT expects (``peft_type: LORA``, ``task_type: CAUSAL_LM``)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        excl = self.exclude_modules
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
            "exclude_modules": excl if excl is None or isinstance(excl, str) else list(excl),
            "init_lora_weights": {"gaussian": "gaussian", "kaiming": True, "zeros": False}[self.init],
            "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": list(self.layers_to_transform) if self.layers_to_transform else None,
            "layers_pattern": None,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "bias": self.bias,
            "fan_in_fan_out": False,
            "use_dora": False,
            "inference_mode": True,
            "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any], source: str = "adapter_config.json") -> "LoraConfig":
        """Read PEFT's ``adapter_config.json``; refuse what loratune does not implement rather than ignore it."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: peft_type is {data.get('peft_type')!r}; only LORA adapters are supported")
        if data.get("use_dora"):
            raise ValueError(f"{source}: use_dora=true (DoRA) is not supported by loratune")
        if data.get("layers_pattern") not in (None, "", []):
            raise ValueError(f"{source}: layers_pattern={data['layers_pattern']!r} is not supported (only default layer numbering)")
        if "r" not in data or "target_modules" not in data:
            missing = [k for k in ("r", "target_modules") if k not in data]
            raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
        init = data.get("init_lora_weights", True)
        init_name = {True: "kaiming", False: "zeros", "gaussian": "gaussian"}.get(init)
        if init_name is None:
            init_name = "kaiming"  # PEFT's other initialisations only affect the start of training, not loading
        try:
            return cls(
                r=data["r"],
                lora_alpha=data.get("lora_alpha", 8),
                lora_dropout=data.get("lora_dropout", 0.0) or 0.0,
                target_modules=data["target_modules"],
                exclude_modules=data.get("exclude_modules"),
                init=init_name,
                use_rslora=bool(data.get("use_rslora", False)),
                rank_pattern=data.get("rank_pattern") or {},
                alpha_pattern=data.get("alpha_pattern") or {},
                layers_to_transform=data.get("layers_to_transform"),
                modules_to_save=data.get("modules_to_save"),
                bias=data.get("bias", "none"),
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python fields (for recipes and logs)."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
            elif isinstance(value, Mapping):
                data[key] = dict(value)
        return data


class _FrozenDict(dict):
    """A read-only dict, so a frozen LoraConfig stays frozen all the way down."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("LoraConfig is frozen; use config.replace(...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def _check_regex(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{where} {pattern!r} is not a valid regular expression: {err}") from None


def _pattern_key(patterns: Mapping[str, Any], module_name: str) -> str | None:
    """PEFT's rule: a pattern key matches when it matches a dotted suffix of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def matches(spec: Sequence[str] | str, name: str) -> bool:
    """Does ``name`` match a target/exclude spec? A string is a full-match regex; a list matches exactly or as a suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + s) for s in spec)


_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The first numbered segment of a dotted module name: ``model.layers.3.self_attn.q_proj`` → 3."""
    m = _LAYER_INDEX.match(name)
    return int(m.group(1)) if m else None
