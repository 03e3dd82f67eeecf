"""transfer_to_device on nested batches; the resumable, rank-sharded data order."""

import collections
import dataclasses
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler, TensorDataset

from foldops.train import ResumableSampler, transfer_to_device
from foldops.train.data import EpochData, batch_size_of, eval_loader

META = torch.device("meta")  # a second device on a CPU-only machine


@dataclasses.dataclass
class Feats:
    coords: torch.Tensor
    name: str
    extra: dict


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: torch.Tensor


class Pair(NamedTuple):
    a: torch.Tensor
    b: int


def test_transfer_to_device_nested():
    arr = np.ones(3)
    batch = {
        "x": torch.ones(2, 3),
        "list": [torch.zeros(1), "keep", 3, None],
        "tuple": (torch.zeros(2), 1.5),
        "pair": Pair(torch.ones(1), 7),
        "feats": Feats(torch.ones(4, 3), "1abc", {"mask": torch.ones(4, dtype=torch.bool)}),
        "frozen": Frozen(torch.ones(1)),
        "ordered": collections.OrderedDict(a=torch.ones(1)),
        "default": collections.defaultdict(list, a=torch.ones(1)),
        "array": arr,
        "bytes": b"x",
    }
    out = transfer_to_device(batch, META)
    assert out["x"].device == META and out["x"].shape == (2, 3)
    assert out["list"][0].device == META and out["list"][1:] == ["keep", 3, None]
    assert isinstance(out["tuple"], tuple) and out["tuple"][0].device == META and out["tuple"][1] == 1.5
    assert isinstance(out["pair"], Pair) and out["pair"].a.device == META and out["pair"].b == 7
    assert isinstance(out["feats"], Feats) and out["feats"].coords.device == META
    assert out["feats"].name == "1abc" and out["feats"].extra["mask"].device == META
    assert out["feats"] is not batch["feats"] and batch["feats"].coords.device.type == "cpu"  # no mutation
    assert isinstance(out["frozen"], Frozen) and out["frozen"].x.device == META
    assert type(out["ordered"]) is collections.OrderedDict and out["ordered"]["a"].device == META
    assert type(out["default"]) is collections.defaultdict and out["default"]["missing"] == []
    assert out["array"] is arr and out["bytes"] == b"x"
    same = transfer_to_device(batch, torch.device("cpu"))
    assert same["x"] is batch["x"]  # already there: no copy
    assert batch_size_of(batch) == 2 and batch_size_of({"s": "x"}) is None


def test_order_is_a_function_of_seed_and_epoch():
    s = ResumableSampler(20, shuffle=True, seed=5)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    assert list(s) != first
    s.set_epoch(1)
    assert list(s) == first
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(s) == first
    assert sorted(first) == list(range(20))
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n,world", [(20, 2), (21, 2), (7, 3), (1, 2)])
def test_shards_cover_the_global_order(n, world):
    shards = []
    for rank in range(world):
        s = ResumableSampler(n, shuffle=True, seed=0, rank=rank, world_size=world)
        shards.append(list(s))
        assert len(s) == len(shards[-1])
    assert len({len(x) for x in shards}) == 1  # padded: equal shares
    interleaved = [shards[r][i] for i in range(len(shards[0])) for r in range(world)]
    order = ResumableSampler(n, shuffle=True, seed=0).global_order().tolist()
    assert interleaved[:n] == order and set(interleaved) == set(range(n))
    dropped = [list(ResumableSampler(n, seed=0, rank=r, world_size=world, drop_last=True)) for r in range(world)]
    assert all(len(d) == n // world for d in dropped)
    uneven = [list(ResumableSampler(n, shuffle=False, rank=r, world_size=world, pad=False)) for r in range(world)]
    assert sorted(sum(uneven, [])) == list(range(n))


def test_skipping_resumes_the_global_order_for_any_world_size():
    order = ResumableSampler(24, seed=1).global_order().tolist()
    consumed = 8
    for world in (1, 2, 4):
        rest = []
        for rank in range(world):
            s = ResumableSampler(24, seed=1, rank=rank, world_size=world)
            s.set_start(consumed)
            rest.append(list(s))
        merged = [rest[r][i] for i in range(len(rest[0])) for r in range(world)]
        assert merged == order[consumed:]


def _ds(n=10):
    return TensorDataset(torch.arange(n))


def test_epoch_data_rebuilds_plain_loaders_and_skips():
    loader = DataLoader(_ds(10), batch_size=3, shuffle=True)
    data = EpochData(loader, seed=2, rank=0, world_size=1, train=True)
    assert data.kind == "resumable" and data.num_batches(0) == 4
    full = [b[0].tolist() for b in data.epoch_iter(0)]
    assert sorted(sum(full, [])) == list(range(10))
    assert [b[0].tolist() for b in data.epoch_iter(0, skip_batches=2)] == full[2:]
    assert [b[0].tolist() for b in data.epoch_iter(1)] != full
    assert data.resumed_skip(samples_consumed=6, batches_consumed=99) == 2
    # a DistributedSampler's settings carry over
    dist_loader = DataLoader(_ds(10), batch_size=2, sampler=DistributedSampler(_ds(10), num_replicas=1, rank=0,
                                                                               shuffle=False))
    data = EpochData(dist_loader, seed=0, rank=0, world_size=1, train=True)
    assert [b[0].tolist() for b in data.epoch_iter(0)][0] == [0, 1]


def test_epoch_data_custom_batch_sampler_and_iterables():
    batch_sampler = BatchSampler(SequentialSampler(range(10)), batch_size=4, drop_last=False)
    loader = DataLoader(_ds(10), batch_sampler=batch_sampler)
    data = EpochData(loader, seed=0, rank=0, world_size=1, train=True)
    assert data.kind == "batch_sampler"
    assert [b[0].tolist() for b in data.epoch_iter(0, skip_batches=1)] == [[4, 5, 6, 7], [8, 9]]
    gen = EpochData([1, 2, 3], seed=0, rank=0, world_size=1, train=True)
    assert gen.kind == "iterable" and list(gen.epoch_iter(0, 1)) == [2, 3] and gen.num_batches(0) == 3


def test_eval_loader_shards_without_padding():
    loader = DataLoader(_ds(5), batch_size=2)
    parts = [[x for b in eval_loader(loader, rank=r, world_size=2, pad=False) for x in b[0].tolist()]
             for r in range(2)]
    assert parts == [[0, 2, 4], [1, 3]]
    assert eval_loader(loader, rank=0, world_size=1, pad=False) is loader
