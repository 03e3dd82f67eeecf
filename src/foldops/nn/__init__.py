"""Boltz-2-compatible layers built on ``foldops.ops``.

Constructor arguments, forward signatures and state-dict keys match Boltz-2's, so a
Boltz checkpoint loads with ``load_state_dict(strict=True)``. Every layer also takes
``backend="auto"`` (passed down to its ops) and the factory kwargs ``device=None,
dtype=None``. Submodules load on first use, so one missing or broken layer never
breaks the others.
"""

import importlib

_EXPORTS = {
    "AttentionPairBias": "attention_pair_bias",
    "DropoutColumnwise": "dropout",
    "DropoutRowwise": "dropout",
    "get_dropout_mask": "dropout",
    "InvariantPointAttention": "invariant_point_attention",
    "MultiflowInvariantPointAttention": "invariant_point_attention",
    "Rigid": "rigid",
    "BlockType": "trunk",
    "Trunk": "trunk",
    "MSALayer": "msa",
    "MSAModule": "msa",
    "OuterProductMean": "outer_product_mean",
    "PairWeightedAveraging": "pair_weighted_averaging",
    "PairformerLayer": "pairformer",
    "PairformerModule": "pairformer",
    "PairformerNoSeqLayer": "pairformer",
    "PairformerNoSeqModule": "pairformer",
    "PairformerStack": "pairformer",
    "Transition": "transition",
    "TriangleAttention": "triangle_attention",
    "TriangleAttentionEndingNode": "triangle_attention",
    "TriangleAttentionStartingNode": "triangle_attention",
    "TriangleMultiplicationIncoming": "triangle_multiplication",
    "TriangleMultiplicationOutgoing": "triangle_multiplication",
    "VarlenSelfAttention": "varlen_attention",
}


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"foldops.nn.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'foldops.nn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
