"""Weight initialisers of the AlphaFold/Boltz family, written for any device.

They reproduce the distributions Boltz-2 uses (so training from scratch starts where
Boltz starts), not its random streams: Boltz draws some of them with scipy on the host.
"""

from __future__ import annotations

import math

import torch

# Standard deviation of a unit normal truncated to [-2, 2].
_TRUNCNORM_STD_2 = 0.87962566103423978


@torch.no_grad()
def lecun_normal_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Truncated normal (+-2 sigma) with variance ``scale / fan_in`` (weight [out, in])."""
    fan_in = max(1, weight.shape[1])
    std = math.sqrt(scale / fan_in) / _TRUNCNORM_STD_2
    return torch.nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def he_normal_(weight: torch.Tensor) -> torch.Tensor:
    return lecun_normal_(weight, scale=2.0)


def glorot_uniform_(weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.init.xavier_uniform_(weight, gain=1.0)


def normal_(weight: torch.Tensor) -> torch.Tensor:
    """Normal with std ``1/sqrt(fan_in)`` (kaiming, linear)."""
    return torch.nn.init.kaiming_normal_(weight, nonlinearity="linear")


@torch.no_grad()
def zeros_(weight: torch.Tensor) -> torch.Tensor:
    """"final" and "gating" weights: the layer starts as zero / sigmoid(0) = 0.5."""
    return weight.zero_()


@torch.no_grad()
def ones_(weight: torch.Tensor) -> torch.Tensor:
    return weight.fill_(1.0)
