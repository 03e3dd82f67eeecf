"""Record every launch of the triangle attention launchers (kernel, grid, argument
shapes/dtypes/strides, scalars, constexprs) for a sweep of sizes, on CPU, as JSON.

The launches are recorded, not run (GPU tile configs, 132 SMs, sm_90 switches). Two
runs, before and after a change to the host path, print the same JSON exactly when the
change leaves every launch (hence every compiled kernel) as it was:

    PYTHONPATH=src python benchmarks/triangle_attention_launches.py > after.json
"""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
from foldops.kernels.triangle_attention import configs, dbias_splits, launch
launch._interpreting = lambda: False
dbias_splits.num_sms = lambda device: 132
launch._mma_wait = lambda kind, t, has_mask, d: bool(configs.MMA_WAIT[kind] and (kind, has_mask, d) not in configs.MMA_WAIT_SKIP)
rec = []
class R:
    def __init__(self, fn): self.name = fn.__name__
    def __getitem__(self, grid):
        def run(*args, **kw):
            rec.append([self.name, [int(g) for g in grid],
                        [("T", tuple(a.shape), str(a.dtype), tuple(a.stride())) if isinstance(a, torch.Tensor) else repr(a) for a in args],
                        sorted((k, repr(v)) for k, v in kw.items())])
        return run
launch.wrap_triton = R
for n in (17, 64, 128, 200, 384, 1024):
    for dtype in (torch.bfloat16, torch.float32):
        for mask in (False, True):
            for rows in (3, 40):
                q, k, v = (torch.randn(1, rows, n, 4, 32, dtype=dtype) for _ in range(3))
                bias = torch.randn(1, 4, n, n, dtype=dtype)
                keep = torch.ones(1, rows, n, dtype=torch.bool) if mask else None
                out, lse = launch.triangle_attention_forward(q, k, v, bias, keep, 0.2)
                launch.triangle_attention_backward(torch.randn_like(out), q, k, v, bias, keep, out, lse, 0.2)
print(json.dumps(rec))
