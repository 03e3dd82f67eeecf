"""Kill -9 checkpoint savers at random moments; report whether ``last`` always loads.

    python kill_driver.py DIR KILLS SEED

Each round forks a child that saves checkpoints in a loop through CheckpointManager (a
step file, ``last``, top-k) and kills it with SIGKILL at a random moment. Round 0 is
deterministic: the child's fsync blocks during its third save, so the kill lands after
the temporary file is written and before the rename. Prints one JSON line per round.
"""

import json
import os
import random
import signal
import sys
import time

import torch

from foldops.train.checkpointing import CheckpointManager, read_checkpoint

directory, kills, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
payload = 1 << 20  # 4 MiB of fp32 per save: writing takes a while, so kills land inside saves


def child(write_fd: int, block_on: int, start: int) -> None:
    manager = CheckpointManager(directory, save_top_k=2, monitor="val/loss", mode="min", keep_step=2)
    step = start
    while True:
        step += 1
        if step == block_on:
            os.fsync = lambda fd: time.sleep(3600)  # the kill arrives during this save
        os.write(write_fd, f"{step}\n".encode())
        manager.save(lambda ms: {"step": step, "w": torch.full((payload,), float(step)), "checkpoints": ms},
                     step=step, step_file=True, score=float(step % 5))


start = 0
for round_ in range(kills):
    r, w = os.pipe()
    block_on = start + 3 if round_ == 0 else -1
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            child(w, block_on, start)
        finally:
            os._exit(1)
    os.close(w)
    reader = os.fdopen(r)
    announced, lines = start, 0
    wanted = 3 if round_ == 0 else rng.randint(1, 4)
    while lines < wanted:
        line = reader.readline()
        if not line:
            break
        announced, lines = int(line), lines + 1
    if round_ == 0:
        time.sleep(0.5)  # the child is now blocked in fsync, inside the save
    else:
        time.sleep(rng.uniform(0.0, 0.05))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    reader.close()
    temporaries = [p for p in os.listdir(directory) if p.endswith(".tmp")]
    result = {"round": round_, "announced": announced, "temporaries": len(temporaries)}
    try:
        ckpt = read_checkpoint(os.path.join(directory, "last.ckpt"))
        w_ = ckpt["w"]
        result["last_step"] = ckpt["step"]
        result["consistent"] = bool((w_ == float(ckpt["step"])).all()) and w_.numel() == payload
        result["loads"] = True
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result["loads"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result), flush=True)
    start = max(start, announced) + 10
