"""FusedDense and FusedMLP with flash_attn.ops.fused_dense's API, in plain PyTorch.

Same constructor arguments, attribute and state-dict names (``weight``/``bias`` for
FusedDense, ``fc1``/``fc2`` for FusedMLP), activations (``gelu_approx`` = tanh GELU,
``relu``, ``sqrelu`` = relu squared) and ``return_residual`` convention (``(out, x)``).
``checkpoint_lvl`` keeps its meaning (1: recompute the activation in backward, 2: recompute
fc1 and the activation); ``heuristic`` only chose a cuBLASLt algorithm and is accepted and
ignored. Tensor parallelism (``process_group``) is not supported. On any device the
matmuls are PyTorch's (cuBLAS on NVIDIA; flash_attn itself turns its fused GEMM+GELU off
on H100, where it measured it slower); under ``torch.compile`` the bias and activation
fuse into one pointwise kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["FusedDense", "FusedMLP", "fused_dense_func", "fused_mlp_func"]

ACTIVATIONS = ("gelu_approx", "relu", "sqrelu")


def _no_process_group(process_group) -> None:
    if process_group is not None:
        raise ValueError("process_group: tensor-parallel FusedDense/FusedMLP is not supported by foldops; "
                         "pass process_group=None")


def _activation(pre_act: Tensor, activation: str) -> Tensor:
    if activation == "gelu_approx":
        return F.gelu(pre_act, approximate="tanh")
    if activation == "relu":
        return F.relu(pre_act)
    r = F.relu(pre_act)
    return r * r


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def fused_dense_func(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, return_residual: bool = False,
                     process_group=None, sequence_parallel: bool = True):
    """``x @ weight.T + bias``; with ``return_residual`` also ``x``: ``(out, x)``."""
    _no_process_group(process_group)
    out = F.linear(x, weight, bias)
    return out if not return_residual else (out, x)


def _mlp_hidden(x, weight1, bias1, activation):
    return _activation(F.linear(x, weight1, bias1), activation)


def fused_mlp_func(x: Tensor, weight1: Tensor, weight2: Tensor, bias1: Optional[Tensor] = None,
                   bias2: Optional[Tensor] = None, activation: str = "gelu_approx", save_pre_act: bool = True,
                   return_residual: bool = False, checkpoint_lvl: int = 0, heuristic: int = 0,
                   process_group=None, sequence_parallel: bool = True):
    """``fc2(act(fc1(x)))``; with ``return_residual`` returns ``(out, x)``."""
    _check_activation(activation)
    _no_process_group(process_group)
    if checkpoint_lvl not in (0, 1, 2):
        raise ValueError(f"checkpoint_lvl: expected 0, 1 or 2, got {checkpoint_lvl!r}")
    recompute = checkpoint_lvl > 0 and torch.is_grad_enabled() and (
        x.requires_grad or weight1.requires_grad or (bias1 is not None and bias1.requires_grad))
    if not recompute:
        hidden = _mlp_hidden(x, weight1, bias1, activation)
    elif checkpoint_lvl == 1:  # keep the pre-activation, recompute the activation
        hidden = checkpoint(_activation, F.linear(x, weight1, bias1), activation, use_reentrant=False)
    else:  # recompute fc1 and the activation
        hidden = checkpoint(_mlp_hidden, x, weight1, bias1, activation, use_reentrant=False)
    out = F.linear(hidden, weight2, bias2)
    return out if not return_residual else (out, x)


class FusedDense(nn.Linear):
    """``nn.Linear`` with flash_attn's ``return_residual`` (``forward`` returns ``(out, x)``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, return_residual: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.return_residual = return_residual

    def forward(self, x: Tensor, process_group=None):
        return fused_dense_func(x, self.weight, self.bias, return_residual=self.return_residual,
                                process_group=process_group)


class FusedMLP(nn.Module):
    """fc1 -> activation -> fc2, as flash_attn's FusedMLP (state-dict keys ``fc1.*``, ``fc2.*``).

    Args (as flash_attn): ``in_features``, ``hidden_features=4*in``, ``out_features=in``,
    ``bias1``, ``bias2``, ``activation`` ("gelu_approx" | "relu" | "sqrelu"),
    ``return_residual``, ``checkpoint_lvl`` (0 | 1 | 2), ``heuristic`` (ignored),
    ``device``, ``dtype``.
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 bias1: bool = True, bias2: bool = True, activation: str = "gelu_approx",
                 return_residual: bool = False, checkpoint_lvl: int = 0, heuristic="auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_activation(activation)
        if checkpoint_lvl not in (0, 1, 2):
            raise ValueError(f"checkpoint_lvl: expected 0, 1 or 2, got {checkpoint_lvl!r}")
        factory_kwargs = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features * 4
        self.activation = activation
        self.return_residual = return_residual
        self.checkpoint_lvl = checkpoint_lvl
        self.heuristic = heuristic if activation != "sqrelu" else -1
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1, **factory_kwargs)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory_kwargs)

    def forward(self, x: Tensor, process_group=None):
        return fused_mlp_func(x, self.fc1.weight, self.fc2.weight, self.fc1.bias, self.fc2.bias,
                              activation=self.activation, save_pre_act=self.training,
                              return_residual=self.return_residual,
                              checkpoint_lvl=self.checkpoint_lvl if self.training else 0,
                              process_group=process_group)
