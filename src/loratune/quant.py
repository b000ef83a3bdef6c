"""QLoRA's frozen base: NF4 (4-bit NormalFloat) weights with double-quantized scales, via bitsandbytes.

NF4 (Dettmers et al., 2023): each weight is flattened and cut into blocks of ``block_size`` (64)
values; a block stores its absmax ``c`` and, per value, a 4-bit index into 16 fixed levels in
[-1, 1] that are quantiles of a standard normal, so ``w ≈ c · level[idx]``. Double quantization
then quantizes the per-block fp32 absmax values themselves: their mean is subtracted and they are
stored as 8-bit codes in blocks of 256 with one fp32 scale each, so the storage is
4 + 8/64 + 32/(64·256) ≈ 4.13 bits per weight (0.258× of bf16, measured; 4.5 bits / 0.281×
without double quant). The base is dequantized on the fly, in the input's dtype, for every matmul;
the LoRA adapters on top stay in full precision.

Backend: ``bitsandbytes`` (>= 0.50, whose 4-bit ops run on x86 CPUs through native AVX-512 /
portable PyTorch kernels, and on CUDA / XPU). It was chosen over torchao 0.18's ``NF4Tensor`` by
measurement on the reference CPU (``benchmarks/quant_backends.py``, ``docs/quant-backends.md``):
same bytes (0.258× bf16) and same error (rel. Frobenius 0.092 on N(0, 0.02²) weights), but a
forward+backward overhead over plain bf16 of 0-11% against torchao's 22-34% (1 thread; 26-47% vs
123-178% with 2 threads on a loaded machine), 25-65× faster dequantization (1 thread) and 1.2-3.5×
faster quantization. torchao's double quantization also rejects any weight with fewer than 64·256
elements (a 64×64 projection fails) and cannot be switched off.

Representation: a quantized weight is an :class:`NF4Parameter` (a subclass of bitsandbytes'
``Params4bit``): its *data* is the packed uint8 codes, shape ``[(out·in + 1) // 2, 1]``, and
``weight.quant_state`` holds the scales, the logical shape ``(out, in)`` and the dtype the weight
had when quantized. Use :func:`logical_shape` / :func:`logical_dtype` instead of ``.shape`` /
``.dtype``. ``F.linear(x, weight, bias)`` on such a parameter is routed to :func:`linear`, so an
``nn.Linear`` whose weight was replaced in place keeps working unchanged.

Device and dtype moves (``model.to(...)``, ``.cpu()``, ``.cuda()``, ``.half()``, ``.float()``):

* a device move moves the packed codes and the quantization state together (bitsandbytes supports
  cpu, cuda, xpu; only cpu is tested here); the weight stays quantized. Note that bitsandbytes moves
  the shared ``quant_state`` in place, so ``w.to(dev)`` also re-homes the scales of ``w`` itself;
  move whole models, not single weights;
* a dtype cast of the model leaves NF4 weights untouched (their data is uint8, not floating
  point): they are always dequantized to the dtype of the input ``x`` at matmul time, and
  :func:`dequantize` without ``dtype`` returns the original dtype;
* on the weight itself, ``weight.to(<float dtype>)`` / ``.float()`` / ``.half()`` / ``.bfloat16()``
  return the dequantized dense [out, in] tensor (never a cast of the packed codes).

``model.state_dict()`` / ``named_parameters()`` work; a quantized entry is the packed uint8 tensor
only (the scales live on ``weight.quant_state``), so it round-trips into the same quantized model
but is no checkpoint format: keep the original checkpoint and re-quantize it (deterministic).
A quantized weight cannot require grad (uint8): it is frozen by construction.
"""
from __future__ import annotations

import copy
import logging
import sys
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BACKEND",
    "MIN_BACKEND_VERSION",
    "check_backend_available",
    "dequantize",
    "dequantize_model",
    "is_quantized",
    "linear",
    "logical_dtype",
    "logical_shape",
    "parameter_nbytes",
    "quantize_model",
    "quantize_nf4",
    "quantized_nbytes",
    "weight_nbytes",
]

BACKEND = "bitsandbytes"
MIN_BACKEND_VERSION = "0.50.0"
_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_INSTALL_HINT = (
    "install the QLoRA extra (`pip install 'loratune[qlora]'`, i.e. bitsandbytes>=0.50.2,<0.51; "
    "with a CPU-only torch use `pip install --no-deps bitsandbytes==0.50.2`), "
    "or set `quantize: none` to train plain LoRA on a bf16/fp32 base"
)
_FLOAT_CASTS = {torch.Tensor.float: torch.float32, torch.Tensor.half: torch.float16,
                torch.Tensor.bfloat16: torch.bfloat16, torch.Tensor.double: torch.float64}
_checked_devices: set[str] = set()
_param_cls = None
_log_filter_added = False


class _DropKernelsHubWarning(logging.Filter):
    """Drops bitsandbytes' import-time note that the optional hub-downloaded CPU inference kernel is absent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def _import_backend():
    """Imports and returns the ``bitsandbytes`` module (raises ImportError when it is not installed)."""
    global _log_filter_added
    if not _log_filter_added:
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsHubWarning())
        _log_filter_added = True
    import bitsandbytes
    import bitsandbytes.functional  # noqa: F401

    return bitsandbytes


def _version_tuple(v: str) -> tuple:
    from packaging.version import Version

    return Version(v).release


def _smoke_test(bnb, device: torch.device) -> None:
    """Quantizes a [64, 128] weight on ``device`` and checks forward and input-grad against the dequantized op."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 128, generator=g) * 0.02).to(device=device, dtype=torch.bfloat16)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    wd = bnb.functional.dequantize_4bit(packed, state)
    x = torch.randn(3, 128, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    y.float().sum().backward()
    if x.grad is None or not torch.allclose(y.float(), F.linear(x.detach(), wd).float(), atol=1e-2, rtol=1e-2):
        raise RuntimeError("4-bit matmul does not match the dequantized reference")
    if ((wd.float() - w.float()).norm() / w.float().norm()).item() > 0.2:
        raise RuntimeError("NF4 round-trip error is implausibly large")


def check_backend_available(device: str | torch.device = "cpu") -> None:
    """Raises RuntimeError (saying what to do instead) unless bitsandbytes' NF4 ops import and run on ``device``."""
    try:
        bnb = _import_backend()
    except Exception as e:  # ImportError, or a broken native library raising at import
        raise RuntimeError(
            f"QLoRA needs the {BACKEND} 4-bit backend, which cannot be imported here "
            f"({type(e).__name__}: {e}). To fix: {_INSTALL_HINT}."
        ) from e
    version = getattr(bnb, "__version__", "0")
    if _version_tuple(version) < _version_tuple(MIN_BACKEND_VERSION):
        raise RuntimeError(
            f"QLoRA needs {BACKEND}>={MIN_BACKEND_VERSION} (the release line whose CPU 4-bit ops loratune is "
            f"tested with); "
            f"found {version}. To fix: {_INSTALL_HINT}."
        )
    dev = torch.device(device)
    key = str(dev)
    if key in _checked_devices:
        return
    try:
        _smoke_test(bnb, dev)
    except Exception as e:
        raise RuntimeError(
            f"{BACKEND} {version} is installed but its NF4 ops fail on device {key!r} with torch "
            f"{torch.__version__} ({type(e).__name__}: {e}). To fix: {_INSTALL_HINT}."
        ) from e
    _checked_devices.add(key)


def _nf4_param_cls():
    """Builds (once) the NF4Parameter class; deferred so that importing this module never imports bitsandbytes."""
    global _param_cls
    if _param_cls is not None:
        return _param_cls
    bnb = _import_backend()

    class NF4Parameter(bnb.nn.Params4bit):
        """bitsandbytes ``Params4bit`` (NF4) that also makes ``F.linear(x, self, bias)`` dequantize on the fly."""

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is F.linear:
                kwargs = dict(kwargs or {})
                args = list(args)
                x = args.pop(0) if args else kwargs.pop("input")
                w = args.pop(0) if args else kwargs.pop("weight")
                b = args.pop(0) if args else kwargs.pop("bias", None)
                return linear(x, w, b)
            if func in _FLOAT_CASTS and args and isinstance(args[0], NF4Parameter):
                return dequantize(args[0], _FLOAT_CASTS[func])  # w.float() etc.: the dense weight, not the codes
            return super().__torch_function__(func, types, args, kwargs)

        def to(self, *args, **kwargs):
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
            if dtype is not None and dtype.is_floating_point:
                # a float dtype asks for the weight's values: dequantize (as torchao's NF4Tensor does) rather
                # than cast the packed uint8 codes. nn.Module.to never asks this of a uint8 parameter.
                src = self if device is None or device == self.device else self.to(device)
                return dequantize(src, dtype)
            out = super().to(*args, **kwargs)  # Params4bit.to returns a plain Params4bit: keep our class
            if not isinstance(out, NF4Parameter):
                out = NF4Parameter(
                    out.data, requires_grad=False, quant_state=out.quant_state, blocksize=out.blocksize,
                    compress_statistics=out.compress_statistics, quant_type=out.quant_type,
                    quant_storage=out.quant_storage, bnb_quantized=True,
                )
            return out

        def __reduce_ex__(self, protocol):
            # Parameter's default pickling rebuilds a plain nn.Parameter and would drop the NF4 class
            return (_rebuild_nf4_parameter, (self.data, self.quant_state, self.blocksize, self.compress_statistics,
                                             self.quant_type, self.quant_storage))

    NF4Parameter.__module__ = __name__
    NF4Parameter.__qualname__ = "NF4Parameter"
    _param_cls = NF4Parameter
    return NF4Parameter


def _rebuild_nf4_parameter(data, quant_state, blocksize, compress_statistics, quant_type, quant_storage):
    """Unpickles an NF4Parameter (used by torch.save / pickle / copy of whole models)."""
    return _nf4_param_cls()(data, requires_grad=False, quant_state=quant_state, blocksize=blocksize,
                            compress_statistics=compress_statistics, quant_type=quant_type,
                            quant_storage=quant_storage, bnb_quantized=True)


def __getattr__(name: str):
    """Module attribute ``NF4Parameter`` is created on first access (it needs bitsandbytes); pickle relies on it."""
    if name == "NF4Parameter":
        return _nf4_param_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_quantized(weight: torch.Tensor) -> bool:
    """True for a bitsandbytes 4-bit weight (an NF4Parameter or any quantized ``Params4bit``), False for plain tensors."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not hasattr(bnb, "nn"):
        return False  # no 4-bit parameter can exist before bitsandbytes is imported
    return isinstance(weight, bnb.nn.Params4bit) and bool(getattr(weight, "bnb_quantized", False)) \
        and getattr(weight, "quant_state", None) is not None


def logical_shape(weight: torch.Tensor) -> torch.Size:
    """The [out, in] shape a weight stands for (``weight.shape`` for plain tensors, the pre-quantization shape for NF4)."""
    return torch.Size(weight.quant_state.shape) if is_quantized(weight) else weight.shape


def logical_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype :func:`dequantize` returns by default (``weight.dtype`` for plain tensors)."""
    return weight.quant_state.dtype if is_quantized(weight) else weight.dtype


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> nn.Parameter:
    """Quantizes a float [out, in] weight to an NF4Parameter (packed [(out·in+1)//2, 1] uint8 + quant_state), requires_grad False."""
    if is_quantized(weight):
        raise ValueError("weight is already quantized")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"NF4 quantization needs a bf16/fp16/fp32 weight, got {weight.dtype}")
    if block_size not in _BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {_BLOCK_SIZES}, got {block_size}")
    if weight.device.type == "meta":
        raise ValueError("cannot quantize a weight on the meta device: materialize the model first")
    check_backend_available(weight.device)
    bnb = _import_backend()
    with torch.no_grad():
        packed, state = bnb.functional.quantize_4bit(
            weight.detach().contiguous(), blocksize=block_size, compress_statistics=double_quant, quant_type="nf4",
        )
    cls = _nf4_param_cls()
    return cls(packed, requires_grad=False, quant_state=state, blocksize=block_size,
               compress_statistics=double_quant, quant_type="nf4", quant_storage=packed.dtype, bnb_quantized=True)


def dequantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Returns the [out, in] float weight (NF4 decoded directly in ``dtype``, default its original dtype); plain tensors pass through (cast if ``dtype``)."""
    if not is_quantized(weight):
        return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)
    bnb = _import_backend()
    state = weight.quant_state
    if dtype is not None and dtype != state.dtype:
        state = copy.copy(state)  # shallow: shares the scale tensors, only the output dtype differs
        state.dtype = dtype
    with torch.no_grad():
        return bnb.functional.dequantize_4bit(weight.data, state)


def dequantize_model(model: nn.Module) -> int:
    """Replaces in place every NF4 weight in ``model`` by a dense, frozen one in its original dtype (the dtype
    :meth:`loratune.layers.LoraLayer.merge` gives a merged NF4 weight, so a merged model ends up in one dtype);
    weights shared by several modules stay shared. Returns how many distinct weights were replaced.

    The inverse of :func:`quantize_model` up to the NF4 rounding, which stays. Needed wherever a model must be
    plain: ``save_pretrained`` would write the packed uint8 codes, which no model can load.
    """
    dense: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if is_quantized(p):
                if id(p) not in dense:
                    dense[id(p)] = nn.Parameter(dequantize(p), requires_grad=False)
                setattr(module, name, dense[id(p)])
    return len(dense)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., out] = x[..., in] @ W[out, in]^T + bias[out]: F.linear for plain W, dequant-on-the-fly (grad w.r.t. x only) for NF4."""
    if not is_quantized(weight):
        return F.linear(x, weight, bias)
    state = weight.quant_state
    out_f, in_f = state.shape
    if x.shape[-1] != in_f:
        raise RuntimeError(
            f"linear: input has {x.shape[-1]} features but the NF4 weight is [{out_f}, {in_f}] (out, in)"
        )
    bnb = _import_backend()
    if x.dtype != state.dtype and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        # bitsandbytes' forward decodes W straight into x.dtype, but its backward decodes into
        # quant_state.dtype and casts: give both the same decode so dx is exactly that of the forward.
        state = copy.copy(state)
        state.dtype = x.dtype
    # bitsandbytes' autograd.Function returns dx only (the base is frozen); under torch.autocast its
    # inner F.linear is autocast like any other, so y comes out in the autocast dtype.
    y = bnb.matmul_4bit(x, weight.data.t(), quant_state=state)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def weight_nbytes(weight: torch.Tensor) -> int:
    """Bytes a weight occupies: numel·element_size, plus for NF4 the absmax codes, nested scales, offset and code tables."""
    if not is_quantized(weight):
        return weight.numel() * weight.element_size()
    return sum(t.numel() * t.element_size() for t in _quant_tensors(weight))


def _quant_tensors(weight: torch.Tensor) -> list[torch.Tensor]:
    st = weight.quant_state
    ts = [weight.data, st.absmax]
    for t in (st.code, st.offset):
        if isinstance(t, torch.Tensor):
            ts.append(t)
    if st.state2 is not None:
        ts += [t for t in (st.state2.absmax, st.state2.code) if isinstance(t, torch.Tensor)]
    return ts


def _unique_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's NF4 weights (packed codes + all quantization state), shared tensors counted once."""
    return _unique_nbytes(t for p in model.parameters() if is_quantized(p) for t in _quant_tensors(p))


def parameter_nbytes(model: nn.Module) -> int:
    """Bytes held by all of the model's parameters, NF4 ones at their real (packed + scales) size, shared ones once."""
    ts = []
    for p in model.parameters():
        ts.extend(_quant_tensors(p) if is_quantized(p) else [p])
    return _unique_nbytes(ts)


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    parts = name.split(".")
    for pat in patterns:
        if name == pat or name.endswith("." + pat) or pat in parts:
            return pat
    return None


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] = ("lm_head",),
    min_size: int = 1024,
    block_size: int = 64,
    double_quant: bool = True,
) -> dict:
    """Replaces in place the weight of each nn.Linear (not skipped, not output/input embeddings, numel >= min_size) by NF4; returns a report.

    ``skip`` entries match a module's full dotted name, a dotted suffix of it ("mlp.down_proj") or one
    of its components ("lm_head"). The model's output embeddings (``get_output_embeddings()``) and any
    Linear whose weight is shared with an ``nn.Embedding`` (tied) are always left alone. Biases stay
    as they are. Report keys: ``backend``, ``block_size``, ``double_quant``, ``quantized`` (count),
    ``quantized_names``, ``skipped`` ({name: reason}), ``bytes_before`` / ``bytes_after`` (the
    quantized weights only), ``ratio``.
    """
    skip = tuple(skip)
    protected: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out_emb = get_out()
        except (NotImplementedError, AttributeError):
            out_emb = None
        if out_emb is not None:
            protected.add(id(out_emb))
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    plan, skipped = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or type(mod).__name__ == "NonDynamicallyQuantizableLinear":
            continue  # MultiheadAttention's out_proj weight is read directly by F.multi_head_attention_forward
        w = mod.weight
        pat = _matches(name, skip)
        if pat is not None:
            skipped[name] = f"skip pattern {pat!r}"
        elif id(mod) in protected:
            skipped[name] = "output embeddings"
        elif id(w) in emb_weights:
            skipped[name] = "tied to an input embedding"
        elif is_quantized(w):
            skipped[name] = "already quantized"
        elif w.numel() < min_size:
            skipped[name] = f"smaller than min_size ({w.numel()} < {min_size})"
        elif w.device.type == "meta":
            skipped[name] = "on the meta device"
        else:
            plan.append((name, mod))

    if plan:
        check_backend_available(plan[0][1].weight.device)
    done: dict[int, nn.Parameter] = {}  # weights shared by several Linear layers are quantized once
    before_ts, names = [], []
    for name, mod in plan:
        w = mod.weight
        if id(w) not in done:
            before_ts.append(w)
            done[id(w)] = quantize_nf4(w.detach(), block_size=block_size, double_quant=double_quant)
        mod.weight = done[id(w)]
        names.append(name)
    before = _unique_nbytes(before_ts)
    after = _unique_nbytes(t for q in done.values() for t in _quant_tensors(q))
    return {
        "backend": f"{BACKEND} {getattr(sys.modules.get('bitsandbytes'), '__version__', '?')}",
        "block_size": block_size,
        "double_quant": double_quant,
        "quantized": len(names),
        "quantized_names": names,
        "skipped": skipped,
        "bytes_before": before,
        "bytes_after": after,
        "ratio": (after / before) if before else 1.0,
    }
