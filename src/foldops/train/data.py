"""Batches on the device, and a data order that a resumed run can continue exactly.

The order of an epoch is a function of ``(seed, epoch)`` only: a permutation drawn from
a generator seeded with ``seed + epoch`` (as ``DistributedSampler`` does), split across
ranks by striding (rank ``r`` takes positions ``r, r + W, ...``). A position in the data
is then just "samples consumed so far this epoch", which is valid for any number of
processes: with striding, rank ``r`` of ``W`` skipping ``s / W`` of its own samples
resumes the global order at ``s`` exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)


def transfer_to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Move every tensor in a nested structure to ``device``.

    Handles dicts (and other mappings, type kept), lists, tuples, named tuples and
    dataclass instances; strings, numbers, arrays and other leaves are returned as they are.
    """
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        # non_blocking only helps (and is only safe) from pinned host memory.
        return batch.to(device, non_blocking=non_blocking and batch.is_pinned())
    if isinstance(batch, (str, bytes)):
        return batch
    if isinstance(batch, Mapping):
        moved = {k: transfer_to_device(v, device, non_blocking) for k, v in batch.items()}
        if type(batch) is dict:
            return moved
        try:
            if hasattr(batch, "default_factory"):  # defaultdict
                return type(batch)(batch.default_factory, moved)
            return type(batch)(moved)
        except Exception:  # noqa: BLE001 - an exotic mapping: a plain dict is the safe answer
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(transfer_to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        moved = [transfer_to_device(v, device, non_blocking) for v in batch]
        if all(m is v for m, v in zip(moved, batch)):
            return batch  # already there: no new container
        return type(batch)(moved)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {}
        for f in dataclasses.fields(batch):
            value = getattr(batch, f.name)
            moved = transfer_to_device(value, device, non_blocking)
            if moved is not value:
                changes[f.name] = moved
        if not changes:
            return batch
        import copy

        out = copy.copy(batch)
        for name, value in changes.items():
            object.__setattr__(out, name, value)  # also for frozen dataclasses
        return out
    return batch


def batch_size_of(batch: Any) -> Optional[int]:
    """Leading dimension of the first tensor found in ``batch`` (for throughput), or None."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, Mapping):
        items = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        items = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    else:
        return None
    for v in items:
        n = batch_size_of(v)
        if n is not None:
            return n
    return None


class ResumableSampler(Sampler[int]):
    """Sample order as a function of ``(seed, epoch)``, sharded by rank, skippable.

    Args:
        num_samples: dataset length.
        shuffle: permute each epoch (else 0..n-1).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        rank, world_size: this process's shard (rank ``r`` takes every ``world_size``-th).
        drop_last: drop the tail that does not divide by ``world_size``; else pad it by
            wrapping around (every rank then sees the same number of samples).
        pad: with ``drop_last=False``, pad (True, needed for training under DDP) or give the
            ranks unequal shards (False, for evaluation).
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, pad: bool = True) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples: expected >= 0, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.pad = pad
        self.epoch = 0
        self.start = 0  # samples of this rank's shard to skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, global_samples_consumed: int) -> None:
        """Skip what was consumed this epoch, counted over all ranks."""
        self.start = int(global_samples_consumed) // self.world_size

    def global_order(self) -> torch.Tensor:
        n = self.num_samples
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        w = self.world_size
        if self.drop_last:
            order = order[: (n // w) * w]
        elif self.pad and n % w and n > 0:
            extra = w - n % w
            order = torch.cat([order, order.repeat(math.ceil(extra / n))[:extra]])
        return order

    def shard_len(self) -> int:
        n, w = self.num_samples, self.world_size
        if self.drop_last:
            return n // w
        if self.pad:
            return math.ceil(n / w)
        return len(range(self.rank, n, w))

    def __iter__(self) -> Iterator[int]:
        shard = self.global_order()[self.rank:: self.world_size]
        return iter(shard[self.start:].tolist())

    def __len__(self) -> int:
        return max(0, self.shard_len() - self.start)


class _SkipBatches(Sampler):
    """A batch sampler with the first ``skip`` batches dropped (cheap: indices only)."""

    def __init__(self, batch_sampler, skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


_LOADER_KWARGS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                  "multiprocessing_context", "prefetch_factor", "persistent_workers",
                  "pin_memory_device", "in_order")


def _loader_kwargs(loader: DataLoader) -> dict:
    out = {}
    for name in _LOADER_KWARGS:
        if hasattr(loader, name):
            out[name] = getattr(loader, name)
    if out.get("num_workers", 0) == 0:
        out.pop("prefetch_factor", None)
        out["persistent_workers"] = False
    return out


class EpochData:
    """Turns a user's loader into per-epoch iterators that start at any position.

    A ``DataLoader`` with a plain batch size and a random, sequential or distributed
    sampler is rebuilt around a :class:`ResumableSampler` (skipping costs nothing). A
    ``DataLoader`` with a custom batch sampler gets its batch sampler skipped (its own
    ``set_epoch`` is called). Any other iterable is iterated and the consumed batches
    are skipped by reading them (correct for data that does not depend on RNG state).
    """

    def __init__(self, loader: Any, *, seed: int, rank: int, world_size: int, train: bool) -> None:
        self.source = loader
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.sampler: Optional[ResumableSampler] = None
        self.loader = loader
        self.batch_size: Optional[int] = None
        self.kind = "iterable"
        if isinstance(loader, DataLoader):
            self._wrap_dataloader(loader)
        elif not hasattr(loader, "__iter__"):
            raise TypeError(f"loader: expected a DataLoader or an iterable of batches, got {type(loader).__name__}")

    def _wrap_dataloader(self, loader: DataLoader) -> None:
        sampler = loader.sampler
        plain = loader.batch_size is not None and isinstance(
            sampler, (RandomSampler, SequentialSampler, DistributedSampler))
        if plain and not isinstance(loader.dataset, torch.utils.data.IterableDataset):
            if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None):
                plain = False
        if plain and not isinstance(loader.dataset, torch.utils.data.IterableDataset):
            shuffle = isinstance(sampler, RandomSampler) or (
                isinstance(sampler, DistributedSampler) and sampler.shuffle)
            seed = self.seed + (sampler.seed if isinstance(sampler, DistributedSampler) else 0)
            self.sampler = ResumableSampler(
                len(loader.dataset), shuffle=shuffle, seed=seed, rank=self.rank,
                world_size=self.world_size,
                drop_last=isinstance(sampler, DistributedSampler) and sampler.drop_last,
                pad=self.train)
            self.batch_size = loader.batch_size
            self.loader = DataLoader(
                loader.dataset, batch_size=loader.batch_size, sampler=self.sampler,
                drop_last=loader.drop_last, generator=torch.Generator(), **_loader_kwargs(loader))
            self.drop_last = loader.drop_last
            self.kind = "resumable"
        elif loader.batch_sampler is not None and not isinstance(loader.dataset, torch.utils.data.IterableDataset):
            self.kind = "batch_sampler"
            self.batch_size = loader.batch_size
        else:
            self.kind = "iterable"

    def _seed_for(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch * 7919 + self.rank) % (2**63 - 1)

    def num_batches(self, epoch: int) -> Optional[int]:
        """Batches this rank sees in a full epoch, or None when the loader has no length."""
        if self.kind == "resumable":
            n = self.sampler.shard_len()
            b = self.batch_size
            return n // b if self.drop_last else math.ceil(n / b)
        try:
            return len(self.source)
        except TypeError:
            return None

    def samples_per_batch_all_ranks(self) -> Optional[int]:
        return None if self.batch_size is None else self.batch_size * self.world_size

    def epoch_iter(self, epoch: int, skip_batches: int = 0) -> Iterator[Any]:
        """The batches of ``epoch`` on this rank, from batch ``skip_batches`` on."""
        if self.kind == "resumable":
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(skip_batches * self.batch_size * self.world_size)
            # Worker seeds (and the iterator's base seed) come from this generator, not from
            # the global RNG, which a resumed run must find untouched.
            self.loader.generator.manual_seed(self._seed_for(epoch))
            return iter(self.loader)
        loader = self.source
        for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        if isinstance(loader, DataLoader):
            g = torch.Generator()
            g.manual_seed(self._seed_for(epoch))
            loader.generator = g
            if self.kind == "batch_sampler" and skip_batches:
                skipped = DataLoader(loader.dataset, batch_sampler=_SkipBatches(loader.batch_sampler, skip_batches),
                                     generator=loader.generator, **_loader_kwargs(loader))
                return iter(skipped)
        it = iter(loader)
        if skip_batches:
            it = itertools.islice(it, skip_batches, None)
        return it

    def resumed_skip(self, samples_consumed: int, batches_consumed: int) -> int:
        """Batches to skip on this rank after a resume (from the saved global position)."""
        if self.kind == "resumable" and self.batch_size:
            return samples_consumed // (self.batch_size * self.world_size)
        return batches_consumed


def eval_loader(loader: Any, *, rank: int, world_size: int, pad: bool) -> Any:
    """A loader that gives each rank its share of evaluation data (order kept, no shuffle)."""
    if world_size == 1 or not isinstance(loader, DataLoader) or loader.batch_size is None \
            or isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return loader
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    sampler = ResumableSampler(len(loader.dataset), shuffle=False, rank=rank, world_size=world_size, pad=pad)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      drop_last=loader.drop_last, **_loader_kwargs(loader))


__all__ = ["transfer_to_device", "batch_size_of", "ResumableSampler", "EpochData", "eval_loader"]
