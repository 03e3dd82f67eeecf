"""Invariant point attention layers: OpenFold's and the Multiflow / FrameFlow variant.

``InvariantPointAttention(c_s, c_z, c_hidden, no_heads, no_qk_points, no_v_points,
inf=1e5, eps=1e-8, is_multimer=False)`` has OpenFold's constructor, parameter names
(``linear_q``, ``linear_kv``, ``linear_q_points``, ``linear_kv_points``, ``linear_b``,
``head_weights``, ``linear_out``) and forward ``(s, z, r, mask, inplace_safe=False,
_offload_inference=False, _z_reference_list=None)``;
``MultiflowInvariantPointAttention(ipa_conf, inf=1e5, eps=1e-8)`` adds ``down_z``
(the pair output from ``c_z // 4`` channels) and Multiflow's forward ``(s, z, r, mask,
attention_mask=None, _offload_inference=False, _z_reference_list=None)``. Both load
their checkpoints with ``strict=True``, with the point projections' keys of either
OpenFold layout: ``linear_q_points.weight`` (OpenFold before its multimer refactor,
Multiflow, FrameFlow) or ``linear_q_points.linear.weight`` (current OpenFold, whose
``PointProjection`` wraps the Linear; same x|y|z layout). The state dict they save
has the flat keys.

Facts both follow: point projections are laid out x-block | y-block | z-block (the
first ``H * P`` outputs are the x coordinates, ...); frames map the points to the
global frame before attention and the point output back (``invert_apply``); logits
are ``sqrt(1/(3 c_hidden)) q.k + sqrt(1/3) b - 1/2 gamma_h sum_p |q_p - k_p|^2`` with
``gamma_h = softplus(head_weights) sqrt(1 / (3 * P_qk * 9 / 2))``; ``linear_out`` reads
``[o, o_pt x, o_pt y, o_pt z, |o_pt|, o_pair]`` with ``|o_pt| = sqrt(sum o_pt^2 + eps)``.
The attention itself is ``foldops.ops.invariant_point_attention``. Rows of padded
residues: OpenFold lets them attend over every key, here their attention is zero and
the layer's output is exactly zero (not ``linear_out`` of the empty attention, whose
point features ``R^T (0 - t)`` depend on the pose), so padded rows pass no gradient back;
the layer's output for real residues is the same either way.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from foldops._checks import as_bool_mask, check_positive_int, check_tensor
from foldops.backends import AUTO, check_module_backend, for_op
from foldops.device import autocast_dtype_in_effect
from foldops.nn import _init
from foldops.nn.rigid import as_rigid
from foldops.ops.invariant_point_attention import OP, invariant_point_attention

SOFTPLUS_INVERSE_1 = 0.541324854612918  # softplus^-1(1): the head weights' initial value


class _PairProjections(torch.autograd.Function):
    """z's two uses in the layer, with one z-sized gradient of its own.

    Returns the pair bias ``(z W_b^T + b_b) * factor`` ``[B, N, N, H]`` and the pair
    values: z itself (OpenFold; a view) or ``z W_v^T + b_v`` (Multiflow's ``down_z``),
    both computed in ``dtype`` (the autocast dtype in effect, else z's), as autocast
    would. Left to autograd, each use of z returns its own z-sized gradient (under
    autocast first a 16-bit one, then its fp32 cast) and the engine sums them: three
    z-sized tensors at once. Here dz is formed in one buffer, in z's dtype with fp32
    (fp64) products: OpenFold's bias term as ``addmm`` onto the op's gradient of the
    pass-through z, Multiflow's two projections' terms into one buffer. The engine may
    hand one gradient tensor to several consumers, so the pass-through's gradient is
    written in place only with ``exclusive_grad``: the caller's promise that the pair
    values feed one op whose backward allocates their gradient (the layer: they go
    only to ``invariant_point_attention``), which saves a z-sized buffer at the peak.
    """

    @staticmethod
    def forward(ctx, z, w_b, b_b, w_v, b_v, factor: float, dtype: torch.dtype, exclusive_grad: bool = False):
        ctx.factor = factor
        ctx.exclusive_grad = exclusive_grad
        ctx.save_for_backward(z, w_b, w_v)
        zc = z.to(dtype)
        bias = nn.functional.linear(zc, w_b.to(dtype), b_b.to(dtype)) * factor
        if w_v is None:
            return bias, z.view_as(z)
        return bias, nn.functional.linear(zc, w_v.to(dtype), b_v.to(dtype))

    @staticmethod
    def backward(ctx, d_bias, d_values):
        z, w_b, w_v = ctx.saved_tensors
        cz = z.shape[-1]
        acc = torch.promote_types(z.dtype, torch.float32)
        zf = z.reshape(-1, cz)
        g_b = None if d_bias is None else d_bias.reshape(-1, d_bias.shape[-1]).to(acc) * ctx.factor
        g_v = None
        if w_v is not None and d_values is not None:
            g_v = d_values.reshape(-1, d_values.shape[-1]).to(acc)
        dz = None
        if ctx.needs_input_grad[0]:
            if w_v is None and d_values is not None:
                # The op's gradient of the pass-through z, plus the bias term: into d_values
                # itself where it is ours alone (exclusive_grad, eager, no graph of the
                # backward), else a new tensor, or a copy of our own when d_values is first
                # converted to acc.
                base = d_values.reshape(-1, cz)
                in_place = ctx.exclusive_grad and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                if g_b is None:
                    dz = base
                elif base.dtype == acc and in_place:
                    dz = base.addmm_(g_b, w_b.to(acc))
                elif base.dtype == acc:
                    dz = torch.addmm(base, g_b, w_b.to(acc))
                else:
                    dz = base.to(acc).addmm_(g_b, w_b.to(acc))
            else:
                for g, w in ((g_b, w_b), (g_v, w_v)):
                    if g is None:
                        continue
                    dz = g @ w.to(acc) if dz is None else dz.addmm_(g, w.to(acc))  # dz is ours here
            if dz is not None:
                dz = dz.reshape(z.shape).to(z.dtype)
        grads = [dz, None, None, None, None]
        for slot, g, w in ((1, g_b, w_b), (3, g_v, w_v)):
            if g is not None and ctx.needs_input_grad[slot]:
                grads[slot] = (g.T @ zf.to(acc)).to(w.dtype)
            if g is not None and ctx.needs_input_grad[slot + 1]:
                grads[slot + 1] = g.sum(0).to(w.dtype)
        return (*grads, None, None, None)


POINT_PROJECTIONS = ("linear_q_points", "linear_kv_points")


def _rename_point_projection_keys(module, state_dict, prefix, *_) -> None:
    """Load-state-dict pre-hook: current OpenFold's ``PointProjection`` keys
    (``linear_q_points.linear.weight``) -> the flat keys (``linear_q_points.weight``).

    OpenFold's monomer ``PointProjection`` splits the Linear's ``3 H P`` outputs into
    x | y | z blocks of ``H P`` each and views them as ``[H, P, 3]``, exactly as the flat
    layers did before it (its own converter, ``convert_deprecated_v1_keys``, only
    renames these keys), so the weights load as they are. A key present in both forms
    is left alone (strict loading then reports the extra one)."""
    for name in POINT_PROJECTIONS:
        for param in ("weight", "bias"):
            nested, flat = f"{prefix}{name}.linear.{param}", f"{prefix}{name}.{param}"
            if nested in state_dict and flat not in state_dict:
                state_dict[flat] = state_dict.pop(nested)


def _z_from(z: Optional[Tensor], from_list: bool, z_reference_list: Optional[Sequence[Tensor]]) -> Tensor:
    """The pair representation: ``z``, or ``z_reference_list[0]`` where the caller passes
    z by reference (OpenFold's and Multiflow's ``_offload_inference``)."""
    if from_list:
        if z_reference_list is None or len(z_reference_list) == 0:
            raise ValueError("_z_reference_list: expected a sequence holding z when _offload_inference is set, "
                             f"got {z_reference_list!r}")
        z = z_reference_list[0]
    if z is None:
        raise TypeError("z: expected a tensor [B, N, N, c_z], got None (OpenFold passes z as _z_reference_list[0] "
                        "with _offload_inference=True, inplace_safe=True)")
    return z


def _linear(c_in: int, c_out: int, init: str = "default", **factory) -> nn.Linear:
    layer = nn.Linear(c_in, c_out, **factory)
    if init == "final":
        _init.zeros_(layer.weight)
    else:
        _init.lecun_normal_(layer.weight)
    _init.zeros_(layer.bias)
    return layer


class InvariantPointAttention(nn.Module):
    """OpenFold's ``InvariantPointAttention`` (AlphaFold 2 Algorithm 22) on the fused op.

    Args:
        c_s, c_z: single and pair channels.
        c_hidden: scalar channels per head.
        no_heads: heads H.
        no_qk_points, no_v_points: query/key and value points per head.
        inf: kept for OpenFold compatibility; masking here is exact.
        eps: added under the square root of the point output's norm.
        is_multimer: OpenFold's flag; only ``False`` (the monomer layer) is implemented.
        backend: backend of the attention op (``"auto"``, ``"triton"``, ``"torch"``, ...).
        device, dtype: factory kwargs for the parameters.
    """

    pair_channels_out: Optional[int] = None  # channels of z in the pair output (None: c_z)

    def __init__(
        self,
        c_s: int,
        c_z: int,
        c_hidden: int,
        no_heads: int,
        no_qk_points: int,
        no_v_points: int,
        inf: float = 1e5,
        eps: float = 1e-8,
        is_multimer: bool = False,
        *,
        backend: str = AUTO,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if is_multimer:
            raise ValueError(
                "is_multimer: OpenFold's multimer IPA (linear_k / linear_v without biases, per-head point "
                "layout) is not implemented; only the monomer layer (is_multimer=False)"
            )
        for name, value in (("c_s", c_s), ("c_z", c_z), ("c_hidden", c_hidden), ("no_heads", no_heads),
                            ("no_qk_points", no_qk_points), ("no_v_points", no_v_points)):
            check_positive_int(name, value, allow_none=False)
        factory = {"device": device, "dtype": dtype}
        self.c_s, self.c_z, self.c_hidden = c_s, c_z, c_hidden
        self.no_heads, self.no_qk_points, self.no_v_points = no_heads, no_qk_points, no_v_points
        self.inf, self.eps = inf, eps
        self.backend = check_module_backend(backend)
        hc = c_hidden * no_heads
        self.linear_q = _linear(c_s, hc, **factory)
        self.linear_kv = _linear(c_s, 2 * hc, **factory)
        self.linear_q_points = _linear(c_s, no_heads * no_qk_points * 3, **factory)
        self.linear_kv_points = _linear(c_s, no_heads * (no_qk_points + no_v_points) * 3, **factory)
        self.linear_b = _linear(c_z, no_heads, **factory)
        self._build_pair(c_z, factory)
        self.head_weights = nn.Parameter(torch.full((no_heads,), SOFTPLUS_INVERSE_1, **factory))
        c_pair = self.pair_channels_out or c_z
        self.linear_out = _linear(no_heads * (c_pair + c_hidden + no_v_points * 4), c_s, init="final", **factory)
        self.register_load_state_dict_pre_hook(_rename_point_projection_keys)

    def _build_pair(self, c_z: int, factory) -> None:
        """OpenFold reads z itself in the pair output."""

    def _pair_values_projection(self):
        """(weight, bias) of the pair values' projection, or (None, None): z itself."""
        return None, None

    def _points(self, s: Tensor, linear: nn.Linear, frames: Any, count: int) -> Tensor:
        """``linear(s)`` as ``[B, N, H, count, 3]`` points in the global frame."""
        pts = linear(s)  # [B, N, 3 * H * count], x-block | y-block | z-block
        pts = torch.stack(pts.chunk(3, dim=-1), dim=-1)  # [B, N, H * count, 3]
        pts = frames[..., None].apply(pts)
        return pts.view(*pts.shape[:-2], self.no_heads, count, 3)

    def point_weights(self) -> Tensor:
        """gamma_h: ``softplus(head_weights) * sqrt(1 / (3 * P_qk * 9 / 2))``, ``[H]``, in fp32 at
        least (H numbers: a 16-bit layer's weights are not rounded again, nor their
        gradient on its way back, which is rounded once, to the parameter's dtype)."""
        w = self.head_weights
        w = w.to(torch.promote_types(w.dtype, torch.float32))
        return nn.functional.softplus(w) * math.sqrt(1.0 / (3 * (self.no_qk_points * 9.0 / 2)))

    def _check_inputs(self, s: Tensor, z: Tensor, mask: Optional[Tensor]) -> None:
        check_tensor("s", s, (None, None, self.c_s))
        batch, n = s.shape[:2]
        check_tensor("z", z, (batch, n, n, self.c_z), device=s.device)
        if mask is not None:
            check_tensor("mask", mask, (batch, n), dtypes=None, device=s.device)

    def _attend(self, s: Tensor, z: Tensor, r: Any, mask: Optional[Tensor], extra_bias: Optional[Tensor]) -> Tensor:
        self._check_inputs(s, z, mask)
        batch, n = s.shape[:2]
        mask = as_bool_mask("mask", mask, (batch, n), s.device)
        # Padded residues' frames may be placeholders (zeros from a zero-padding collate):
        # only the real residues' are checked, the others replaced by the identity.
        frames = as_rigid(r, (batch, n), mask=mask)
        heads, c = self.no_heads, self.c_hidden
        q = self.linear_q(s).view(batch, n, heads, c)
        k, v = self.linear_kv(s).view(batch, n, heads, 2 * c).split(c, dim=-1)
        q_pts = self._points(s, self.linear_q_points, frames, self.no_qk_points)
        kv_pts = self._points(s, self.linear_kv_points, frames, self.no_qk_points + self.no_v_points)
        k_pts, v_pts = kv_pts.split([self.no_qk_points, self.no_v_points], dim=-2)

        w_v, b_v = self._pair_values_projection()
        dtype = autocast_dtype_in_effect(z) or torch.promote_types(z.dtype, self.linear_b.weight.dtype)
        bias, pair = _PairProjections.apply(z, self.linear_b.weight, self.linear_b.bias, w_v, b_v,
                                            math.sqrt(1.0 / 3), dtype, True)
        bias = bias.permute(0, 3, 1, 2)  # [B, H, N, N]
        if extra_bias is not None:
            bias = bias + extra_bias
        if bias.dtype not in (q.dtype, torch.float32):
            bias = bias.float()
        if pair.dtype not in (q.dtype, torch.float32):
            pair = pair.to(q.dtype)
        v_pts = v_pts.to(q_pts.dtype)
        k_pts = k_pts.to(q_pts.dtype)
        if q_pts.dtype not in (q.dtype, torch.float32, torch.float64):
            q_pts, k_pts, v_pts = q_pts.float(), k_pts.float(), v_pts.float()
        o, o_pt, o_pair = invariant_point_attention(
            q, k, v, q_pts, k_pts, v_pts, bias, self.point_weights(), pair, mask,
            scale=math.sqrt(1.0 / (3 * c)), backend=for_op(OP, self.backend),
        )
        o_pt = frames[..., None, None].invert_apply(o_pt)  # [B, N, H, Pv, 3], local frames
        o_pt_norm = torch.sqrt((o_pt * o_pt).sum(-1) + self.eps).flatten(-2)  # [B, N, H * Pv]
        o_pt = o_pt.flatten(-3, -2)  # [B, N, H * Pv, 3]
        feats = [o.flatten(-2), *o_pt.unbind(-1), o_pt_norm, o_pair.flatten(-2)]
        # The point features are in the frames' dtype (fp32 frames beside a bf16 / fp16
        # layer, as OpenFold and Multiflow keep them; or fp64 frames beside an fp32
        # layer): linear_out reads its input in the layer's dtype, as OpenFold casts it
        # to z's (under autocast, in the autocast dtype, which linear_out computes in).
        out_dtype = autocast_dtype_in_effect(s) or self.linear_out.weight.dtype
        out = self.linear_out(torch.cat([f.to(out_dtype) for f in feats], dim=-1))
        if mask is not None:
            # Padded rows: zeros (the convention for fully masked rows), and no gradient
            # from them into linear_out or anything before it.
            out = out.masked_fill(~mask[..., None], 0.0)
        return out

    def forward(
        self,
        s: Tensor,
        z: Optional[Tensor],
        r: Any,
        mask: Optional[Tensor] = None,
        inplace_safe: bool = False,
        _offload_inference: bool = False,
        _z_reference_list: Optional[Sequence[Tensor]] = None,
    ) -> Tensor:
        """OpenFold's ``InvariantPointAttention.forward``.

        Args:
            s: single representation ``[B, N, c_s]``.
            z: pair representation ``[B, N, N, c_z]`` (None when passed by reference).
            r: frames ``[B, N]``: ``(rotations [B, N, 3, 3], translations [B, N, 3])``, a
                ``foldops.nn.Rigid`` or any object with OpenFold ``Rigid``'s ``apply``,
                ``invert_apply`` and indexing (OpenFold's ``Rigid`` itself).
            mask: residue mask ``[B, N]`` (bool or 0/1 float), or None.
            inplace_safe: accepted and ignored: OpenFold's in-place updates of its
                ``[B, H, N, N]`` logits save memory the fused op never spends.
            _offload_inference, _z_reference_list: as in OpenFold's StructureModule: with
                both ``_offload_inference`` and ``inplace_safe`` set, z is
                ``_z_reference_list[0]``. OpenFold then moves z to the CPU while it forms
                the attention matrix; the fused op reads z in the same pass as the
                attention, so z stays where it is and the list is left as given.

        Returns:
            The single representation update ``[B, N, c_s]``.
        """
        z = _z_from(z, bool(_offload_inference and inplace_safe), _z_reference_list)
        return self._attend(s, z, r, mask, None)

    def extra_repr(self) -> str:
        return (f"c_s={self.c_s}, c_z={self.c_z}, c_hidden={self.c_hidden}, no_heads={self.no_heads}, "
                f"no_qk_points={self.no_qk_points}, no_v_points={self.no_v_points}, backend={self.backend!r}")


class MultiflowInvariantPointAttention(InvariantPointAttention):
    """Multiflow / FrameFlow ``InvariantPointAttention(ipa_conf, inf=1e5, eps=1e-8)``.

    ``ipa_conf`` is any object with attributes ``c_s, c_z, c_hidden, no_heads,
    no_qk_points, no_v_points, dropout`` (their OmegaConf node works). Differences from
    OpenFold: ``down_z`` (Linear c_z -> c_z // 4) makes the pair output's values, and
    ``forward`` takes an optional ``attention_mask`` ``[B, N, N]`` (1 = attend), which
    Multiflow applies as ``-1e7 (1 - attention_mask)`` on the logits: here the same
    term is added to the pair bias. Multiflow applies ``dropout`` to the logits before
    the softmax; the fused op has no dense logits, so training with ``dropout > 0``
    raises (Multiflow's and FrameFlow's published configs use 0).
    """

    MASK_PENALTY = 1e7

    def __init__(self, ipa_conf: Any, inf: float = 1e5, eps: float = 1e-8, *, backend: str = AUTO,
                 device=None, dtype=None) -> None:
        missing = [a for a in ("c_s", "c_z", "c_hidden", "no_heads", "no_qk_points", "no_v_points", "dropout")
                   if not hasattr(ipa_conf, a)]
        if missing:
            raise TypeError(f"ipa_conf: missing attributes {missing}")
        c_z = ipa_conf.c_z
        check_positive_int("c_z // 4", c_z // 4 if isinstance(c_z, int) else c_z, allow_none=False)
        self.pair_channels_out = c_z // 4
        super().__init__(ipa_conf.c_s, c_z, ipa_conf.c_hidden, ipa_conf.no_heads, ipa_conf.no_qk_points,
                         ipa_conf.no_v_points, inf=inf, eps=eps, backend=backend, device=device, dtype=dtype)
        self._ipa_conf = ipa_conf
        self.dropout_prob = float(ipa_conf.dropout)

    def _build_pair(self, c_z: int, factory) -> None:
        self.down_z = _linear(c_z, c_z // 4, **factory)

    def _pair_values_projection(self):
        return self.down_z.weight, self.down_z.bias

    def forward(
        self,
        s: Tensor,
        z: Optional[Tensor],
        r: Any,
        mask: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        _offload_inference: bool = False,
        _z_reference_list: Optional[Sequence[Tensor]] = None,
    ) -> Tensor:
        """Multiflow's ``InvariantPointAttention.forward``: as the OpenFold layer's, with
        ``attention_mask`` ``[B, N, N]`` or None; with ``_offload_inference`` set, z is
        ``_z_reference_list[0]`` (Multiflow does not ask for ``inplace_safe``; z is not
        moved, the list is left as given)."""
        z = _z_from(z, bool(_offload_inference), _z_reference_list)
        if self.training and self.dropout_prob > 0.0:
            raise NotImplementedError(
                f"dropout={self.dropout_prob}: Multiflow drops attention logits, which the fused op never "
                "materialises; train with ipa_conf.dropout = 0 (the published configs' value)"
            )
        extra = None
        if attention_mask is not None:
            batch, n = s.shape[:2]
            check_tensor("attention_mask", attention_mask, (batch, n, n), dtypes=None, device=s.device)
            extra = (attention_mask.float() - 1.0)[:, None] * self.MASK_PENALTY  # [B, 1, N, N]
        return self._attend(s, z, r, mask, extra)
