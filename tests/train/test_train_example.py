"""The example in examples/ keeps working: loss goes down, EMA, checkpoints, resume."""

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_pairformer.py"


def test_example_trains_checkpoints_and_resumes(tmp_path):
    spec = importlib.util.spec_from_file_location("train_pairformer_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:
        rows = example.main(["--steps", "12", "--train-size", "48", "--quiet", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rows["final_loss"] < rows["first_loss"]
    assert (tmp_path / "last.ckpt").exists() and Path(rows["best"]).exists()
    from foldops.train.checkpointing import read_checkpoint

    ckpt = read_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["global_step"] == 12 and ckpt["ema"]["num_updates"] == 12
    assert ckpt["hyper_parameters"]["token_z"] == 32
