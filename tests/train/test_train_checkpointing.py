"""Checkpoint files: atomic under kill -9, clear errors for bad files and misfit models, top-k."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from foldops.train import Trainer, TrainerConfig
from foldops.train.checkpointing import (
    CheckpointError,
    CheckpointManager,
    UnsafeCheckpointError,
    atomic_save,
    capture_rng_state,
    check_state_dict,
    read_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
)

from train_helpers import TinyRegressor, make_loader

HERE = Path(__file__).resolve().parent


def _trained_checkpoint(tmp_path, **model_kw):
    torch.manual_seed(0)
    model = TinyRegressor(**model_kw)
    Trainer(TrainerConfig(device="cpu", max_steps=2, checkpoint_dir=str(tmp_path), progress_bar=False)).fit(model, make_loader())
    return tmp_path / "last.ckpt"


def test_kill_minus_9_during_saves_leaves_a_loadable_last(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "kill_driver.py"), str(tmp_path), "10", "1234"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rounds) == 10
    for r in rounds:
        assert r["loads"], r
        assert r["consistent"], r
    # round 0 was killed inside its third save, after the temporary was written:
    first = rounds[0]
    assert first["temporaries"] >= 1 and first["last_step"] == 2
    assert remove_stale_temporaries(tmp_path) >= 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "x.ckpt"
    atomic_save({"a": torch.ones(3)}, path)
    atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(read_checkpoint(path)["a"], torch.zeros(3))
    assert sorted(os.listdir(path.parent)) == ["x.ckpt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flip"])
def test_damaged_checkpoint_gives_a_clear_error(tmp_path, damage):
    path = _trained_checkpoint(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytes(random.Random(0).randrange(256) for _ in range(4096))
    elif damage == "empty":
        data = b""
    else:  # overwrite the middle with zeros (zip central directory intact)
        mid = len(data) // 2
        data = data[:mid - 2000] + bytes(4000) + data[mid + 2000:]
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(data)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(broken)
    trainer = Trainer(TrainerConfig(device="cpu", max_steps=3, progress_bar=False))
    with pytest.raises(CheckpointError, match="broken.ckpt"):
        trainer.fit(TinyRegressor(), make_loader(), resume=broken)


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="resume"):
        Trainer(TrainerConfig(device="cpu", max_steps=1, progress_bar=False)).fit(TinyRegressor(), make_loader(),
                                                                    resume=tmp_path / "nope.ckpt")


def test_resume_into_a_model_of_other_shapes_names_the_keys(tmp_path):
    path = _trained_checkpoint(tmp_path, hidden=16)
    trainer = Trainer(TrainerConfig(device="cpu", max_steps=4, checkpoint_dir=str(tmp_path), progress_bar=False))
    with pytest.raises(CheckpointError) as info:
        trainer.fit(TinyRegressor(hidden=8), make_loader(), resume=path)
    msg = str(info.value)
    assert "net.0.weight: model (8, 6) vs checkpoint last.ckpt (16, 6)" in msg
    assert "net.3.weight" in msg and "different shapes" in msg


def test_resume_from_a_non_foldops_checkpoint_points_to_compat(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": TinyRegressor().state_dict()}, path)
    trainer = Trainer(TrainerConfig(device="cpu", max_steps=1, progress_bar=False))
    with pytest.raises(CheckpointError, match="load_checkpoint"):
        trainer.fit(TinyRegressor(), make_loader(), resume=path)


def test_unsafe_objects_are_refused_by_default(tmp_path):
    path = tmp_path / "unsafe.ckpt"
    import argparse

    torch.save({"hparams": argparse.Namespace(a=1)}, path)
    with pytest.raises(UnsafeCheckpointError, match="trust_checkpoint=True") as info:
        read_checkpoint(path)
    assert "argparse.Namespace" in str(info.value)
    assert read_checkpoint(path, trust_checkpoint=True)["hparams"].a == 1


class _NamespaceOnSave(TinyRegressor):
    """Stores a python object (refused by safe loading) in its checkpoints, as Lightning modules may."""

    def on_save_checkpoint(self, checkpoint):
        import argparse

        checkpoint["args"] = argparse.Namespace(a=1)

    def on_load_checkpoint(self, checkpoint):
        self.loaded_args = checkpoint["args"]


@pytest.mark.parametrize("allow", ["trust_checkpoint", "safe_globals"])
def test_resume_from_an_unsafe_checkpoint_is_refused_and_the_message_says_how_to_allow_it(tmp_path, allow):
    import argparse

    common = dict(device="cpu", checkpoint_dir=str(tmp_path), progress_bar=False, loggers=())
    torch.manual_seed(0)
    Trainer(TrainerConfig(max_steps=1, **common)).fit(_NamespaceOnSave(), make_loader())
    with pytest.raises(UnsafeCheckpointError) as info:
        Trainer(TrainerConfig(max_steps=2, **common)).fit(_NamespaceOnSave(), make_loader(), resume="last")
    message = str(info.value)
    assert "argparse.Namespace" in message and "trust_checkpoint=True" in message and "safe_globals=" in message
    # What the message says works where it is raised: fit() takes both.
    model = _NamespaceOnSave()
    trainer = Trainer(TrainerConfig(max_steps=2, **common))
    kwargs = {"trust_checkpoint": True} if allow == "trust_checkpoint" else {"safe_globals": [argparse.Namespace]}
    trainer.fit(model, make_loader(), resume="last", **kwargs)
    assert trainer.global_step == 2 and model.loaded_args.a == 1
    with pytest.raises(TypeError, match="trust_checkpoint"):
        trainer.fit(model, make_loader(), trust_checkpoint="yes")


def test_check_state_dict_names_missing_and_unexpected():
    model = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: b.*unexpected key\(s\) in the checkpoint: c"):
        check_state_dict(model, {"a": torch.zeros(2), "c": torch.zeros(1)})
    missing, unexpected = check_state_dict(model, {"a": torch.zeros(2), "c": torch.zeros(1)}, strict=False)
    assert missing == ["b"] and unexpected == ["c"]
    with pytest.raises(CheckpointError, match="different shapes"):
        check_state_dict(model, {"a": torch.zeros(5), "b": torch.zeros(3)}, strict=False)


def test_rng_state_roundtrip():
    state = capture_rng_state(torch.device("cpu"))
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(state, torch.device("cpu"))
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _save(manager, step, score):
    return manager.save(lambda ms: {"step": step, "checkpoints": ms}, step=step, score=score)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_top_k_keeps_the_best(tmp_path, mode):
    manager = CheckpointManager(tmp_path, save_top_k=2, monitor="val/loss", mode=mode)
    scores = {1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5, 5: float("nan")}
    for step, score in scores.items():
        _save(manager, step, score)
    best = sorted(((s, k) for k, s in scores.items() if s == s), reverse=mode == "max")[:2]
    assert [b["step"] for b in manager.best] == [k for _, k in best]
    files = sorted(p.name for p in tmp_path.glob("best-*.ckpt"))
    assert len(files) == 2 and all(f"step={k:08d}" in " ".join(files) for _, k in best)
    assert manager.best_path.exists()
    # the saved state carries the bookkeeping, and last is the newest
    last = read_checkpoint(manager.last_path)
    assert last["step"] == 5 and [b["step"] for b in last["checkpoints"]["best"]] == [k for _, k in best]
    again = CheckpointManager(tmp_path, save_top_k=2, monitor="val/loss", mode=mode)
    again.load_state_dict(last["checkpoints"])
    assert again.best == manager.best


def test_top_k_all_and_none_and_step_retention(tmp_path):
    keep_all = CheckpointManager(tmp_path / "all", save_top_k=-1, monitor="m")
    for step in range(1, 4):
        _save(keep_all, step, float(step))
    assert len(list((tmp_path / "all").glob("best-*.ckpt"))) == 3
    none = CheckpointManager(tmp_path / "none", save_top_k=0, monitor="m")
    _save(none, 1, 1.0)
    assert not list((tmp_path / "none").glob("best-*.ckpt"))
    steps = CheckpointManager(tmp_path / "steps", keep_step=2)
    for step in range(1, 5):
        steps.save(lambda ms: {"s": step}, step=step, step_file=True)
    names = sorted(p.name for p in (tmp_path / "steps").glob("step=*.ckpt"))
    assert names == ["step=00000003.ckpt", "step=00000004.ckpt"]
    assert read_checkpoint(tmp_path / "steps" / "last.ckpt")["s"] == 4


def test_former_module_name_is_the_same_module():
    import foldops.train.checkpoint as former
    import foldops.train.checkpointing as current

    assert former is current and former.read_checkpoint is read_checkpoint
