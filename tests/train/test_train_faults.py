"""Faults at the training runtime: damaged or misfit checkpoints, bad losses, logs after a kill.

FAULTS is the table of calls that must be refused: one row per case (the call, the
exception type, a fragment of the message). Sweeps of single-bit damage and the metric
files' agreement with the checkpoints follow it.
"""

import json
import os
import struct
import warnings
import zipfile

import pytest
import torch

from foldops.train import CheckpointError, Trainer, TrainerConfig, UnverifiedCheckpointWarning, atomic_save
from foldops.train.checkpointing import read_checkpoint

from train_helpers import TinyRegressor, make_loader

WEIGHT = 1.5  # float32 bytes 00 00 c0 3f: easy to find in a file


def _config(tmp_path=None, **kw):
    base = dict(device="cpu", max_steps=2, progress_bar=False, loggers=(),
                checkpoint_dir=str(tmp_path) if tmp_path is not None else None)
    base.update(kw)
    return TrainerConfig(**base)


def _trained(tmp_path, model=None):
    torch.manual_seed(0)
    Trainer(_config(tmp_path)).fit(model or TinyRegressor(), make_loader(16, 4))
    return tmp_path / "last.ckpt"


def _flip_weight_bit(path):
    """Flip one bit inside the WEIGHT tensor's bytes; returns the damaged file's path."""
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<f", WEIGHT) * 8) + 16 + 2  # inside the run, in an exponent byte
    data[at] ^= 0x04
    out = path.with_name("flipped-" + path.name)
    out.write_bytes(bytes(data))
    return out


def _payload():
    return {"w": torch.full((64,), WEIGHT), "step": 3, "name": "x"}


def _checksummed(tmp_path, legacy):
    path = tmp_path / ("legacy.ckpt" if legacy else "zip.ckpt")
    atomic_save(_payload(), path, **({"_use_new_zipfile_serialization": False} if legacy else {}))
    return path


def _foreign_zip(tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save(_payload(), path)
    return path


# Calls ------------------------------------------------------------------------------------

def legacy_weight_flip(tmp_path):
    damaged = _flip_weight_bit(_checksummed(tmp_path, legacy=True))
    assert torch.load(damaged, weights_only=True)["w"][4] != WEIGHT  # the flip hit a weight
    return lambda: read_checkpoint(damaged)


def zip_weight_flip(tmp_path):
    damaged = _flip_weight_bit(_checksummed(tmp_path, legacy=False))
    return lambda: read_checkpoint(damaged)


def resume_from_legacy_weight_flip(tmp_path):
    # a Trainer checkpoint re-saved in torch's legacy container (checksum kept), then damaged
    state = read_checkpoint(_trained(tmp_path))
    state["state_dict"]["net.0.bias"] = torch.full_like(state["state_dict"]["net.0.bias"], WEIGHT)
    legacy = tmp_path / "legacy-last.ckpt"
    atomic_save(state, legacy, _use_new_zipfile_serialization=False)
    damaged = _flip_weight_bit(legacy)
    return lambda: Trainer(_config(max_steps=4)).fit(TinyRegressor(), make_loader(16, 4), resume=damaged)


def resume_last_dangling_link(tmp_path):
    os.symlink(tmp_path / "gone.ckpt", tmp_path / "last.ckpt")
    return lambda: Trainer(_config(tmp_path)).fit(TinyRegressor(), make_loader(16, 4), resume="last")


def resume_last_missing_beside_step_files(tmp_path):
    Trainer(_config(tmp_path, checkpoint_every_n_steps=1)).fit(TinyRegressor(), make_loader(16, 4))
    (tmp_path / "last.ckpt").unlink()
    return lambda: Trainer(_config(tmp_path, max_steps=4)).fit(TinyRegressor(), make_loader(16, 4), resume="last")


def zip_compression_method_flip(tmp_path):
    path = _foreign_zip(tmp_path)
    data = bytearray(path.read_bytes())
    data[data.index(b"PK\x01\x02") + 10] ^= 0x40  # first central-directory entry's method: 0 (stored) -> 64
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive, pytest.raises(NotImplementedError):
        archive.testzip()  # what escaped before
    return lambda: read_checkpoint(path)


def zip_multi_disk_locator(tmp_path):
    # A zip64 locator claiming two disks: zipfile.is_zipfile itself raises BadZipFile.
    path = _foreign_zip(tmp_path)
    data = path.read_bytes()
    eocd = data.rindex(b"PK\x05\x06")
    data = data[:eocd] + struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 2) + data[eocd:]
    path.write_bytes(data)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.is_zipfile(path)  # what escaped before
    return lambda: read_checkpoint(path)


class SGDRegressor(TinyRegressor):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class TwoGroups(TinyRegressor):
    def configure_optimizers(self):
        net = self.net
        return torch.optim.AdamW([{"params": net[0].parameters()},
                                  {"params": list(net[3].parameters()) + list(net[5].parameters()), "lr": 1e-3}])


def resume_adam_into_sgd(tmp_path):
    path = _trained(tmp_path)
    return lambda: Trainer(_config(max_steps=4)).fit(SGDRegressor(), make_loader(16, 4), resume=path)


def resume_adam_into_sgd_from_a_file_without_the_class(tmp_path):
    state = read_checkpoint(_trained(tmp_path))
    del state["optimizer_class"]  # as files of format version 1
    older = tmp_path / "v1.ckpt"
    atomic_save(state, older)
    return lambda: Trainer(_config(max_steps=4)).fit(SGDRegressor(), make_loader(16, 4), resume=older)


def resume_other_param_groups(tmp_path):
    path = _trained(tmp_path)
    return lambda: Trainer(_config(max_steps=4)).fit(TwoGroups(), make_loader(16, 4), resume=path)


class DetachedLoss(TinyRegressor):
    def training_step(self, batch, step):
        return super().training_step(batch, step)["loss"].detach()


class IntegerLoss(TinyRegressor):
    def training_step(self, batch, step):
        return torch.tensor(3)


def detached_loss(tmp_path):
    return lambda: Trainer(_config()).fit(DetachedLoss(), make_loader(16, 4))


def integer_loss(tmp_path):
    return lambda: Trainer(_config()).fit(IntegerLoss(), make_loader(16, 4))


# (case, exception, fragment of the message); issue 23's item numbers in the ids.
FAULTS = [
    (legacy_weight_flip, CheckpointError, "fails the CRC-32 checksum"),
    (zip_weight_flip, CheckpointError, "fails the CRC-32 checksum"),
    (resume_from_legacy_weight_flip, CheckpointError, "flipped-legacy-last.ckpt"),
    (resume_last_dangling_link, CheckpointError, "which does not exist"),
    (resume_last_missing_beside_step_files, CheckpointError, "other checkpoint(s) (step=00000001.ckpt"),
    (zip_compression_method_flip, CheckpointError, "truncated or corrupt"),
    (zip_multi_disk_locator, CheckpointError, "truncated or corrupt"),
    (resume_adam_into_sgd, CheckpointError, "optimizer is torch.optim.adamw.AdamW, this run's is torch.optim.sgd.SGD"),
    (resume_adam_into_sgd_from_a_file_without_the_class, CheckpointError, "another optimizer type"),
    (resume_other_param_groups, CheckpointError, "1 parameter group(s) in the checkpoint, 2 here"),
    (detached_loss, ValueError, "attached to the autograd graph"),
    (integer_loss, TypeError, "must be a floating-point tensor"),
]
ITEMS = {"legacy_weight_flip": 6, "zip_weight_flip": 6, "resume_from_legacy_weight_flip": 6,
         "resume_last_dangling_link": 7, "resume_last_missing_beside_step_files": 7,
         "zip_compression_method_flip": 11, "zip_multi_disk_locator": 11, "resume_adam_into_sgd": 12,
         "resume_adam_into_sgd_from_a_file_without_the_class": 12, "resume_other_param_groups": 12,
         "detached_loss": 13, "integer_loss": 13}


@pytest.mark.parametrize("make,error,fragment", FAULTS,
                         ids=[f"item{ITEMS[f.__name__]}-{f.__name__}" for f, _, _ in FAULTS])
def test_fault_is_refused_with_a_clear_error(tmp_path, make, error, fragment):
    call = make(tmp_path)
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


# Sweeps and the cases that load -------------------------------------------------------------

def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


@pytest.mark.parametrize("kind", ["foreign-zip", "foldops-zip", "foldops-legacy"])
def test_single_bit_flips_are_caught_or_harmless(tmp_path, kind):
    """One bit flipped in a byte of the file: a CheckpointError, or the exact original content.

    Every byte of the weight's data is tried, and every third byte elsewhere (headers,
    pickle, zip records, the checksum trailer).
    """
    path = _foreign_zip(tmp_path) if kind == "foreign-zip" else _checksummed(tmp_path, legacy=kind == "foldops-legacy")
    original = bytes(path.read_bytes())
    start = original.index(struct.pack("<f", WEIGHT) * 64)
    weight_bytes = set(range(start, start + 4 * 64))
    damaged = tmp_path / "damaged.ckpt"
    expected = _payload()
    caught = set()
    for i in sorted(weight_bytes | set(range(0, len(original), 3))):
        data = bytearray(original)
        data[i] ^= 1 << (i % 8)
        damaged.write_bytes(bytes(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnverifiedCheckpointWarning)  # a flip in the trailer's magic
                got = read_checkpoint(damaged)
        except CheckpointError:
            caught.add(i)
            continue
        assert _same(got, expected), f"byte {i}: damaged content loaded"
    assert weight_bytes <= caught  # every flip in the data is caught, whatever the container


def test_foreign_legacy_file_loads_with_a_warning_and_checksummed_ones_silently(tmp_path):
    foreign = tmp_path / "foreign-legacy.ckpt"
    torch.save(_payload(), foreign, _use_new_zipfile_serialization=False)
    with pytest.warns(UnverifiedCheckpointWarning, match="could not be verified"):
        assert _same(read_checkpoint(foreign), _payload())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for legacy in (False, True):
            assert _same(read_checkpoint(_checksummed(tmp_path, legacy)), _payload())
        assert _same(read_checkpoint(_foreign_zip(tmp_path)), _payload())  # zip: its CRCs are checked
        assert _same(torch.load(_checksummed(tmp_path, False), weights_only=True), _payload())  # plain torch reads it


def test_resume_last_on_a_first_run_starts_fresh(tmp_path):
    trainer = Trainer(_config(tmp_path / "new"))
    trainer.fit(TinyRegressor(), make_loader(16, 4), resume="last")
    assert trainer.global_step == 2


# Metric files (item 14) ---------------------------------------------------------------------

class ReadsItsLogs(TinyRegressor):
    """Records, at each step, the steps present in metrics.jsonl and the newest checkpoint's step."""

    def __init__(self, directory):
        super().__init__(scheduler=None)
        self.directory = directory
        self.seen = []

    def training_step(self, batch, step):
        path = self.directory / "last.ckpt"
        if path.exists():
            saved = read_checkpoint(path)["global_step"]
            lines = (self.directory / "metrics.jsonl").read_text().splitlines()
            self.seen.append((saved, {json.loads(line)["step"] for line in lines}))
        return super().training_step(batch, step)


def test_metric_files_are_flushed_when_a_checkpoint_is_written(tmp_path):
    model = ReadsItsLogs(tmp_path)
    Trainer(_config(tmp_path, max_steps=6, log_every_n_steps=1, checkpoint_every_n_steps=2,
                    loggers=("jsonl", "csv"))).fit(model, make_loader(64, 4))
    assert model.seen
    for saved, logged in model.seen:
        assert set(range(1, saved + 1)) <= logged  # every row the checkpoint accounts for is on disk


def _rows(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def _csv_steps(directory):
    return [int(float(line.split(",")[0])) for line in (directory / "metrics.csv").read_text().splitlines()[1:]]


def test_resume_drops_rows_written_after_the_checkpoint_and_rewrites_them_once(tmp_path):
    # 16 samples / batch 4 = 4 steps per epoch; a step file at step 4 is written before the
    # epoch's rows (loss_epoch, validation) at the same step. Resuming from that file (as after a
    # kill between the two saves) must not repeat them, and the resumed logs equal a straight run's.
    def config(directory, steps):
        return _config(directory, max_steps=steps, log_every_n_steps=3, checkpoint_every_n_steps=4,
                       loggers=("jsonl", "csv"), seed=1)

    def model():
        torch.manual_seed(0)
        return TinyRegressor(scheduler=None)

    straight = tmp_path / "straight"
    Trainer(config(straight, 8)).fit(model(), make_loader(16, 4), make_loader(8, 4, shuffle=False))
    resumed = tmp_path / "resumed"
    Trainer(config(resumed, 8)).fit(model(), make_loader(16, 4), make_loader(8, 4, shuffle=False))
    Trainer(config(resumed, 8)).fit(model(), make_loader(16, 4), make_loader(8, 4, shuffle=False),
                                    resume=resumed / "step=00000004.ckpt")
    a, b = _rows(straight), _rows(resumed)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]  # the same rows, once each, in order
    drop = {"train/steps_per_s", "train/samples_per_s"}  # wall-clock rates
    for ra, rb in zip(a, b):
        for k in set(ra) - drop:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["step"], k)
    assert _csv_steps(straight) == _csv_steps(resumed)


def test_resume_from_a_file_without_the_optimizer_class_into_the_same_optimizer(tmp_path):
    state = read_checkpoint(_trained(tmp_path))
    del state["optimizer_class"]  # as files of format version 1
    older = tmp_path / "v1.ckpt"
    atomic_save(state, older)
    trainer = Trainer(_config(max_steps=4))
    trainer.fit(TinyRegressor(), make_loader(16, 4), resume=older)
    assert trainer.global_step == 4
