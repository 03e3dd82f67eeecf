"""examples/train_sedd.py at a tiny size: trains on mixed lengths, checkpoints, resumes, samples."""

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_sedd.py"


def test_sedd_example_trains_resumes_and_samples(tmp_path):
    spec = importlib.util.spec_from_file_location("train_sedd_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:
        rows = example.main(["--steps", "16", "--train-size", "64", "--max-len", "16", "--hidden", "32",
                             "--blocks", "1", "--sample-steps", "4", "--quiet", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rows["final_val"] < rows["first_val"]
    assert (tmp_path / "last.ckpt").exists() and Path(rows["best"]).exists()
    from foldops.train.checkpoint import read_checkpoint

    ckpt = read_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["global_step"] == 16 and ckpt["ema"]["num_updates"] == 16
    assert [len(s) for s in rows["samples"]] == [4, 8, 12, 16]
    assert all(set(s) <= set(example.AMINO) for s in rows["samples"])  # no mask token left
