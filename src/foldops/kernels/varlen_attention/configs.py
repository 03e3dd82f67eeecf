"""Tile table of the varlen attention kernels: (BLOCK_M, BLOCK_N, num_warps, num_stages).

BLOCK_M tiles queries, BLOCK_N keys. Keys are ``(kernel, head-dim tile, fp32?)``; the
head-dim tile is the next power of two >= 16 of D. Starting points after the Triton
fused-attention tutorial's Hopper settings, adjusted to compile without register spills
for sm_90 (bf16/fp16; fp32 tiles are the halved 16-bit ones and still spill); not yet
timed: to be tuned on the GPU with benchmarks/varlen_attention.py.
"""

CONFIGS = {
    # Forward: a 128-query tile amortises each K/V tile over many rows; 64 keys per step.
    ("fwd", 16, False): (128, 64, 4, 3),
    ("fwd", 32, False): (128, 64, 4, 3),
    ("fwd", 64, False): (128, 64, 4, 3),
    ("fwd", 128, False): (128, 64, 8, 2),  # twice the registers per row: 8 warps, 2 stages
    # dK/dV: a key tile with its fp32 dK, dV accumulators per program, narrow query steps.
    # Chosen spill-free by offline compiles for sm_90 (benchmarks/varlen_attention_sass.py,
    # causal): at D = 64, 32x128 with 4 warps spilled 504 bytes, with 8 warps none (242
    # registers); at D = 128, 32x64 with 4 warps spilled 576 bytes, 16x64 with 8 none.
    # One stage: with pipelined loads Triton 3.6 lets the loop's last register-operand
    # wgmma (dV += P^T dO, dK += dS Q) run into the next step, whose loads reuse its
    # registers (triton-lang/triton#9433; benchmarks/tools/compile_offline.py flagged every
    # 16-bit variant "wgmma-rs-race" at 2-3 stages, none at 1).
    ("dkdv", 16, False): (32, 128, 8, 1),
    ("dkdv", 32, False): (32, 128, 8, 1),
    ("dkdv", 64, False): (32, 128, 8, 1),
    ("dkdv", 128, False): (16, 64, 8, 1),
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

DROPOUT_MIN_WARPS = 8
"""With dropout the Philox draws add registers: the forward at D = 64 spilled 944 bytes with
4 warps and none with 8 (174 registers); dQ 64 bytes with 4, none with 8 (offline, sm_90)."""

INTERPRETER = (16, 16, 1, 1)
"""Under the Triton interpreter: small tiles, so multi-block loops run at small sizes."""
