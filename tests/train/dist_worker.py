"""One rank of the multi-process trainer tests; started as torchrun would (env vars).

    python dist_worker.py OUT_DIR RESUME_DIR

Runs, in one process group: (1) DDP training from scratch with accumulation, counting
gradient all-reduces; (2) DDP resume of a one-process checkpoint; (3) FSDP2 training with
EMA; (4) FSDP2 resume of its own checkpoint.
Rank 0 writes the resulting parameters under OUT_DIR.
"""

import os
import sys

import torch
import torch.distributed as dist

from foldops.train import Trainer, TrainerConfig
from train_helpers import TinyRegressor, make_loader

out_dir, resume_dir = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
common = dict(device="cpu", seed=3, progress_bar=False, dist_timeout_s=60.0, accumulate_grad_batches=2, loggers=())


def model():
    torch.manual_seed(0)
    return TinyRegressor(dtype=torch.float64, scheduler="step")


# (1) DDP from scratch: 32 samples, 4 per rank and batch (the 1-process reference uses 8).
ddp_model = model()
trainer = Trainer(TrainerConfig(max_steps=6, **common))
trainer._setup_runtime()
trainer._attach(ddp_model)
calls = []


def counting_hook(state, bucket):
    calls.append(bucket.index())
    fut = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


trainer._engine.register_comm_hook(None, counting_hook)
trainer.fit(ddp_model, make_loader(32, 4, dtype=torch.float64))
if rank == 0:
    torch.save({"params": ddp_model.state_dict(), "allreduce_calls": len(calls), "steps": trainer.global_step,
                "strategy": trainer._strategy, "world_size": trainer.world_size},
               os.path.join(out_dir, "ddp.pt"))

# (2) resume a one-process checkpoint (batch 8, step 2 of 5, mid-epoch) with two processes.
resumed = model()
for p in resumed.parameters():
    p.data.zero_()
t2 = Trainer(TrainerConfig(max_steps=5, checkpoint_dir=resume_dir, **common))
t2.fit(resumed, make_loader(48, 4, dtype=torch.float64), resume="last")
if rank == 0:
    torch.save({"params": resumed.state_dict(), "steps": t2.global_step}, os.path.join(out_dir, "resumed.pt"))

# (3) FSDP2, each Linear sharded, with EMA: 32 samples, 4 per rank and batch; then (4) resume
# its own checkpoint for 2 more steps.
fsdp_kw = dict(strategy="fsdp", fsdp_blocks=("Linear",), ema_decay=0.9,
               checkpoint_dir=os.path.join(out_dir, "fsdp"), **common)
fsdp_model = model()
t3 = Trainer(TrainerConfig(max_steps=4, **fsdp_kw))
t3.fit(fsdp_model, make_loader(32, 4, dtype=torch.float64))
full, ema = t3._model_state(), t3.ema.export()  # collectives
if rank == 0:
    torch.save({"params": full, "ema": ema, "steps": t3.global_step}, os.path.join(out_dir, "fsdp.pt"))
fsdp_resumed = model()
t4 = Trainer(TrainerConfig(max_steps=6, **fsdp_kw))
t4.fit(fsdp_resumed, make_loader(32, 4, dtype=torch.float64), resume="last")
full, ema = t4._model_state(), t4.ema.export()
if rank == 0:
    torch.save({"params": full, "ema": ema, "steps": t4.global_step}, os.path.join(out_dir, "fsdp_resumed.pt"))

dist.barrier()
dist.destroy_process_group()
