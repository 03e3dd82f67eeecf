"""Reference SwiGLU transition (Boltz-2 ``Transition``): slow, obviously right, fp64-capable.

Shapes (H = hidden, O = output channels; weights in ``nn.Linear`` layout ``[out, in]``):

    x: [..., D]   norm_weight, norm_bias: [D]
    fc1_weight, fc2_weight: [H, D]   fc3_weight: [O, H]   out: [..., O]

    h   = LayerNorm(x)
    out = (silu(h fc1^T) * (h fc2^T)) fc3^T                 (no biases)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_transition(
    x: torch.Tensor,
    *,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc3_weight: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """All in the input dtype (or autocast's). Also the low-precision PyTorch baseline."""
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    return F.linear(F.silu(F.linear(h, fc1_weight)) * F.linear(h, fc2_weight), fc3_weight)
