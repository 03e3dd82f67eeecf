"""Tuning tables of the triangle attention kernels, as plain data: tiles per kernel,
head dim and precision; which loops end with a wgmma wait; the shared-memory budget;
the key-mask row padding; and the constants of the dBias row-split model.

Read by ``launch.py`` at every launch (through this module, so a benchmark may replace
an entry). Tiles were tuned on an H100 (sm_90) in bf16 with a key mask at head dim 32
(``benchmarks/triangle_attention.py --tune``); entries marked "not tuned" follow the
nearest tuned one.
"""

from __future__ import annotations

import torch

HEAD_DIMS = (16, 32, 64, 128)  # tile widths the kernels compile for; other head dims are zero-padded up
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # input dtypes the kernels take

# (kind, head dim, fp32 tiles?) -> (BLOCK_J, BLOCK_K, num_warps, num_stages). "fp32 tiles"
# means fp32 inputs without TF32 (products on the FMA units); fp32 with TF32, and fp32 at
# head dims without an entry here, take the 16-bit tiles clamped by ``launch._config``.
CONFIGS = {
    ("fwd", 16, False): (64, 64, 4, 3),  # as D = 32, not tuned
    ("fwd", 32, False): (64, 64, 4, 3),  # tuned at N = 512, 768, 1024
    ("fwd", 64, False): (128, 64, 4, 3),  # not tuned
    ("fwd", 128, False): (128, 64, 8, 2),  # not tuned
    ("dq", 16, False): (128, 32, 4, 3),  # as D = 32, not tuned
    ("dq", 32, False): (128, 32, 4, 3),  # tuned at N = 512, 768, 1024
    ("dq", 64, False): (64, 64, 4, 3),  # not tuned
    ("dq", 128, False): (64, 64, 4, 2),  # not tuned
    ("dkdv", 16, False): (32, 64, 4, 3),  # as D = 32, not tuned
    ("dkdv", 32, False): (32, 64, 4, 3),  # tuned at N = 512, 768, 1024
    ("dkdv", 64, False): (64, 64, 4, 3),  # not tuned
    ("dkdv", 128, False): (64, 64, 8, 2),  # not tuned
    ("dbias", 16, False): (64, 64, 4, 3),  # as D = 32, not tuned
    ("dbias", 32, False): (64, 64, 4, 3),  # tuned at N = 768, 1024 (N <= 512: below)
    ("dbias", 64, False): (64, 64, 4, 3),  # not tuned
    ("dbias", 128, False): (64, 64, 8, 2),  # not tuned
    ("fwd", 16, True): (64, 32, 2, 2),  # FMA-unit products: two warps per program; not tuned at D = 16
    ("fwd", 32, True): (128, 64, 4, 2),  # beat the 2-warp 64x32 tile at N = 512 and 1024
    ("dq", 16, True): (32, 64, 2, 2),  # as D = 32, not tuned
    ("dq", 32, True): (32, 64, 2, 2),  # two warps per program beat the clamped 16-bit tile
    ("dkdv", 16, True): (32, 64, 2, 2),  # as D = 32, not tuned
    ("dkdv", 32, True): (32, 64, 2, 2),  # two warps per program beat the clamped 16-bit tile
    ("dbias", 16, True): (32, 64, 2, 2),  # as the other backward kinds, not tuned
    ("dbias", 32, True): (64, 128, 4, 2),  # beat 32x64 with 2 warps at N = 1024 (not at 512: below)
}

# Overrides for N <= 512 (fp32 only with its own tiles; symbolic N never takes them).
CONFIGS_SMALL_N = {
    ("dbias", 16, False): (128, 64, 8, 3),  # as D = 32, not tuned
    ("dbias", 32, False): (128, 64, 8, 3),  # larger tile, 8 warps: won up to N = 512, lost above
    ("dbias", 32, True): (32, 64, 2, 2),  # the 64x128 fp32 tile lost at N = 512
}

# Kernels whose loops end with an explicit wgmma wait (``_retire_mma``) on sm_90. Without
# it ptxas serialises every wgmma (warning C7515) of dK/dV always, of dQ with a key mask
# (two loop copies) and of dQ at head dim 64; the forward compiles to fewer registers
# with it (one more program per SM). Check with benchmarks/tools/triangle_attention_sass.py.
MMA_WAIT = {
    "fwd": True,  # fewer registers
    "dq": True,  # serialised without it with a key mask, and at D = 64
    "dkdv": True,  # serialised without it
}
# (kind, key mask?, head dim) left without the wait: never serialised there, and dQ ran
# slower with it.
MMA_WAIT_SKIP = {("dq", False, 16), ("dq", False, 32)}

# (kind, head dim, warps, even N) -> maxnreg of 16-bit launches with a key mask
# (``launch._register_cap``): the residency step of the kernel without its exact-mask
# rerun, which ptxas otherwise lets the kernel pass (sm_90, measured offline with
# benchmarks/tools/triangle_attention_sass.py under Triton 3.6 and 3.9; no spills at the
# caps). Entries not listed stay uncapped: there the rerun left the programs per SM as
# they were (Triton 3.6).
MASKED_MAXNREG = {
    ("fwd", 16, 4, True): 128,  # as D = 32
    ("fwd", 32, 4, True): 128,  # 112 -> 126 uncapped (3.6; 3.9: 118 -> 150): 4 programs per SM
    ("fwd", 16, 4, False): 168,  # as D = 32
    ("fwd", 32, 4, False): 168,  # ragged N: 164 -> 198 uncapped (3 -> 2 programs per SM)
    ("dq", 64, 4, True): 168,  # 165 -> 222 uncapped (3 -> 2); D = 16/32 stay at their step uncapped
    ("dq", 64, 4, False): 168,  # as even N, not measured
    ("dbias", 16, 4, True): 168,  # as D = 32
    ("dbias", 16, 4, False): 168,
    ("dbias", 32, 4, True): 168,  # N > 512 tiles: 168 -> 226 uncapped (3 -> 2); the split model assumes 3
    ("dbias", 32, 4, False): 168,
}

SMEM_BUDGET = 160 * 1024  # bytes of pipelined tiles per program (_smem_bytes); tiles shrink to fit

MASK_ROW_ALIGN = 128  # key-mask bias rows padded to this (>= every BLOCK_K): unmasked tile loads stay inside

# dBias row-split model (``launch._bias_splits``).
# Programs resident per SM by num_warps, as compiled for sm_90 (bf16, D = 32: the 4-warp
# tile holds 168 registers); other warp counts count 2.
DBIAS_PROGRAMS_PER_SM = {4: 3, 8: 1}
MAX_BIAS_SPLITS = 16  # each split adds an fp32 partial [B, H, N, N] to write and sum
# Bytes of q, k, v and dO rows (rows x row_bytes) one split of one head may stream: an
# empirical bound (H100, bf16, D = 32), read as L2 reuse (50 MB) but not profiled. Splits
# within it ran at the per-row rate of N = 1024; beyond it time grew with the bytes, and
# not monotonically. fp32 takes the same rule (twice the bytes per row).
DBIAS_SPLIT_BYTES = 80 * 2**20
