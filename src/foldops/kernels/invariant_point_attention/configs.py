"""Tile sizes of the invariant point attention kernels, as plain data.

Row kernels (forward, backward per query row) hold [HP, BLOCK_N, W] fp32 tiles, HP the
heads padded to a power of two >= 16 (the pair output is a tensor-core product with
the heads as its M side) and W the widest per-head operand (scalar channels, key
points + 1, value points x 3), padded to a power of two. BLOCK_N is chosen so that one
such tile stays near ROW_TILE_ELEMENTS; it is at least 16 (tl.dot's smallest K).
"""

ROW_TILE_ELEMENTS = 8192
"""Elements of the largest [HP, BLOCK_N, W] tile: 64 fp32 registers a thread at 4 warps."""

ROW_MIN_BLOCK_N = 16
"""tl.dot needs K >= 16 (the pair output sums p[HP, BLOCK_N] @ z[BLOCK_N, Cz])."""

ROW_MAX_BLOCK_N = 64
"""Beyond 64 keys a tile the online-softmax rescale is already amortised."""

ROW_WARPS = 4
"""Four warps: the [HP, BLOCK_N] logits tile of 16 x 32 is 4 elements a thread."""

COLUMN_TILES = {"block_j": 32, "block_i": 32, "warps": 4}
"""dk/dv kernel: 32 keys a program, 32 queries a step: tensor-core products of
[32, C] x [C, 32]; small enough for the interpreter, a starting point on the GPU."""

INTERPRETER_BLOCK = 16
"""Under TRITON_INTERPRET the smallest legal tiles run fastest."""
