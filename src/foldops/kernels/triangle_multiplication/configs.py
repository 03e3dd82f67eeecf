"""Tile tables of the triangle multiplication kernels (plain data).

Row kernels (prologue, epilogue, both backward kernels) hold ``BLOCK_P`` positions with
all ``CP`` padded channels in registers: ``BLOCK_P * CP`` is kept near 8K fp32 values
per program so that a tile costs about 64 registers a thread at 4 warps (128 at 8).
"""

# CP (channels padded) -> (BLOCK_P, BLOCK_N, num_warps) of the epilogue.
ROW_FWD = {
    16: (128, 16, 4),   # tiny widths (tests): many positions per program
    32: (128, 32, 4),
    64: (128, 64, 4),
    128: (64, 64, 4),   # Boltz's C = 128: 64 x 128 fp32 input tile, 64-wide output slab
    256: (32, 64, 4),   # halve the positions as the row doubles
    512: (16, 64, 4),
}

# CP -> (BLOCK_P, BLOCK_N, num_warps, ALL_SLABS) of the prologue. ALL_SLABS: one program
# normalises its positions once and writes every output slab (weights read once per
# BLOCK_P positions); else one program per slab (more, shorter programs; h recomputed).
PROLOGUE = {
    16: (128, 16, 4, False),
    32: (128, 32, 4, False),
    64: (128, 64, 4, False),
    128: (64, 64, 4, True),  # H200, bf16 fwd: 0.467 vs 0.520 ms (N = 512), 1.84 vs 2.21 (1024) one program per slab
    256: (32, 64, 4, False),
    # C = 384 (GPU MODE), H100 bf16 fwd at N = 512 / 1024: 1.55 / 6.17 ms against 5.56 / 22.0
    # for (16, 64, 4, False): 16-row dots and a 64 KiB weight tile re-read per 16 positions
    512: (64, 64, 8, True),
}

# PROLOGUE for fp32 inputs, but at CP = 512: there the four fp32
# C = 384 GPU tests failed on an H100 with (64, 64, 8, True) (error not captured), and
# passed with the 16-position tile kept here.
PROLOGUE_FP32 = {**PROLOGUE, 512: (16, 64, 4, False)}

# CP -> (BLOCK_P, BLOCK_N, num_warps) of the backward row kernels, which also keep an
# fp32 [BLOCK_P, CP] accumulator (du or dh) beside the normalised row.
ROW_BWD = {
    16: (64, 16, 4),
    32: (64, 32, 4),
    64: (64, 32, 4),
    128: (64, 32, 8),   # two [64, 128] fp32 tiles over 8 warps
    256: (32, 32, 8),
    512: (16, 32, 8),
}

# fp32 weights: at most this many elements per [CP, BLOCK_N] weight tile (two such tiles,
# p and g, sit in shared memory at once: 2 x 64 KiB at fp32).
FP32_MAX_WEIGHT_TILE = 16384
# The backward row kernels stage more per step (p, g and g_out tiles and their transposed
# copies): at CP = 512 the 16384-element tile needed 298 KiB of shared memory in the
# input-side kernel (sm_90 compile), over the 227 KiB a block may have; 8192 needs 164 KiB.
FP32_MAX_WEIGHT_TILE_BWD = 8192

# Per-channel product (batched GEMM, fp32 accumulation):
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).
PRODUCT_16BIT = (128, 128, 64, 8, 8, 3)   # tensor-core tile for bf16/fp16 operands
PRODUCT_SPLIT = (128, 128, 32, 8, 8, 3)   # A as 16-bit hi + lo tiles: three operand tiles a stage, shorter K step
PRODUCT_FP32 = (64, 64, 32, 8, 4, 3)      # fp32 (IEEE or TF32x3) operands

# Under the Triton interpreter (CPU tests): few, large programs run fastest.
INTERPRET_ROW = (32, 16, 1)
INTERPRET_PROLOGUE = (32, 16, 1, True)
INTERPRET_PRODUCT = (32, 32, 32, 4, 1, 1)
