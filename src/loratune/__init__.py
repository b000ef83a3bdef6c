"""loratune: LoRA and QLoRA fine-tuning for Hugging Face causal LMs, with PEFT-compatible adapters."""
import os
import time


def _default_wait_policy() -> None:
    """Choose how idle OpenMP threads wait, before torch is imported (only then does it take effect).

    Spinning between parallel regions (libgomp's default) pays on an idle machine: Qwen3-0.6B training steps on the
    reference 2-core CPU ran 12 % faster than with sleeping threads. On a busy machine it costs far more: a spinning
    thread holds a core that its partner, descheduled, needs to reach the barrier (1.6x slower beside one other
    2-thread job; both measured by ``benchmarks/step_variants.py``). So threads sleep (``OMP_WAIT_POLICY=PASSIVE``) when
    something else runs here now (:func:`_machine_busy`). An explicit ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is
    left alone.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    if _machine_busy():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _machine_busy(samples: int = 7, interval_s: float = 0.004) -> bool:
    """Whether other work runs here now: in most of a few samples of Linux's instantaneous count of runnable threads
    (/proc/loadavg; the reading process is one of them) over ~30 ms, another thread is runnable; elsewhere a 1-minute
    load average ≥ 0.5. Instantaneous, not the load average, so that a job that has just ended (a previous run)
    does not count; a majority of samples, so that a brief wake-up of some daemon does not either."""
    try:
        others = 0
        for _ in range(samples):
            with open("/proc/loadavg") as f:
                others += int(f.read().split()[3].split("/")[0]) > 1
            time.sleep(interval_s)
        return others > samples // 2
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0] >= 0.5
    except (AttributeError, OSError):  # no load average at all: the safe choice for a shared machine
        return True


_default_wait_policy()

from .adapters import load_adapter, read_adapter, save_adapter
from .config import LoraConfig
from .inject import disable_adapters, find_targets, inject_adapter, set_active_adapters, trainable_summary
from .layers import LoraLayer
from .merge import merge_adapters, merge_and_unload, unload, unmerge_adapters
from .model import LoraModel, get_lora_model

__version__ = "0.1.0"
__all__ = [
    "LoraConfig", "LoraLayer", "LoraModel", "get_lora_model", "inject_adapter", "find_targets",
    "set_active_adapters", "disable_adapters", "trainable_summary", "save_adapter", "load_adapter", "read_adapter",
    "merge_adapters", "unmerge_adapters", "merge_and_unload", "unload",
]
