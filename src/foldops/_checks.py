"""Input validation shared by every op and layer: clear errors that name the argument.

Every public functional (``foldops.ops``) and every layer (``foldops.nn``, for its own
arguments) validates through these helpers, so one malformed input gets the same
error type and wording wherever it is passed: ``TypeError`` for a wrong type or
dtype, ``ValueError`` for a wrong shape, device or value, always starting with the
argument's name.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from foldops.device import autocast_dtype_in_effect, cuda_graph_capturing

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Dim = Union[int, None]  # None = any size


def check_tensor(
    name: str,
    x: object,
    shape: Optional[Sequence[Dim]] = None,
    *,
    dtypes: Optional[Tuple[torch.dtype, ...]] = FLOAT_DTYPES,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Check ``x`` is a tensor with this shape pattern, dtype and device; return it.

    ``shape`` entries are ints or ``None`` (any size); its length fixes ``ndim``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if shape is not None:
        got = x.shape
        if len(got) != len(shape) or any(d is not None and d != s for d, s in zip(shape, got)):
            expected = tuple("*" if d is None else d for d in shape)
            raise ValueError(f"{name}: expected shape {expected}, got {tuple(got)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {x.device}")
    return x


def check_same_dtype(reference_name: str, reference: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """Every non-None tensor in ``others`` has ``reference``'s dtype."""
    for name, t in others.items():
        if t is not None and t.dtype != reference.dtype:
            raise TypeError(f"{name}: expected dtype {reference.dtype} (as {reference_name}), got {t.dtype}")


def as_bool_mask(
    name: str,
    mask: Optional[torch.Tensor],
    shape: Sequence[int],
    device: torch.device,
) -> Optional[torch.Tensor]:
    """Validate a keep-mask (True/1 = keep) and return it as bool, or ``None``.

    Bool masks pass as they are (no extra work). Float and integer masks, as Boltz
    passes them, must hold only 0 and 1 (0.5, 2, -1 or NaN raise a ``ValueError``)
    and are converted once. Cost of that check: one elementwise pass and one reduction
    over the mask on its device, and one host sync to read the verdict, once per call
    with a non-bool mask; layers convert their masks at the door, so the ops they call
    get bool masks and pay nothing. Skipped while ``torch.compile`` traces, during CUDA
    graph capture (a host read is illegal there) and on the meta device (no values to
    read). The shape must match exactly: no broadcasting.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {mask.device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point or mask.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        check_zero_one(name, mask)
        return mask != 0
    raise TypeError(f"{name}: expected a bool or 0/1 numeric mask, got dtype {mask.dtype}")


def check_zero_one(name: str, mask: torch.Tensor) -> None:
    """A numeric mask holds only 0 and 1 (see ``as_bool_mask`` for the cost)."""
    if mask.device.type == "meta" or mask.numel() == 0 or torch.compiler.is_compiling() or cuda_graph_capturing():
        return
    bad = (mask != 0) & (mask != 1)  # NaN included
    if bool(bad.any()):
        examples = mask[bad].unique()[:4].tolist()
        raise ValueError(f"{name}: expected a bool mask or one holding only 0 and 1, got values such as {examples}")


def check_finite_float(name: str, value: object) -> float:
    """A finite real number (a scale), returned as float; inf and NaN fail."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float, got {value!r}")
    return float(value)


def check_layer_input(name: str, x: torch.Tensor, parameter: torch.Tensor, *, promoted: bool = False) -> None:
    """A layer's input has its parameters' dtype, which would otherwise fail deep inside
    with "mixed dtype". Under autocast (which casts inputs and weights alike) only
    float64 must agree; so too with ``promoted``, for an input the layer itself casts to
    at least float32 (Pairformer's single track)."""
    if (x.dtype == torch.float64) != (parameter.dtype == torch.float64):
        raise TypeError(
            f"{name}: expected dtype {parameter.dtype} (the layer's parameters), got {x.dtype}; "
            f"convert the input or the layer (.to(dtype))"
        )
    if x.dtype != parameter.dtype and not promoted and autocast_dtype_in_effect(x) is None:
        raise TypeError(
            f"{name}: expected dtype {parameter.dtype} (the layer's parameters) outside autocast, got {x.dtype}; "
            f"convert the input or the layer (.to(dtype)), or run under torch.autocast"
        )


def check_aux_dtype(name: str, t: torch.Tensor, reference: torch.Tensor) -> None:
    """``t`` (a bias, logits, a weight) has ``reference``'s dtype or fp32.

    Additive terms may stay fp32 when the main inputs are fp16/bf16 (the softmax and
    its logits run in fp32 anyway).
    """
    if t.dtype not in (reference.dtype, torch.float32):
        raise TypeError(f"{name}: expected dtype {reference.dtype} or torch.float32, got {t.dtype}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_positive_float(name: str, value: object) -> float:
    """A finite number > 0 (an epsilon, a temperature), returned as float; inf and NaN fail."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
        raise ValueError(f"{name}: expected a positive float, got {value!r}")
    return float(value)


def check_positive_int(name: str, value: object, allow_none: bool = True) -> Optional[int]:
    """A positive int (``None`` passes when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value
