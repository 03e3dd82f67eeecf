"""Tile table of the varlen attention kernels: (BLOCK_M, BLOCK_N, num_warps, num_stages).

BLOCK_M tiles queries, BLOCK_N keys. Keys are ``(kernel, head-dim tile, fp32?)``; the
head-dim tile is the next power of two >= 16 of D. Untuned starting points after the
Triton fused-attention tutorial's Hopper settings; to be tuned on the GPU with
benchmarks/varlen_attention.py.
"""

CONFIGS = {
    # Forward: a 128-query tile amortises each K/V tile over many rows; 64 keys per step.
    ("fwd", 16, False): (128, 64, 4, 3),
    ("fwd", 32, False): (128, 64, 4, 3),
    ("fwd", 64, False): (128, 64, 4, 3),
    ("fwd", 128, False): (128, 64, 8, 2),  # twice the registers per row: 8 warps, 2 stages
    # dK/dV: few keys per program (they accumulate two [BLOCK_N, D] tiles), many query steps.
    ("dkdv", 16, False): (32, 128, 4, 3),
    ("dkdv", 32, False): (32, 128, 4, 3),
    ("dkdv", 64, False): (32, 128, 4, 3),
    ("dkdv", 128, False): (32, 64, 4, 2),  # [64, 128] fp32 accumulators x2 within registers
    # dQ: the mirror image, many query rows, narrow key steps.
    ("dq", 16, False): (128, 32, 4, 3),
    ("dq", 32, False): (128, 32, 4, 3),
    ("dq", 64, False): (128, 32, 4, 3),
    ("dq", 128, False): (64, 32, 4, 2),
    # Delta = rowsum(dO * O): a streaming pass.
    ("delta", 16, False): (64, 0, 4, 1),
    ("delta", 32, False): (64, 0, 4, 1),
    ("delta", 64, False): (64, 0, 4, 1),
    ("delta", 128, False): (32, 0, 4, 1),
}
# fp32 operands take twice the registers and shared memory: tiles halved, 2 stages.
CONFIGS.update({
    (kind, d, True): (max(16, bm // 2), max(16, bn // 2) if bn else 0, warps, min(stages, 2))
    for (kind, d, _), (bm, bn, warps, stages) in list(CONFIGS.items())
})

INTERPRETER = (16, 16, 1, 1)
"""Under the Triton interpreter: small tiles, so multi-block loops run at small sizes."""
