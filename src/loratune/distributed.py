"""Data-parallel training under ``torchrun``: DDP, or FSDP2 for bases that do not fit on one device.

``torchrun --nproc_per_node N -m loratune train RECIPE`` starts N processes (ranks) that each run
:func:`loratune.train.train`; this module is everything that differs from a single process. It is PyTorch's own
engine throughout: ``torch.distributed`` process groups (gloo on CPUs, nccl on CUDA, chosen automatically),
``DistributedDataParallel`` or FSDP2's ``fully_shard``.

The global batch does not depend on the number of ranks
----------------------------------------------------------
A single process takes ``grad_accum`` micro-batches from the seeded data order for each optimizer step. Under
torchrun every rank walks the very same order and takes the same ``grad_accum`` micro-batches, then trains on its
share of them: rank r gets micro-batches r, r+N, r+2N, ... of the step (so ``grad_accum`` must be a multiple of N;
``batch_size`` is what one forward pass sees, per device). The shares are disjoint and together they are the
single-process step. The loss of each micro-batch is divided by the trainable-token count of the *whole* step
(every rank knows it: it holds the step's list of micro-batches), and the gradient reduction *sums* over ranks
(DDP: no_sync for all but a rank's last micro-batch, then a SUM all-reduce comm hook; FSDP2: gradient divide
factor 1 with sum-only reductions), so the update is the single-process one up to fp32 summation order. This is
what makes ``--resume`` work with any world size that divides ``grad_accum``: a checkpoint does not know or care
how many ranks wrote it. Dropout draws random numbers per rank; rank 0 keeps the single-process stream, rank r > 0
a stream seeded from (seed, r), so with dropout > 0 runs on different world sizes are equally valid but not equal.

Only rank 0 writes (metrics, plot, checkpoints, adapter, summary) and shows progress; only rank 0 *reads*
checkpoints too (it broadcasts them), so nodes need not share a filesystem for checkpoints. Training data and the
base model must be readable by every rank. Set-up failures are agreed on: a rank that cannot read its data or
model tells the others, and every rank stops with one line naming the rank.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .adapters import adapter_state_dict, copy_adapter_tensors, read_adapter, save_adapter, write_adapter
from .inject import adapter_configs
from .loss import count_trainable_tokens

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class WorldError(ValueError):
    """A misconfigured world. Every rank raises the same one; only rank 0 prints it (``quiet`` elsewhere)."""

    def __init__(self, message: str, rank: int = 0) -> None:
        super().__init__(message)
        self.quiet = rank != 0


def env_rank() -> int:
    """This process's global rank under torchrun (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass
class World:
    """Where this process stands: rank, world size, device, and whether the model is sharded (FSDP2).

    With ``size == 1`` (no torchrun) every method is the plain single-process code path, unchanged.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    backend: str | None = None
    fsdp: bool = False
    owns_group: bool = False
    seed: int = 0
    set_up: bool = False  # past the set-up agreement (see agree_setup)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- set-up ---------------------------------------------------------------------------------------------------
    def threads(self, configured: int) -> int:
        """CPU threads for torch: ``configured``, or this node's cores shared among its ranks."""
        return configured or max(1, (os.cpu_count() or 1) // self.local_size)

    def load_device(self) -> torch.device:
        """Where the base model is loaded: the training device, except under FSDP2 where the full model is loaded
        on the CPU and ``fully_shard`` moves only this rank's shard to the device."""
        return torch.device("cpu") if self.fsdp else self.device

    def agree_setup(self, model: nn.Module, train_set: Any, eval_set: Any) -> None:
        """The first collective of a run: every rank reports that it got this far, with a fingerprint of its data.

        A rank whose set-up failed (no data, no model, bad recipe values it alone sees) takes part in this same
        collective from :func:`launch`, with its error instead, so no rank waits forever for it. Ranks that read
        different training data (different files on different nodes) are stopped too: their gradients would not
        belong to one run.
        """
        if not self.distributed:
            return
        mine = {"ok": True, "host": socket.gethostname(), "data": _fingerprint(train_set, eval_set)}
        if self.fsdp:  # FSDP2 shards each rank's own copy: the LoRA init must agree bit for bit
            mine["lora"] = _tensor_digest(p for p in model.parameters() if p.requires_grad)
        self._agree(mine)

    def _agree(self, mine: dict[str, Any]) -> None:
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.size
        self.set_up = True  # from here on a failure is no longer reported through this collective
        dist.all_gather_object(everyone, mine)
        failed = [(r, s) for r, s in enumerate(everyone) if not s["ok"]]
        if failed:
            msgs = {s["error"] for _, s in failed}
            if len(failed) == self.size and len(msgs) == 1:
                raise WorldError(msgs.pop(), self.rank)
            r, s = failed[0]
            more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
            raise WorldError(f"rank {r} of {self.size} (host {s['host']}) failed to set up{more}: {s['error']}",
                             self.rank)
        for key, what in (("data", "training/eval data"), ("lora", "initial LoRA weights")):
            values = [s.get(key) for s in everyone]
            if len(set(map(str, values))) > 1:
                odd = next(r for r, v in enumerate(values) if v != values[0])
                raise WorldError(f"rank {odd} of {self.size} (host {everyone[odd]['host']}) has different {what} than "
                                 f"rank 0 ({values[odd]} vs {values[0]}): every rank must read the same data and model",
                                 self.rank)

    def _report_setup_failure(self, err: BaseException) -> None:
        """Called by :func:`launch` when this rank failed before :meth:`agree_setup`: join that collective with the
        error. Marks the error quiet when rank 0 reports the same one."""
        import torch.distributed as dist

        text = str(err) or type(err).__name__
        if not isinstance(err, (ValueError, OSError)):
            text = f"{type(err).__name__}: {text}"
        everyone: list[Any] = [None] * self.size
        self.set_up = True
        try:
            dist.all_gather_object(everyone, {"ok": False, "host": socket.gethostname(), "error": text})
        except Exception:  # the group itself is broken: nothing more to say than our own error
            return
        if self.rank != 0 and everyone[0] is not None and not everyone[0]["ok"] and everyone[0]["error"] == text:
            with contextlib.suppress(AttributeError, TypeError):
                err.quiet = True  # type: ignore[attr-defined]

    # -- the model ------------------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step runs: ``model`` itself (one process), DDP over a loss module (gradients of
        the LoRA parameters alone are all-reduced), or FSDP2 (each decoder layer, then the loss module as root).

        The loss path calls the decoder and the chunked loss separately, so the wrapped module is
        :class:`LossModule`, whose ``forward(batch)`` computes the summed token loss: DDP's reducer and FSDP2's
        hooks see the whole computation. After wrapping, ``model.parameters()`` are still the trained ones
        (FSDP2 replaces them in place by sharded DTensors).
        """
        if not self.distributed:
            return model
        loss_module = LossModule(model, self.device)
        if self.fsdp:
            wrapped = self._fully_shard(model, loss_module)
        else:
            wrapped = self._ddp(loss_module)
        if self.rank:  # dropout: rank 0 keeps the single-process stream, others get their own
            torch.manual_seed(derived_seed(self.seed, self.rank))
        return wrapped

    def _ddp(self, loss_module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Frozen base weights and buffers are identical on every rank (same file): DDP neither broadcasts nor
        # reduces them. Only LoRA parameters (requires_grad) are in its buckets.
        ignore = [n for n, p in loss_module.named_parameters() if not p.requires_grad]
        ignore += [n for n, _ in loss_module.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(loss_module, ignore)
        # Buffers are ignored above, so they are not synced at init either way; nor in each forward:
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        ddp = DDP(loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                  find_unused_parameters=False, **no_buffer_sync)
        ddp.register_comm_hook(state=None, hook=_allreduce_sum)
        return ddp

    def _fully_shard(self, model: nn.Module, loss_module: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = init_device_mesh(self.device.type, (self.size,))
        # FSDP2 keeps per-parameter requires_grad inside one unit (frozen W beside trainable A, B): frozen
        # parameters are all-gathered for compute and simply get no gradient reduce-scatter.
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(loss_module, mesh=mesh)  # root: embeddings, final norm, (tied) head
        for m in loss_module.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # sum over ranks, do not average (see the module doc)
                if hasattr(m, "set_force_sum_reduction_for_comms"):
                    m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
        return loss_module

    # -- one optimizer step ---------------------------------------------------------------------------------------
    def accumulate_gradients(self, model: nn.Module, micro: list[dict[str, Any]], device: torch.device,
                             amp_dtype: torch.dtype | None) -> tuple[float, int]:
        """Backward over this rank's share of the step's micro-batches; returns (mean token loss of the whole step,
        input tokens of the whole step), identical on every rank. ``micro`` is the step's full list."""
        from .train import accumulate_gradients, autocast, release_free_memory

        if not self.distributed:
            return accumulate_gradients(model, micro, device, amp_dtype)
        import torch.distributed as dist

        n_tokens = sum(int(count_trainable_tokens(mb["labels"], position_ids=mb.get("position_ids"))) for mb in micro)
        tokens = sum(int(mb["input_ids"].numel() if "position_ids" in mb else mb["attention_mask"].sum())
                     for mb in micro)
        mine = micro[self.rank::self.size]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, mb in enumerate(mine):
            last = i == len(mine) - 1
            with self._gradient_sync(model, last):
                with autocast(device, amp_dtype):
                    loss, _ = model(mb)  # summed token losses of this micro-batch
                (loss / max(n_tokens, 1)).backward()
            loss_sum += loss.detach().double()
            del loss
            release_free_memory(device)  # glibc keeps freed activations otherwise (see train.release_free_memory)
        dist.all_reduce(loss_sum)  # NaN anywhere is NaN everywhere: all ranks stop together
        return float(loss_sum) / max(n_tokens, 1), tokens

    def _gradient_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        if self.fsdp:
            model.set_requires_gradient_sync(sync)  # type: ignore[operator]
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else model.no_sync()  # type: ignore[operator]

    @torch.no_grad()
    def evaluate_loss(self, model: nn.Module, dataset: Any, cfg: Any, tokenizer: Any, device: torch.device,
                      amp_dtype: torch.dtype | None) -> float:
        """Mean token cross-entropy on ``dataset``; under torchrun each rank scores every N-th batch and the sums
        are all-reduced (under FSDP2 every rank runs the same number of forwards, the extra ones discarded)."""
        from .train import autocast, evaluate_loss, make_batching

        if not self.distributed:
            return evaluate_loss(model, dataset, cfg, tokenizer, device, amp_dtype)
        import torch.distributed as dist

        module = model if self.fsdp else model.module  # DDP: its inner module; no collectives needed here
        sampler, collate = make_batching(cfg, dataset, tokenizer)
        batches = sampler.batches(0)
        was_training = module.training
        module.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for j in range(math.ceil(len(batches) / self.size)):
            k = self.rank + j * self.size
            if k >= len(batches) and not self.fsdp:
                break
            with autocast(device, amp_dtype):
                loss, n = module(collate([dataset[i] for i in batches[min(k, len(batches) - 1)]]))
            if k < len(batches):
                sums += torch.tensor([float(loss), float(n)], dtype=torch.float64, device=device)
        module.train(was_training)
        self._reshard(model)
        dist.all_reduce(sums)
        return float(sums[0] / max(float(sums[1]), 1.0))

    def _reshard(self, model: nn.Module) -> None:
        """FSDP2 keeps the root unit gathered after a forward without backward: shard it again, so that parameters
        are DTensors between steps (what the optimizer holds and checkpoints gather)."""
        if self.fsdp:
            from torch.distributed.fsdp import FSDPModule

            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    # -- writing and reading --------------------------------------------------------------------------------------
    def save_adapter(self, model: nn.Module, path: Path, base_model_name_or_path: str | None) -> Path:
        """The adapter in PEFT's format, gathered to full tensors (FSDP2), written by rank 0 only."""
        if not self.distributed:
            return save_adapter(model, path, base_model_name_or_path=base_model_name_or_path)
        tensors = {k: full_tensor(v) for k, v in adapter_state_dict(model).items()}  # a collective under FSDP2
        if self.is_main:
            write_adapter(tensors, adapter_configs(model)["default"], path, base_model_name_or_path)
        return Path(path)

    def save_checkpoint(self, out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        state: dict[str, Any], report: dict[str, Any], cfg: Any) -> Path:
        """``checkpoints/step-N``, the same format as one process writes, with full tensors, every rank's RNG state
        and the world size; written by rank 0 only."""
        from .train import flatten_optimizer, rng_state, save_checkpoint, write_checkpoint
        import torch.distributed as dist

        if not self.distributed:
            return save_checkpoint(out, model, optimizer, scheduler, state, report, cfg)
        adapter = {k: full_tensor(v) for k, v in adapter_state_dict(model).items()}  # collectives under FSDP2
        sd = optimizer.state_dict()
        full_opt = {"state": {i: {k: full_tensor(v) for k, v in st.items()} for i, st in sd["state"].items()},
                    "param_groups": sd["param_groups"]}
        rngs: list[Any] = [None] * self.size
        dist.all_gather_object(rngs, {k: v.cpu() for k, v in rng_state().items()})
        root = Path(out) / "checkpoints" / f"step-{state['step']:07d}"
        if self.is_main:
            tensors, groups = flatten_optimizer(_StateDict(full_opt))
            tensors.update(rngs[0])
            for r in range(1, self.size):
                tensors.update({f"rank{r}.{k}": v for k, v in rngs[r].items()})
            root = write_checkpoint(out, adapter, adapter_configs(model)["default"], tensors, groups, scheduler,
                                    {**state, "world_size": self.size}, report, cfg)
        return root

    def resume(self, out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
        """Restore the newest checkpoint under ``out``; returns (state, report, where it came from).

        Under torchrun rank 0 reads it and broadcasts it, every rank loads it into its (possibly sharded) model
        and optimizer. Any world size dividing ``grad_accum`` continues the same run (see the module doc); the
        per-rank RNG states carry over when the world size is the one that wrote the checkpoint, otherwise ranks
        r > 0 are re-seeded from (seed, rank, step).
        """
        from .train import CHECKPOINTS, latest_checkpoint, load_checkpoint

        if not self.distributed:
            ckpt = latest_checkpoint(out)
            if ckpt is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {out / CHECKPOINTS}")
            state, report = load_checkpoint(ckpt, model, optimizer, scheduler)
            written_by = state.pop("world_size", 1)
            return state, report, f"{ckpt}" + (f" (written by {written_by} ranks)" if written_by != 1 else "")
        import torch.distributed as dist
        from safetensors.torch import load_file

        payload: list[Any] = [None]
        if self.is_main:
            ckpt = latest_checkpoint(out)
            if ckpt is None:
                payload[0] = {"error": f"--resume: no checkpoint in {out / CHECKPOINTS}"}
            else:
                _, adapter = read_adapter(ckpt / "adapter")
                payload[0] = {"path": str(ckpt), "meta": json.loads((ckpt / "state.json").read_text()),
                              "adapter": adapter, "tensors": load_file(ckpt / "optimizer.safetensors")}
        dist.broadcast_object_list(payload, src=0)
        got = payload[0]
        if "error" in got:
            err = FileNotFoundError(got["error"])
            err.quiet = not self.is_main  # type: ignore[attr-defined]
            raise err
        meta, tensors = got["meta"], got["tensors"]
        state = dict(meta["state"])
        written_by = int(state.pop("world_size", 1))
        copy_adapter_tensors(model, got["adapter"], convert=_like)
        # RNG: this rank's own state when the world is the same, else rank 0's for rank 0 and fresh streams
        prefix = "" if self.rank == 0 else f"rank{self.rank}."
        if written_by == self.size:
            rng = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix + "rng.")}
        else:
            rng = {k: v for k, v in tensors.items() if k.startswith("rng.")} if self.rank == 0 else {}
        if "rng.torch" in rng:
            torch.set_rng_state(rng["rng.torch"])
        else:
            torch.manual_seed(derived_seed(self.seed, self.rank, state["step"]))
        if "rng.cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["rng.cuda"])
        from .train import unflatten_optimizer

        optimizer.load_state_dict(_shard_like(unflatten_optimizer(tensors, meta["param_groups"]), optimizer))
        scheduler.load_state_dict(meta["scheduler"])
        where = got["path"] + (f" (written by {written_by} rank(s), now {self.size})" if written_by != self.size else "")
        return state, meta.get("report", {}), where


# ==============================================================================================================
# Launching
# ==============================================================================================================
@contextlib.contextmanager
def launch(cfg: Any, log: Any = print) -> Iterator[World]:
    """The world for one run of ``train(cfg)``: read torchrun's environment, check the configuration against it,
    create the process group (gloo on CPUs, nccl on CUDA), and destroy it at the end, on error too.

    A process group that already exists (the caller made one) is used as it is and left alone.
    """
    world = world_from_env(cfg)
    if not world.distributed:
        if getattr(cfg, "fsdp", False):
            log("fsdp: one process has nothing to shard; training without FSDP (start with torchrun to shard)")
        yield world
        return
    import torch.distributed as dist

    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=world.backend, device_id=world.device if world.device.type == "cuda" else None)
        except ValueError as err:  # e.g. MASTER_ADDR missing: launched by hand rather than by torchrun
            raise WorldError(f"cannot create the process group ({err}); start loratune with torchrun", world.rank) from None
        world.owns_group = True
    elif dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise WorldError(f"the existing process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not "
                         f"match RANK={world.rank} WORLD_SIZE={world.size}", world.rank)
    try:
        yield world
    except BaseException as err:
        if not world.set_up:
            world._report_setup_failure(err)
        raise
    finally:
        if world.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def world_from_env(cfg: Any) -> World:
    """Rank, world size and device from torchrun's variables, after checking them and the recipe against them.

    Raises :class:`WorldError` (one line naming the setting and its valid values) for an incomplete or
    inconsistent environment, a ``grad_accum`` the ranks cannot share evenly, and options FSDP2 cannot do.
    """
    present = [v for v in ENV_VARS if v in os.environ]
    if not present:
        return World()
    values: dict[str, int] = {}
    for name in ENV_VARS + ("LOCAL_WORLD_SIZE",):
        raw = os.environ.get(name)
        if raw is None:
            if name == "LOCAL_WORLD_SIZE":
                continue
            raise WorldError(f"{', '.join(present)} set but {name} is not: start distributed runs with torchrun "
                             "(it sets RANK, WORLD_SIZE and LOCAL_RANK), or unset them for one process")
        try:
            values[name] = int(raw)
        except ValueError:
            raise WorldError(f"{name} must be an integer, got {raw!r}") from None
    rank, size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    local_size = values.get("LOCAL_WORLD_SIZE", size)
    if size < 1 or not 0 <= rank < size or not 0 <= local_rank < max(local_size, 1):
        raise WorldError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local_rank}, "
                         f"LOCAL_WORLD_SIZE={local_size}; need 0 ≤ RANK < WORLD_SIZE and 0 ≤ LOCAL_RANK < LOCAL_WORLD_SIZE")
    if size == 1:
        return World(local_size=1)
    fsdp = bool(getattr(cfg, "fsdp", False))
    if cfg.grad_accum % size:
        valid = ", ".join(str(size * k) for k in range(1, 4))
        raise WorldError(f"grad_accum must be a multiple of the world size {size} (each optimizer step's grad_accum "
                         f"micro-batches are shared out among the ranks, so that the step is the same on any number of "
                         f"ranks); got grad_accum {cfg.grad_accum}: use --grad-accum {valid}, ...", rank)
    if fsdp and cfg.quantize != "none":
        raise WorldError(f"fsdp cannot shard {cfg.quantize}-quantized base weights; valid: quantize none with fsdp true, "
                         "or fsdp false (DDP) with quantize nf4", rank)
    if fsdp and cfg.eval_generate:
        raise WorldError("eval_generate needs the whole model on one device, which fsdp does not have; valid: "
                         "eval_generate 0 with fsdp true (then score the saved adapter with `loratune eval --generate`)",
                         rank)
    import torch.distributed as dist

    if not dist.is_available():
        raise WorldError("this torch build has no torch.distributed; valid: one process (no torchrun)", rank)
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise WorldError(f"LOCAL_RANK {local_rank} but this node has {count} visible CUDA device(s): use "
                             f"--nproc_per_node ≤ {count}", rank)
        device, backend = torch.device("cuda", local_rank), "nccl" if dist.is_nccl_available() else "gloo"
    else:
        if not dist.is_gloo_available():
            raise WorldError("no CUDA and no gloo backend in this torch build: cannot train on several CPU processes",
                             rank)
        device, backend = torch.device("cpu"), "gloo"
    return World(rank=rank, size=size, local_rank=local_rank, local_size=local_size, device=device, backend=backend,
                 fsdp=fsdp, seed=cfg.seed)


# ==============================================================================================================
# Pieces
# ==============================================================================================================
class LossModule(nn.Module):
    """``forward(batch)`` = (summed token loss, scored tokens) of one micro-batch, via :func:`loratune.train.batch_loss`.

    The one module DDP/FSDP2 wrap, so that the decoder call and the chunked loss (which reads the head weight
    directly) both happen inside the wrapped forward.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.device = device

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        from .train import batch_loss

        return batch_loss(self.model, batch, self.device)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the model's ``_no_split_modules`` classes, else the children
    of its longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _allreduce_sum(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP comm hook: all-reduce the bucket with SUM (DDP's default divides by the world size first). The loss is
    already divided by the global token count, so the sum is the single-process gradient."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), group=state, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to its full value (a collective: every rank must call it), anything else as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (full) shaped as ``target``: distributed the way ``target`` is when it is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        return distribute_tensor(value.to(device=target.device, dtype=target.dtype), target.device_mesh, target.placements)
    return value.to(device=target.device, dtype=target.dtype)


def _shard_like(sd: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state dict of full tensors made to fit ``optimizer``'s (possibly DTensor) parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        for k, v in list(st.items()):
            if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) and v.dim() > 0:
                st[k] = _like(v, p)
    return sd


class _StateDict:
    """What :func:`loratune.train.flatten_optimizer` needs of an optimizer: ``state_dict()``."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self._sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self._sd


def _fingerprint(train_set: Any, eval_set: Any) -> str:
    """Example count and a digest of every example's token ids and labels (train, then eval)."""
    h = hashlib.sha256()
    for ds in (train_set, eval_set):
        n = 0 if ds is None else len(ds)
        h.update(f"{n};".encode())
        for i in range(n):
            ex = ds[i]
            for t in (ex.input_ids, ex.labels):
                h.update(torch.as_tensor(t).to(torch.int64).numpy().tobytes())
    return f"{len(train_set)} examples, digest {h.hexdigest()[:12]}"


def _tensor_digest(tensors: Iterator[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def derived_seed(seed: int, *parts: int) -> int:
    """A seed for a per-rank RNG stream, a pure function of the run's seed and ``parts``."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
