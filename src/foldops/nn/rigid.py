"""A small rigid-transform type for IPA users without OpenFold: rotations [*, 3, 3] + translations [*, 3].

``Rigid`` has the part of OpenFold ``Rigid``'s interface that IPA and a structure
trunk use: ``apply`` / ``invert_apply`` of points, indexing with ``[..., None]``,
``compose``, ``invert``, ``identity`` and ``compose_q_update_vec`` (the AlphaFold 2
backbone update: a quaternion ``(1, b, c, d)``, normalised, and a translation).
Points are rotated with elementwise products, not a matmul, so under autocast they
stay in the frames' precision (fp32) as OpenFold's ``rot_vec_mul`` keeps them.

``as_rigid(frames)`` turns ``(rotations, translations)`` into a checked ``Rigid`` and
passes any other object with ``apply`` / ``invert_apply`` (OpenFold's ``Rigid``) through.
With a residue ``mask`` only the kept residues' rotations are checked, and padded
residues' frames, which may hold anything (zeros from a zero-padding collate, NaN), are
replaced by the identity.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

ORTHONORMAL_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Largest |R R^T - I| entry (and |det R - 1|) accepted by ``check_rotations``."""


def _rotate(rots: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(rots.dtype, pts.dtype)
    rots, pts = rots.to(dtype), pts.to(dtype)
    return (rots * pts[..., None, :]).sum(-1)  # [*, 3]: sum_j R_ij p_j


def check_rotations(name: str, rots: Any, batch_shape: Optional[Sequence[int]] = None,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``rots`` is a ``[*, 3, 3]`` float tensor of proper rotations (orthonormal, det +1);
    with a bool ``mask`` ``[*]``, only where it is True."""
    if not isinstance(rots, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [*, 3, 3], got {type(rots).__name__}")
    if rots.dim() < 2 or tuple(rots.shape[-2:]) != (3, 3):
        raise ValueError(f"{name}: expected shape [*, 3, 3], got {tuple(rots.shape)}")
    if batch_shape is not None and tuple(rots.shape[:-2]) != tuple(batch_shape):
        raise ValueError(f"{name}: expected shape {(*batch_shape, 3, 3)}, got {tuple(rots.shape)}")
    if not rots.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {rots.dtype}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(rots.shape[:-2]):
            raise ValueError(f"mask: expected shape {tuple(rots.shape[:-2])} (the frames'), got {tuple(mask.shape)}")
    if rots.numel() and not torch.compiler.is_compiling() and rots.device.type != "meta":
        r = rots.detach().to(torch.promote_types(rots.dtype, torch.float32))
        eye = torch.eye(3, dtype=r.dtype, device=r.device)
        if mask is not None:  # padded frames checked as the identity (no boolean indexing: a host sync)
            r = torch.where(mask[..., None, None], r, eye)
        gram = (r[..., :, None, :] * r[..., None, :, :]).sum(-1)  # R R^T, elementwise: autocast-proof
        err = (gram - eye).abs().amax()
        det = (r[..., 0, :] * torch.linalg.cross(r[..., 1, :], r[..., 2, :], dim=-1)).sum(-1)
        det_err = (det - 1).abs().amax()
        tol = ORTHONORMAL_TOLERANCE.get(rots.dtype, 1e-3)
        worst = max(torch.stack([err, det_err]).tolist())  # one host read
        if not worst <= tol:
            raise ValueError(
                f"{name}: expected rotation matrices (R R^T = I, det R = +1), largest deviation {worst:.3e} "
                f"> {tol:.0e}"
            )
    return rots


class Rigid:
    """Rigid transforms ``x -> R x + t`` with ``rots`` ``[*, 3, 3]`` and ``trans`` ``[*, 3]``."""

    __slots__ = ("rots", "trans")

    def __init__(self, rots: torch.Tensor, trans: torch.Tensor, *, check: bool = False) -> None:
        if check:
            check_rotations("rots", rots)
            if not isinstance(trans, torch.Tensor):
                raise TypeError(f"trans: expected a torch.Tensor [*, 3], got {type(trans).__name__}")
            if tuple(trans.shape) != tuple(rots.shape[:-1]):
                raise ValueError(f"trans: expected shape {tuple(rots.shape[:-1])}, got {tuple(trans.shape)}")
        self.rots = rots
        self.trans = trans

    @classmethod
    def identity(cls, shape: Sequence[int], dtype=torch.float32, device=None, requires_grad: bool = False) -> "Rigid":
        rots = torch.eye(3, dtype=dtype, device=device).expand(*shape, 3, 3).clone()
        trans = torch.zeros(*shape, 3, dtype=dtype, device=device)
        return cls(rots.requires_grad_(requires_grad), trans.requires_grad_(requires_grad))

    @property
    def shape(self) -> torch.Size:
        return self.trans.shape[:-1]

    def __getitem__(self, index) -> "Rigid":
        if not isinstance(index, tuple):
            index = (index,)
        return Rigid(self.rots[index + (slice(None), slice(None))], self.trans[index + (slice(None),)])

    def apply(self, pts: torch.Tensor) -> torch.Tensor:
        """``R p + t`` for points ``[*, 3]`` broadcast against the frames."""
        return _rotate(self.rots, pts) + self.trans

    def invert_apply(self, pts: torch.Tensor) -> torch.Tensor:
        """``R^T (p - t)``."""
        return _rotate(self.rots.transpose(-1, -2), pts - self.trans)

    def invert(self) -> "Rigid":
        rt = self.rots.transpose(-1, -2)
        return Rigid(rt, -_rotate(rt, self.trans))

    def compose(self, other: "Rigid") -> "Rigid":
        """``self o other``: apply ``other`` first."""
        rots = (self.rots[..., :, :, None] * other.rots[..., None, :, :]).sum(-2)
        return Rigid(rots, self.apply(other.trans))

    def compose_q_update_vec(self, update: torch.Tensor) -> "Rigid":
        """Compose with the update ``[*, 6]``: quaternion ``(1, b, c, d)`` normalised, translation."""
        return self.compose(Rigid(quaternion_to_rotation(update[..., :3]), update[..., 3:]))

    def stop_rot_gradient(self) -> "Rigid":
        return Rigid(self.rots.detach(), self.trans)

    def to(self, *args, **kwargs) -> "Rigid":
        return Rigid(self.rots.to(*args, **kwargs), self.trans.to(*args, **kwargs))

    def __repr__(self) -> str:
        return f"Rigid(shape={tuple(self.shape)}, dtype={self.trans.dtype})"


def quaternion_to_rotation(bcd: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[*, 3, 3]`` of the unit quaternions ``(1, b, c, d) / |(1, b, c, d)|``."""
    b, c, d = bcd.unbind(-1)
    a = torch.ones_like(b)
    norm = torch.rsqrt(1 + b * b + c * c + d * d)
    a, b, c, d = a * norm, b * norm, c * norm, d * norm
    rows = [
        a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c),
        2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b),
        2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d,
    ]
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def as_rigid(frames: Any, batch_shape: Optional[Tuple[int, ...]] = None, name: str = "r",
             mask: Optional[torch.Tensor] = None) -> Any:
    """``(rots, trans)`` -> a checked ``Rigid``; a ``Rigid`` is checked; any other object
    with ``apply`` and ``invert_apply`` (OpenFold's ``Rigid``) is returned as it is.

    ``mask``: a bool keep-mask of the frames' batch shape (True = a real residue), or None.
    With it only the real residues' rotations are checked, and the returned ``Rigid``
    holds the identity at padded residues, whatever they held (placeholder zeros, NaN):
    their values reach no arithmetic and get zero gradient.
    """
    if isinstance(frames, (tuple, list)):
        if len(frames) != 2:
            raise ValueError(f"{name}: expected (rotations [*, 3, 3], translations [*, 3]), got {len(frames)} items")
        rots, trans = frames
    elif isinstance(frames, Rigid):
        rots, trans = frames.rots, frames.trans
    elif hasattr(frames, "apply") and hasattr(frames, "invert_apply"):
        return frames
    else:
        raise TypeError(
            f"{name}: expected (rotations, translations), a foldops Rigid or an object with apply/invert_apply, "
            f"got {type(frames).__name__}"
        )
    check_rotations(f"{name} rotations", rots, batch_shape, mask)
    if not isinstance(trans, torch.Tensor):
        raise TypeError(f"{name} translations: expected a torch.Tensor, got {type(trans).__name__}")
    if tuple(trans.shape) != tuple(rots.shape[:-1]):
        raise ValueError(f"{name} translations: expected shape {tuple(rots.shape[:-1])}, got {tuple(trans.shape)}")
    if mask is not None:
        # torch.where, not a product: a NaN placeholder stays out of the values and of the
        # gradient (padded residues' frames get exactly zero).
        eye = torch.eye(3, dtype=rots.dtype, device=rots.device)
        return Rigid(torch.where(mask[..., None, None], rots, eye), torch.where(mask[..., None], trans, 0.0))
    return frames if isinstance(frames, Rigid) else Rigid(rots, trans)
