"""SwiGLU transition (Boltz-2 ``Transition``): LayerNorm, then ``fc3(silu(fc1(x)) * fc2(x))``.

Same constructor arguments, forward signature and state-dict keys as Boltz-2's
``Transition`` (``norm``, ``fc1``, ``fc2``, ``fc3``; no biases) and the same
initialisation scheme, so a Boltz checkpoint loads with ``strict=True``. The math is
``foldops.ops.swiglu_transition``: at inference its ``torch`` backend processes
positions in chunks, so the ``[..., hidden]`` activations never exist whole.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from foldops._checks import check_layer_input, check_positive_int, check_tensor
from foldops.backends import AUTO, check_module_backend, for_op
from foldops.nn import _init
from foldops.ops.transition import OP, swiglu_transition


class Transition(nn.Module):
    """Two-layer SwiGLU MLP with a pre-LayerNorm.

    Args:
        dim: input channels D (Boltz default 128).
        hidden: hidden channels H (Boltz default 512).
        out_dim: output channels O (default: ``dim``).
        backend: backend of ``foldops.ops.swiglu_transition`` (``"auto"``, ``"torch"``,
            ``"reference"``).
        chunk_size: positions per step at inference (None: memory-bounded default).
        device, dtype: factory kwargs for the parameters.

    Shapes: ``x`` ``[..., D]`` -> ``[..., O]``.
    """

    def __init__(
        self,
        dim: int = 128,
        hidden: int = 512,
        out_dim: Optional[int] = None,
        *,
        backend: str = AUTO,
        chunk_size: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if out_dim is None:
            out_dim = dim
        for name, value in (("dim", dim), ("hidden", hidden), ("out_dim", out_dim)):
            check_positive_int(name, value, allow_none=False)
        check_positive_int("chunk_size", chunk_size)
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.hidden = hidden
        self.out_dim = out_dim
        self.backend = check_module_backend(backend)
        self.chunk_size = chunk_size
        self.norm = nn.LayerNorm(dim, eps=1e-5, **factory)
        self.fc1 = nn.Linear(dim, hidden, bias=False, **factory)
        self.fc2 = nn.Linear(dim, hidden, bias=False, **factory)
        self.fc3 = nn.Linear(hidden, out_dim, bias=False, **factory)
        self.silu = nn.SiLU()  # parameter-free; kept so Boltz-style attribute access works
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Boltz's scheme: LayerNorm at identity, LeCun-normal fc1/fc2, zero fc3."""
        _init.ones_(self.norm.weight)
        _init.zeros_(self.norm.bias)
        _init.lecun_normal_(self.fc1.weight)
        _init.lecun_normal_(self.fc2.weight)
        _init.zeros_(self.fc3.weight)

    def forward(self, x: Tensor, chunk_size: Optional[int] = None) -> Tensor:
        """Args:
            x: ``[..., D]``.
            chunk_size: Boltz's inference knob (hidden channels per step there).
                Accepted for compatibility and validated, otherwise ignored: the
                ``torch`` backend already bounds inference memory by processing
                positions in chunks (the constructor's ``chunk_size``), which keeps
                the hidden temporaries smaller than hidden-channel chunking would.

        Returns:
            ``[..., O]`` in x's dtype (autocast's dtype under autocast).
        """
        check_positive_int("chunk_size", chunk_size)
        check_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (..., {self.dim}), got {tuple(x.shape)}")
        check_layer_input("x", x, self.norm.weight)
        return swiglu_transition(
            x,
            norm_weight=self.norm.weight,
            norm_bias=self.norm.bias,
            fc1_weight=self.fc1.weight,
            fc2_weight=self.fc2.weight,
            fc3_weight=self.fc3.weight,
            eps=self.norm.eps,
            chunk_size=self.chunk_size,
            backend=for_op(OP, self.backend),
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, out_dim={self.out_dim}, "
            f"backend={self.backend!r}, chunk_size={self.chunk_size}"
        )
