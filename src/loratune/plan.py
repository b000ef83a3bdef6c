"""``loratune plan``: LoRA shapes, parameter counts and a training-memory estimate from ``config.json`` alone.

The model is built on the meta device (shapes, no storage, no weights downloaded), LoRA is injected exactly as
training would inject it, and everything is counted from that model, so the numbers are the ones training uses.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import LoraConfig
from .models import load_config
from .inject import count_parameters, inject_adapter, lora_layers, trainable_summary

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_CONFIGS = {"qwen3-0.6b": ASSETS / "configs" / "qwen3-0.6b"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes + an 8-bit scale per 64 + an fp32 scale per 256 scales


def resolve_model_path(model: str) -> str:
    """A bundled name (e.g. ``qwen3-0.6b``), a local directory or config.json file, or a hub id (passed through)."""
    if model in BUNDLED_CONFIGS:
        return str(BUNDLED_CONFIGS[model])
    path = Path(model)
    if path.is_file() and path.name == "config.json":
        return str(path.parent)
    return model


def meta_model(model: str, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM for ``model`` built on the meta device from its config alone."""
    from transformers import AutoModelForCausalLM

    config = load_config(resolve_model_path(model), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


@dataclass
class ModuleRow:
    """One targeted module type, e.g. all the q_proj layers."""

    name: str
    w_shape: tuple[int, int]
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    count: int = 0

    @property
    def per_layer(self) -> int:
        return math.prod(self.a_shape) + math.prod(self.b_shape)


@dataclass
class Plan:
    """Everything ``loratune plan`` prints."""

    rows: list[ModuleRow]
    trainable: int
    total: int
    summary: str
    memory: dict[str, float] = field(default_factory=dict)  # component → bytes
    settings: dict[str, object] = field(default_factory=dict)


def make_plan(model: str | nn.Module, config: LoraConfig, batch_size: int = 1, seq_len: int = 512,
              dtype: str = "bf16", quantize: str = "none", gradient_checkpointing: bool = False,
              trust_remote_code: bool = False) -> Plan:
    """Inject ``config`` into a meta-device copy of ``model`` and count shapes, parameters and memory."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if quantize not in ("none", "nf4"):
        raise ValueError(f"quantize must be none or nf4, got {quantize!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    net = meta_model(model, trust_remote_code) if isinstance(model, str) else model
    base_params = {id(p): p for p in net.parameters()}
    inject_adapter(net, config)
    rows: dict[str, ModuleRow] = {}
    for name, layer in lora_layers(net):
        short = name.split(".")[-1]
        a = tuple(layer.lora_A["default"].shape)
        b = tuple(layer.lora_B["default"].shape)
        row = rows.setdefault(f"{short} {a}", ModuleRow(short, (layer.out_features, layer.in_features), a, b))
        row.count += 1
    trainable, total = count_parameters(net)
    memory = estimate_memory(net, base_params, trainable, batch_size, seq_len, dtype, quantize, gradient_checkpointing)
    settings = dict(batch_size=batch_size, seq_len=seq_len, dtype=dtype, quantize=quantize,
                    gradient_checkpointing=gradient_checkpointing)
    return Plan(list(rows.values()), trainable, total, trainable_summary(net), memory, settings)


def estimate_memory(net: nn.Module, base_params: dict[int, nn.Parameter], trainable: int, batch_size: int,
                    seq_len: int, dtype: str, quantize: str, gradient_checkpointing: bool) -> dict[str, float]:
    """Bytes for weights, LoRA state (fp32 params + grads + AdamW m and v) and saved activations.

    Activations per decoder layer and token, in the compute dtype: the tensors autograd keeps for the input
    gradient (frozen linears need no saved input for themselves, but norms, RoPE, attention, the gated MLP and the
    LoRA branches do): residual + 2 norm inputs (3h), q/k/v after norm and RoPE plus attention output
    (3·q + 3·kv, attention kept at O(seq) memory as SDPA's efficient kernels do), gate, up and their product (3·I).
    With gradient checkpointing only each layer's input (h) is kept, plus one layer's activations at a time.
    The loss is computed in chunks of label positions, so logits cost one chunk, not tokens × vocab.
    """
    cfg = getattr(net, "config", None)
    nbytes = DTYPE_BYTES[dtype]
    weights = 0.0
    for p in base_params.values():
        if quantize == "nf4" and p.dim() == 2 and _is_linear_weight(net, p):
            weights += p.numel() * NF4_BITS_PER_WEIGHT / 8
        else:
            weights += p.numel() * nbytes
    lora_state = trainable * 4 * 4  # fp32 params, grads, AdamW exp_avg and exp_avg_sq
    tokens = batch_size * seq_len
    activations = 0.0
    logits_full = 0.0
    if cfg is not None and hasattr(cfg, "hidden_size") and hasattr(cfg, "num_hidden_layers"):
        h = cfg.hidden_size
        heads = getattr(cfg, "num_attention_heads", 1)
        head_dim = getattr(cfg, "head_dim", None) or h // heads
        q = heads * head_dim
        kv = getattr(cfg, "num_key_value_heads", heads) * head_dim
        inter = getattr(cfg, "intermediate_size", 4 * h)
        lora_r = sum(layer.lora_A["default"].shape[0] for _, layer in lora_layers(net)) / cfg.num_hidden_layers
        per_token_layer = (3 * h + 3 * q + 3 * kv + 3 * inter + lora_r) * nbytes
        layers = cfg.num_hidden_layers
        if gradient_checkpointing:
            activations = tokens * (layers * h * nbytes + per_token_layer)
        else:
            activations = tokens * layers * per_token_layer
        vocab = getattr(cfg, "vocab_size", 0)
        chunk = min(tokens, 1024)
        activations += chunk * vocab * (nbytes + 4) + tokens * h * nbytes  # one logits chunk (+fp32 copy), final norm
        logits_full = tokens * vocab * (nbytes + 4 + 4)  # what an unchunked loss holds: logits, fp32 copy, grad
    return {"weights": weights, "lora_params_grads_adamw": lora_state, "activations": activations,
            "total": weights + lora_state + activations, "unchunked_logits_would_add": logits_full}


def _is_linear_weight(net: nn.Module, p: nn.Parameter) -> bool:
    out = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    inp = net.get_input_embeddings() if hasattr(net, "get_input_embeddings") else None
    return not any(m is not None and getattr(m, "weight", None) is p for m in (out, inp))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_plan(plan: Plan) -> str:
    """The table, the trainable line and the memory estimate, as ``loratune plan`` prints them."""
    head = ("module", "W (out×in)", "A (r×in)", "B (out×r)", "layers", "LoRA params/layer", "LoRA params")
    body = [(r.name, "×".join(map(str, r.w_shape)), "×".join(map(str, r.a_shape)), "×".join(map(str, r.b_shape)),
             str(r.count), f"{r.per_layer:,}", f"{r.per_layer * r.count:,}") for r in plan.rows]
    body.append(("total", "", "", "", str(sum(r.count for r in plan.rows)), "", f"{plan.trainable:,}"))
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    out = [line(head), "  ".join("-" * w for w in widths), *map(line, body), "", plan.summary, ""]
    s = plan.settings
    out.append(f"training memory estimate (batch {s['batch_size']} × seq {s['seq_len']}, {s['dtype']}, "
               f"quantize {s['quantize']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}):")
    m = plan.memory
    out += [f"  base weights              {_gib(m['weights'])}",
            f"  LoRA params+grads+AdamW   {_gib(m['lora_params_grads_adamw'])}",
            f"  activations               {_gib(m['activations'])}",
            f"  total                     {_gib(m['total'])}",
            f"  (an unchunked LM loss would add {_gib(m['unchunked_logits_would_add'])} for full logits)"]
    return "\n".join(out)


def plan_to_json(plan: Plan) -> str:
    """Machine-readable plan."""
    return json.dumps({
        "modules": [dict(name=r.name, w_shape=r.w_shape, a_shape=r.a_shape, b_shape=r.b_shape, layers=r.count,
                         params_per_layer=r.per_layer, params=r.per_layer * r.count) for r in plan.rows],
        "trainable_params": plan.trainable, "all_params": plan.total, "summary": plan.summary,
        "memory_bytes": plan.memory, "settings": plan.settings,
    }, indent=2)
