"""Loading base models and tokenizers through transformers' Auto classes, with one-line errors.

A model is named by a local directory or a hub id (``Qwen/Qwen3-0.6B``); hub downloads go through
transformers as usual. ``trust_remote_code`` stays off unless the caller asks for it.
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """'bf16' → torch.bfloat16; raises ValueError listing the valid names."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of fp32, bf16, fp16; got {name!r}") from None


def _check_source(name_or_path: str) -> None:
    """A path-like name that does not exist is reported as such, not as a failed hub lookup."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1] \
        or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model directory {name_or_path} does not exist")


def _wrap(err: Exception, what: str, name_or_path: str) -> Exception:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(f"cannot load {what} from {name_or_path!r}: {first}")


def load_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """transformers config for a local dir or hub id."""
    from transformers import AutoConfig

    _check_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _wrap(err, "a model config", name_or_path) from None


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               device: str | torch.device | None = None) -> torch.nn.Module:
    """A causal LM via ``AutoModelForCausalLM.from_pretrained`` (safetensors only), in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    _check_source(name_or_path)
    hf_logging.disable_progress_bar()  # one bar per run is ours; transformers' loading bars are noise here
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)
    except (OSError, ValueError) as err:
        raise _wrap(err, "a causal LM", name_or_path) from None
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (eos when none is set) and left untouched otherwise."""
    from transformers import AutoTokenizer

    _check_source(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _wrap(err, "a tokenizer", name_or_path) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class QuantBackendError(RuntimeError, ValueError):
    """The NF4 backend is missing or broken. A RuntimeError as :func:`loratune.quant.check_backend_available` raises
    it, and a ValueError so that the CLI prints it as one line and exits with code 2, like any fixable setup error."""


def require_quant_backend(quantize: str, device: str | torch.device = "cpu") -> None:
    """For ``quantize="nf4"``: raise :class:`QuantBackendError` (saying how to fix it) unless bitsandbytes' NF4 ops work."""
    if quantize != "nf4":
        return
    from . import quant

    try:
        quant.check_backend_available(device)
    except RuntimeError as err:
        raise QuantBackendError(str(err)) from None


def quantize_base(model: torch.nn.Module, quantize: str) -> dict | None:
    """With ``quantize="nf4"``: NF4-quantize the base's linear weights in place (:func:`loratune.quant.quantize_model`,
    whose report is returned), then give the CPU weights that stay dense (embedding, norms, buffers) memory of their
    own. ``from_pretrained`` memory-maps the checkpoint, and while any tensor still views that map, the file pages of
    the bf16 weights just quantized stay in the process's RSS (0.9 GB of Qwen3-0.6B's 1.1 GB); copying the dense
    remainder releases the map. Then, with glibc, the quantizer's freed temporaries are handed back to the OS
    (``malloc_trim``): otherwise 0.05-1.1 GB of them stayed in RSS after quantizing Qwen3-0.6B, varying from run to
    run. With ``quantize="none"``: nothing (returns None)."""
    if quantize != "nf4":
        return None
    from . import quant

    report = quant.quantize_model(model)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and not quant.is_quantized(t):
                t.data = t.data.clone()
    trim_heap()
    return report


_MALLOC_TRIM: Any = None


def trim_heap(collect: bool = True) -> None:
    """Hand the heap's free memory back to the OS where the C library is glibc (``malloc_trim(0)``); nothing
    elsewhere. ``collect`` first runs the garbage collector (unreachable cycles may still hold tensors)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # musl and other C libraries: no malloc_trim
                pass
    if collect:
        gc.collect()
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def load_with_adapters(model: str, adapters: list[str] | tuple[str, ...] = (), dtype: torch.dtype = torch.float32,
                       quantize: str = "none", trust_remote_code: bool = False,
                       device: str | torch.device | None = None) -> tuple[torch.nn.Module, Any]:
    """Base model (optionally NF4-quantized) with adapter directories loaded and all of them active, plus tokenizer.

    Several adapters are loaded as ``adapter0``, ``adapter1``, ... and their updates add up.
    """
    from .adapters import load_adapter
    from .inject import set_active_adapters

    require_quant_backend(quantize, device or "cpu")  # before loading: a missing backend fails fast
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    net = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    quantize_base(net, quantize)
    names = []
    for i, path in enumerate(adapters):
        names.append(f"adapter{i}")
        load_adapter(net, path, names[-1])
    if names:
        set_active_adapters(net, names)
    for p in net.parameters():
        p.requires_grad_(False)
    return net, tokenizer
