"""Benchmark cases: how to build inputs for each op at a given size.

A :class:`BenchCase` knows one public op of ``foldops.ops``: its tensor arguments, the
fixed dimensions of a realistic call (a small CPU profile and a GPU profile with Boltz-2
sizes), and how to draw random inputs with a fixed seed and a mask that has fully
masked rows (padded tokens). The size swept is ``N`` (tokens); every other dimension is
fixed per profile and can be overridden (``--dim S=64``).

Cases whose op is not importable yet raise :class:`CaseUnavailable` from
:meth:`BenchCase.load`, so the bench runs as the ops land.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

Dims = Dict[str, int]
Builder = Callable[[Dims, torch.Generator], Dict[str, Any]]

PROFILES = ("cpu", "gpu")


class CaseUnavailable(RuntimeError):
    """The op of a case cannot be imported (not written yet, or broken)."""


@dataclasses.dataclass
class BenchInputs:
    """Tensors of one call, already on the device and in the bench dtype."""

    tensors: Dict[str, torch.Tensor]
    """Every tensor argument by name (masks stay bool)."""
    grad_names: Tuple[str, ...]
    """The floating tensors whose gradients fwd+bwd measures."""
    extras: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """Non-tensor arguments that depend on the size (e.g. ``max_seqlen_q``)."""

    def requires_grad_(self, flag: bool) -> "BenchInputs":
        for name in self.grad_names:
            self.tensors[name].requires_grad_(flag)
        return self

    def grad_inputs(self) -> List[torch.Tensor]:
        return [self.tensors[name] for name in self.grad_names]


@dataclasses.dataclass
class BenchCase:
    """How to benchmark one op.

    ``build(dims, generator)`` returns fp32 CPU tensors by argument name (masks bool;
    integer tensors and plain Python values, such as a maximum length, pass unchanged);
    :meth:`make` casts the floating ones that are not masks to the bench dtype and moves
    everything to the device. ``positional`` lists the arguments passed positionally, in
    order; the other tensors and ``static`` go by keyword.
    """

    op: str
    build: Builder
    positional: Tuple[str, ...]
    grad_names: Tuple[str, ...]
    dims: Mapping[str, Dims]
    """Fixed dimensions per profile, in shape-string order; ``N`` is filled from the size."""
    sizes: Mapping[str, Tuple[int, ...]]
    """Default sizes (N) per profile."""
    ref_elements: Callable[[Dims], int]
    """Rough element count of the largest fp64 intermediates of the reference (fwd)."""
    static: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    modules: Tuple[str, ...] = ()
    """Modules that may hold the op, tried in order; default ``foldops.ops.<op>``, and
    ``foldops.ops`` itself last."""
    loader: Optional[Callable[[], Callable[..., Any]]] = None
    """Returns the op function; default imports it from ``modules``."""
    backend_op: Optional[str] = None
    """The op name its backends are registered under, if not ``op`` (e.g.
    ``attention_pair_bias`` runs the backends of ``triangle_attention``)."""
    description: str = ""
    fp32_inputs: Tuple[str, ...] = ()
    """Floating arguments that stay in fp32 (at least) whatever the bench dtype, as the
    layers hand them over (IPA's points, which carry the frames' precision)."""
    output: Optional[Callable[[Any], torch.Tensor]] = None
    """For an op that returns several tensors: one tensor made of them, which the harness
    times, differentiates and compares (default: the op's return value as it is)."""

    @property
    def registry_op(self) -> str:
        return self.backend_op or self.op

    def load(self) -> Callable[..., Any]:
        """The op function, or :class:`CaseUnavailable` saying why it cannot be loaded."""
        if self.loader is not None:
            return self.loader()
        candidates = list(self.modules or (f"foldops.ops.{self.op}",)) + ["foldops.ops"]
        for module_name in candidates:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name == module_name:
                    continue  # not written yet
                raise CaseUnavailable(
                    f"{self.op}: importing {module_name} failed ({type(exc).__name__}: {exc})"
                ) from exc
            except Exception as exc:
                raise CaseUnavailable(
                    f"{self.op}: importing {module_name} failed ({type(exc).__name__}: {exc})"
                ) from exc
            fn = getattr(module, self.op, None)
            if callable(fn):
                return fn
        raise CaseUnavailable(
            f"{self.op}: not available yet (no function {self.op!r} in {', '.join(candidates)})"
        )

    def dims_for(self, profile: str, size: int, overrides: Optional[Mapping[str, int]] = None) -> Dims:
        """The full dims at size ``N = size``; ``overrides`` apply to keys this case has."""
        if profile not in self.dims:
            raise ValueError(f"profile: expected one of {sorted(self.dims)}, got {profile!r}")
        dims: Dims = {}
        for key, value in self.dims[profile].items():
            dims[key] = value
        dims["N"] = int(size)
        for key, value in (overrides or {}).items():
            if key in dims and key != "N":
                dims[key] = int(value)
        return dims

    def dim_names(self) -> Tuple[str, ...]:
        names = set()
        for profile_dims in self.dims.values():
            names.update(profile_dims)
        return tuple(sorted(names | {"N"}))

    @staticmethod
    def shape_string(dims: Mapping[str, int]) -> str:
        """``"B=1,N=64,H=4,D=32"``: the shape column of the CSV."""
        return ",".join(f"{key}={value}" for key, value in dims.items())

    def make(
        self,
        dims: Dims,
        dtype: torch.dtype,
        device: torch.device,
        seed: int = 0,
    ) -> BenchInputs:
        generator = torch.Generator().manual_seed(seed)
        tensors, extras = {}, {}
        for name, t in self.build(dims, generator).items():
            if not isinstance(t, torch.Tensor):
                extras[name] = t
                continue
            if t.dtype.is_floating_point:
                t = t.to(torch.promote_types(dtype, torch.float32) if name in self.fp32_inputs else dtype)
            tensors[name] = t.to(device)
        return BenchInputs(tensors=tensors, grad_names=self.grad_names, extras=extras)

    def call(self, fn: Callable[..., Any], inputs: BenchInputs, backend: str) -> torch.Tensor:
        values = {**inputs.tensors, **inputs.extras}
        args = [values[name] for name in self.positional]
        kwargs = {k: v for k, v in values.items() if k not in self.positional}
        kwargs.update(self.static)
        result = fn(*args, **kwargs, backend=backend)
        return result if self.output is None else self.output(result)


# Input helpers --------------------------------------------------------------------------

def _randn(generator: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * scale


def token_mask(batch: int, n: int) -> torch.Tensor:
    """``[B, N]`` keep-mask with the last ``N // 8`` tokens padded (masked out).

    With ``B >= 2`` the last batch element is fully masked, so masks over ``[B, N]``
    have a fully masked row too.
    """
    keep = torch.ones(batch, n, dtype=torch.bool)
    pad = n // 8
    if pad:
        keep[:, n - pad:] = False
    if batch >= 2:
        keep[-1] = False
    return keep


def pair_mask(batch: int, n: int) -> torch.Tensor:
    """``[B, N, N]`` pair mask from :func:`token_mask` (padded tokens: fully masked rows).

    Every batch element keeps its unpadded block here, whatever ``B``.
    """
    keep = torch.ones(batch, n, dtype=torch.bool)
    pad = n // 8
    if pad:
        keep[:, n - pad:] = False
    return keep[:, :, None] & keep[:, None, :]


def _layer_norm_params(generator: torch.Generator, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return 1.0 + _randn(generator, dim, scale=0.1), _randn(generator, dim, scale=0.1)


# The cases -------------------------------------------------------------------------------

def _build_triangle_attention(d: Dims, g: torch.Generator) -> Dict[str, torch.Tensor]:
    b, n, h, c = d["B"], d["N"], d["H"], d["D"]
    return {
        "q": _randn(g, b, n, n, h, c),
        "k": _randn(g, b, n, n, h, c),
        "v": _randn(g, b, n, n, h, c),
        "bias": _randn(g, b, h, n, n),
        "mask": pair_mask(b, n),  # [B, I=N, N]: padded rows i are fully masked
    }


def _build_attention_pair_bias(d: Dims, g: torch.Generator) -> Dict[str, torch.Tensor]:
    b, m, n, h, c = d["B"], d["M"], d["N"], d["H"], d["D"]
    return {
        "q": _randn(g, b, m, n, h, c),
        "k": _randn(g, b, m, n, h, c),
        "v": _randn(g, b, m, n, h, c),
        "bias": _randn(g, b, h, n, n),
        "mask": token_mask(b, n),
    }


def _build_triangle_multiplication(d: Dims, g: torch.Generator) -> Dict[str, torch.Tensor]:
    b, n, c = d["B"], d["N"], d["D"]
    norm_in_weight, norm_in_bias = _layer_norm_params(g, c)
    norm_out_weight, norm_out_bias = _layer_norm_params(g, c)
    return {
        "x": _randn(g, b, n, n, c),
        "mask": pair_mask(b, n),
        "norm_in_weight": norm_in_weight,
        "norm_in_bias": norm_in_bias,
        "p_in_weight": _randn(g, 2 * c, c, scale=c ** -0.5),
        "g_in_weight": _randn(g, 2 * c, c, scale=c ** -0.5),
        "norm_out_weight": norm_out_weight,
        "norm_out_bias": norm_out_bias,
        "p_out_weight": _randn(g, c, c, scale=c ** -0.5),
        "g_out_weight": _randn(g, c, c, scale=c ** -0.5),
    }


def _build_outer_product_mean(d: Dims, g: torch.Generator) -> Dict[str, torch.Tensor]:
    b, s, n, c, o = d["B"], d["S"], d["N"], d["C"], d["O"]
    keep = torch.ones(b, s, n, dtype=torch.bool)
    keep &= token_mask(1, n)[:, None, :]  # padded tokens, in every MSA row
    if s >= 2:
        keep[:, -max(1, s // 8):] = False  # padded MSA rows
    return {
        "a": _randn(g, b, s, n, c),
        "b": _randn(g, b, s, n, c),
        "mask": keep,
        "out_weight": _randn(g, o, c * c, scale=1.0 / c),
        "out_bias": _randn(g, o, scale=0.1),
    }


def _build_pair_weighted_averaging(d: Dims, g: torch.Generator) -> Dict[str, torch.Tensor]:
    b, s, n, h, c = d["B"], d["S"], d["N"], d["H"], d["D"]
    return {
        "v": _randn(g, b, s, n, h, c),
        "logits": _randn(g, b, h, n, n),
        "mask": pair_mask(b, n),
    }


def _build_swiglu_transition(d: Dims, g: torch.Generator) -> Dict[str, torch.Tensor]:
    b, n, c, f = d["B"], d["N"], d["D"], d["F"]
    norm_weight, norm_bias = _layer_norm_params(g, c)
    return {
        "x": _randn(g, b, n, n, c),  # the pair transition: x is [B, N, N, D]
        "norm_weight": norm_weight,
        "norm_bias": norm_bias,
        "fc1_weight": _randn(g, f, c, scale=c ** -0.5),
        "fc2_weight": _randn(g, f, c, scale=c ** -0.5),
        "fc3_weight": _randn(g, c, f, scale=f ** -0.5),
    }


def _build_varlen_attention(d: Dims, g: torch.Generator) -> Dict[str, Any]:
    """B sequences of lengths between N/4 and N packed together (self-attention)."""
    b, n, h, c = d["B"], d["N"], d["H"], d["D"]
    lengths = torch.randint(max(1, n // 4), n + 1, (b,), generator=g)
    lengths[0] = n  # the longest is N, so max_seqlen = N is tight
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    total = int(cu[-1])
    return {
        "q": _randn(g, total, h, c), "k": _randn(g, total, h, c), "v": _randn(g, total, h, c),
        "cu_seqlens_q": cu, "cu_seqlens_k": cu.clone(), "max_seqlen_q": n, "max_seqlen_k": n,
    }


def _build_invariant_point_attention(d: Dims, g: torch.Generator) -> Dict[str, torch.Tensor]:
    """Points as a protein's in the global frame: residues along a chain of 3.8 A steps in
    random directions (as C-alpha atoms), centred 20 A from the origin, each residue's
    points within ~1.5 A of it; point weights around OpenFold's initial
    ``sqrt(1 / (3 * Pq * 9 / 2))``. Neighbours share the attention as in a real protein
    (points spread wider than the chain would make each row's softmax one-hot)."""
    b, n, h, c, pq, pv, cz = d["B"], d["N"], d["H"], d["C"], d["Pq"], d["Pv"], d["Cz"]
    steps = torch.nn.functional.normalize(_randn(g, b, n, 3), dim=-1) * 3.8
    chain = steps.cumsum(1)
    residues = (chain - chain.mean(1, keepdim=True) + 20.0)[:, :, None, None, :]  # [B, N, 1, 1, 3]
    return {
        "q": _randn(g, b, n, h, c), "k": _randn(g, b, n, h, c), "v": _randn(g, b, n, h, c),
        "q_pts": residues + _randn(g, b, n, h, pq, 3, scale=1.5),
        "k_pts": residues + _randn(g, b, n, h, pq, 3, scale=1.5),
        "v_pts": residues + _randn(g, b, n, h, pv, 3, scale=1.5),
        "bias": _randn(g, b, h, n, n),
        "point_weights": (0.5 + torch.rand(h, generator=g)) * (1.0 / (3 * pq * 9 / 2)) ** 0.5,
        "z": _randn(g, b, n, n, cz),
        "mask": token_mask(b, n),
    }


def _ipa_output(outputs: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """IPA's three outputs as one ``[B, N, H, C + 3 Pv + Cz]`` tensor (in their common dtype)."""
    out, out_pts, out_pair = outputs
    dtype = torch.promote_types(torch.promote_types(out.dtype, out_pts.dtype), out_pair.dtype)
    return torch.cat([out.to(dtype), out_pts.flatten(-2).to(dtype), out_pair.to(dtype)], dim=-1)


CPU_SIZES = (32, 64, 96)
GPU_SIZES = (128, 256, 512, 768, 1024)
_SIZES = {"cpu": CPU_SIZES, "gpu": GPU_SIZES}

CASES: Dict[str, BenchCase] = {}


def register_case(case: BenchCase) -> BenchCase:
    """Add (or replace) the case of ``case.op``."""
    CASES[case.op] = case
    return case


register_case(BenchCase(
    op="triangle_attention",
    description="triangle attention core, starting node (I = N rows)",
    build=_build_triangle_attention,
    positional=("q", "k", "v", "bias", "mask"),
    grad_names=("q", "k", "v", "bias"),
    dims={"cpu": {"B": 1, "N": 0, "H": 4, "D": 32}, "gpu": {"B": 1, "N": 0, "H": 4, "D": 32}},
    sizes=_SIZES,
    ref_elements=lambda d: d["B"] * d["N"] * d["H"] * d["N"] * d["N"],
))

register_case(BenchCase(
    op="attention_pair_bias",
    description="single-representation attention with pair bias (Boltz-2: 16 heads x 24)",
    build=_build_attention_pair_bias,
    positional=("q", "k", "v", "bias", "mask"),
    grad_names=("q", "k", "v", "bias"),
    # A [B, N] key mask has a fully masked row only as a whole masked batch element: the
    # CPU profile has B=2 for that; the GPU profile keeps Boltz's B=1 (padding only).
    dims={"cpu": {"B": 2, "M": 1, "N": 0, "H": 4, "D": 16}, "gpu": {"B": 1, "M": 1, "N": 0, "H": 16, "D": 24}},
    sizes=_SIZES,
    ref_elements=lambda d: d["B"] * d["M"] * d["H"] * d["N"] * d["N"],
))

register_case(BenchCase(
    op="triangle_multiplication",
    description="triangle multiplication, outgoing",
    build=_build_triangle_multiplication,
    positional=("x", "mask"),
    grad_names=(
        "x", "norm_in_weight", "norm_in_bias", "p_in_weight", "g_in_weight",
        "norm_out_weight", "norm_out_bias", "p_out_weight", "g_out_weight",
    ),
    static={"direction": "outgoing"},
    dims={"cpu": {"B": 1, "N": 0, "D": 32}, "gpu": {"B": 1, "N": 0, "D": 128}},
    sizes=_SIZES,
    ref_elements=lambda d: 6 * d["B"] * d["N"] * d["N"] * d["D"],
))

register_case(BenchCase(
    op="outer_product_mean",
    description="outer product mean over MSA rows (Boltz-2: C 32, c_out 128)",
    build=_build_outer_product_mean,
    positional=("a", "b", "mask", "out_weight", "out_bias"),
    grad_names=("a", "b", "out_weight", "out_bias"),
    dims={"cpu": {"B": 1, "S": 16, "N": 0, "C": 8, "O": 16}, "gpu": {"B": 1, "S": 1024, "N": 0, "C": 32, "O": 128}},
    sizes=_SIZES,
    ref_elements=lambda d: d["B"] * d["N"] * d["N"] * (d["C"] * d["C"] + d["O"]) + 2 * d["B"] * d["S"] * d["N"] * d["C"],
))

register_case(BenchCase(
    op="pair_weighted_averaging",
    description="MSA pair-weighted averaging (Boltz-2: 8 heads x 32)",
    build=_build_pair_weighted_averaging,
    positional=("v", "logits", "mask"),
    grad_names=("v", "logits"),
    dims={"cpu": {"B": 1, "S": 16, "N": 0, "H": 4, "D": 8}, "gpu": {"B": 1, "S": 1024, "N": 0, "H": 8, "D": 32}},
    sizes=_SIZES,
    ref_elements=lambda d: 2 * d["B"] * d["S"] * d["N"] * d["H"] * d["D"] + d["B"] * d["H"] * d["N"] * d["N"],
))

register_case(BenchCase(
    op="varlen_attention",
    description="variable-length self-attention on packed sequences (flash_attn layout; N = longest)",
    build=_build_varlen_attention,
    positional=("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
    grad_names=("q", "k", "v"),
    dims={"cpu": {"B": 4, "N": 0, "H": 4, "D": 32}, "gpu": {"B": 16, "N": 0, "H": 16, "D": 64}},
    sizes=_SIZES,
    ref_elements=lambda d: d["B"] * d["H"] * d["N"] * d["N"],
))

register_case(BenchCase(
    op="swiglu_transition",
    modules=("foldops.ops.swiglu_transition", "foldops.ops.transition"),
    description="SwiGLU transition on the pair representation (hidden = 4 D)",
    build=_build_swiglu_transition,
    positional=("x",),
    grad_names=("x", "norm_weight", "norm_bias", "fc1_weight", "fc2_weight", "fc3_weight"),
    dims={"cpu": {"B": 1, "N": 0, "D": 32, "F": 128}, "gpu": {"B": 1, "N": 0, "D": 128, "F": 512}},
    sizes=_SIZES,
    ref_elements=lambda d: d["B"] * d["N"] * d["N"] * (2 * d["D"] + 3 * d["F"]),
))


register_case(BenchCase(
    op="invariant_point_attention",
    description="invariant point attention core (GPU profile at FrameFlow / Multiflow widths: 12 heads x 16, 4 / 8 points)",
    build=_build_invariant_point_attention,
    positional=("q", "k", "v", "q_pts", "k_pts", "v_pts", "bias", "point_weights", "z", "mask"),
    grad_names=("q", "k", "v", "q_pts", "k_pts", "v_pts", "bias", "point_weights", "z"),
    fp32_inputs=("q_pts", "k_pts", "v_pts", "point_weights"),
    output=_ipa_output,
    # A [B, N] residue mask has a fully masked row only as a whole masked batch element: the
    # CPU profile has B=2 for that (as attention_pair_bias); the GPU profile one protein.
    dims={"cpu": {"B": 2, "N": 0, "H": 4, "C": 16, "Pq": 4, "Pv": 8, "Cz": 16},
          "gpu": {"B": 1, "N": 0, "H": 12, "C": 16, "Pq": 4, "Pv": 8, "Cz": 128}},
    sizes=_SIZES,
    ref_elements=lambda d: d["B"] * d["N"] * d["N"] * (d["H"] * (3 * d["Pq"] + 4) + d["Cz"]),
))


def get_cases(names: Optional[Sequence[str]] = None) -> List[BenchCase]:
    """Cases by op name (all, in registration order, for ``None``); ValueError if unknown."""
    if names is None:
        return list(CASES.values())
    unknown = [name for name in names if name not in CASES]
    if unknown:
        raise ValueError(f"ops: unknown op(s) {unknown}; expected some of {list(CASES)}")
    return [CASES[name] for name in names]


def reference_bytes(case: BenchCase, dims: Dims, with_grad: bool) -> int:
    """Rough fp64 memory of the reference: its largest intermediates, and autograd's copies."""
    return int(8 * (4 if with_grad else 2) * case.ref_elements(dims))
