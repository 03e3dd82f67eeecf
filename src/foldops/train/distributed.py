"""Process groups, DDP / FSDP2 wrapping and the few collectives the Trainer needs.

Started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` in the environment) the Trainer joins the process group itself, with the
backend torch recommends for the device (NCCL for NVIDIA GPUs, gloo for CPU, ...). A
process group initialised by the caller is used as it is.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from foldops.device import resolve_device


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """``torchrun`` (or a launcher setting its variables) started this process, one or more."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _torchrun_world_size() -> int:
    try:
        return int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return 1


def setup(device: str, timeout_s: float, strategy: str) -> Tuple[DistContext, torch.device]:
    """Join (or find) the process group; return the context and this rank's device.

    Under torchrun, ``"ddp"`` and ``"fsdp"`` join the group whatever its size (one process
    included); ``"auto"`` joins it only for more than one process, else runs single.
    """
    base = resolve_device(device)
    joins = launched_by_torchrun() and (strategy in ("ddp", "fsdp") or (strategy == "auto"
                                                                       and _torchrun_world_size() > 1))
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    elif joins:
        if not dist.is_available():
            raise RuntimeError(f"strategy: {strategy!r} under torchrun needs torch.distributed, which this "
                               f"torch build lacks")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = _rank_device(base, local_rank)
        backend = dist.get_default_backend_for_device(dev)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here=True)
    else:
        ctx = DistContext()
    if strategy in ("ddp", "fsdp") and not ctx.enabled and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"strategy: {strategy!r} needs a process group; start with torchrun, or use 'auto'")
    return ctx, _rank_device(base, ctx.local_rank) if (ctx.enabled or dist.is_initialized()) else base


def _rank_device(base: torch.device, local_rank: int) -> torch.device:
    if base.type in ("cpu", "mps", "meta"):
        return torch.device(base.type)
    dev = torch.device(base.type, local_rank)
    module = torch.get_device_module(base.type)
    if hasattr(module, "set_device"):
        module.set_device(dev)
    return dev


def teardown(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
        ctx.initialized_here = False


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def any_true(flag: torch.Tensor) -> torch.Tensor:
    """Logical OR of a boolean scalar tensor over ranks (in place for the caller's use)."""
    if active():
        f = flag.to(torch.int32)
        dist.all_reduce(f, op=dist.ReduceOp.MAX)
        return f.bool()
    return flag


def gather_objects(obj: Any) -> List[Any]:
    if not active():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_across_ranks(values: Dict[str, Tuple[float, float, str]]) -> Dict[str, float]:
    """{name: (value, weight, reduce_fx)} on each rank -> {name: float} over all ranks.

    ``"mean"`` entries carry (weighted sum, weight) and give the weighted mean; ``"sum"``,
    ``"max"``, ``"min"`` combine the ranks' values so. Ranks may log different names.
    """
    acc: Dict[str, list] = {}
    for part in gather_objects(values):
        for name, (v, w, fx) in part.items():
            if name not in acc:
                acc[name] = [v, w, fx]
                continue
            a = acc[name]
            if fx == "mean" or fx == "sum":
                a[0] += v
                a[1] += w
            elif fx == "max":
                a[0] = max(a[0], v)
            else:
                a[0] = min(a[0], v)
    out = {}
    for name in sorted(acc):
        v, w, fx = acc[name]
        out[name] = (v / w if w else float("nan")) if fx == "mean" else float(v)
    return out


# Wrapping ------------------------------------------------------------------------------------

class StepDispatch(nn.Module):
    """Routes ``forward(mode, batch, step)`` to the model's ``*_step`` methods.

    DDP and FSDP2 do their bookkeeping in ``forward``; the model's steps are other methods,
    so the wrapped module is this dispatcher, as Lightning does.
    """

    _METHODS = {"train": "training_step", "val": "validation_step", "predict": "predict_step"}

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, mode: str, batch: Any, step: int) -> Any:
        method = getattr(self.model, self._METHODS[mode], None)
        if method is None:
            if mode == "predict" and type(self.model).forward is not nn.Module.forward:
                return self.model(batch)
            if mode == "predict":
                raise AttributeError(f"model: {type(self.model).__name__} has neither predict_step() nor forward()")
            raise AttributeError(f"model: {type(self.model).__name__} has no {self._METHODS[mode]}()")
        return method(batch, step)


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type not in ("cpu", "mps") and device.index is not None else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def default_fsdp_blocks(model: nn.Module) -> List[nn.Module]:
    """Every child of every ``nn.ModuleList`` (the blocks of a stack), outermost first."""
    blocks: List[nn.Module] = []
    seen = set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                if id(child) not in seen:
                    seen.add(id(child))
                    blocks.append(child)
    # A block inside another block is sharded with its parent.
    inner = set()
    for b in blocks:
        for m in b.modules():
            if m is not b:
                inner.add(id(m))
    return [b for b in blocks if id(b) not in inner]


def apply_fsdp(dispatch: StepDispatch, block_names: Optional[Sequence[str]], mp_dtype: Optional[torch.dtype],
               device: torch.device) -> nn.Module:
    """``fully_shard`` each block, then the root (the dispatcher), on a mesh of ``device``'s type.

    The mesh is explicit: FSDP2's default mesh takes the machine's accelerator even when
    training runs on CPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = dispatch.model
    broadcast_module(model)  # fully_shard does not sync initial weights across ranks
    if block_names is None:
        blocks = default_fsdp_blocks(model)
    else:
        names = set(block_names)
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if not blocks:
            raise ValueError(f"fsdp_blocks: no module of the model has a class named in {sorted(names)}")
    kwargs = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
    if mp_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(dispatch, **kwargs)
    return dispatch


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    if not active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    f = getattr(t, "full_tensor", None)
    return f() if callable(f) else t


def grads_of(params: Iterable[torch.nn.Parameter]) -> List[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]
