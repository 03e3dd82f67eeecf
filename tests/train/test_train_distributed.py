"""Two processes with gloo on 127.0.0.1 give what one process gives with the doubled batch."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from foldops.train import Trainer, TrainerConfig

from train_helpers import TinyRegressor, make_loader

HERE = Path(__file__).resolve().parent
COMMON = dict(device="cpu", seed=3, progress_bar=False, accumulate_grad_batches=2, loggers=())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return TinyRegressor(dtype=torch.float64, scheduler="step")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_out")
    resume_dir = tmp_path_factory.mktemp("dist_resume")
    # The one-process checkpoint that two processes resume: batch 8, step 2 of an epoch of 3.
    Trainer(TrainerConfig(max_steps=2, checkpoint_dir=str(resume_dir), **COMMON)).fit(
        _model(), make_loader(48, 8, dtype=torch.float64))
    port = _free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    procs, log_paths = [], []
    for rank in range(2):
        log_paths.append(out / f"rank{rank}.log")
        with open(log_paths[-1], "w") as log_file:  # files, not pipes: a full pipe would block a rank
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "dist_worker.py"), str(out), str(resume_dir)],
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), cwd=str(HERE),
                stdout=log_file, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 150
    try:
        # A rank that fails leaves the other waiting in a collective: stop it at once.
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, path in zip(procs, log_paths):
        p.wait()
        assert p.returncode == 0, path.read_text()[-4000:]
    return out


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-12), (k, (a[k] - b[k]).abs().max())


def test_ddp_two_processes_match_one_with_doubled_batch(two_process_run):
    got = torch.load(two_process_run / "ddp.pt", weights_only=True)
    assert got["world_size"] == 2 and got["strategy"] == "ddp" and got["steps"] == 6
    reference = _model()
    Trainer(TrainerConfig(max_steps=6, **COMMON)).fit(reference, make_loader(32, 8, dtype=torch.float64))
    _assert_close(got["params"], reference.state_dict())


def test_ddp_syncs_gradients_only_on_the_last_micro_batch(two_process_run):
    got = torch.load(two_process_run / "ddp.pt", weights_only=True)
    # one bucket (a tiny model) per optimizer step: 6 steps, 2 micro-batches each
    assert got["allreduce_calls"] == 6


def test_one_process_checkpoint_resumes_with_two(two_process_run):
    got = torch.load(two_process_run / "resumed.pt", weights_only=True)
    assert got["steps"] == 5
    reference = _model()
    Trainer(TrainerConfig(max_steps=5, **COMMON)).fit(reference, make_loader(48, 8, dtype=torch.float64))
    _assert_close(got["params"], reference.state_dict())


@pytest.mark.parametrize("name,steps", [("fsdp", 4), ("fsdp_resumed", 6)])
def test_fsdp2_two_processes_match_one_with_doubled_batch(two_process_run, name, steps):
    got = torch.load(two_process_run / f"{name}.pt", weights_only=True)
    assert got["steps"] == steps
    reference = _model()
    trainer = Trainer(TrainerConfig(max_steps=steps, ema_decay=0.9, **COMMON))
    trainer.fit(reference, make_loader(32, 8, dtype=torch.float64))
    _assert_close(got["params"], reference.state_dict())
    _assert_close(got["ema"], trainer.ema.export())


def test_fsdp2_checkpoint_loads_into_a_plain_model(two_process_run):
    got = torch.load(two_process_run / "fsdp_resumed.pt", weights_only=True)
    from foldops.compat import load_checkpoint

    plain = _model()
    load_checkpoint(two_process_run / "fsdp" / "last.ckpt", plain)
    _assert_close(plain.state_dict(), got["params"])
