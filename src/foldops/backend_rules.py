"""Size rules for ``auto``: below which size the ``torch`` backend beats the kernels.

At small sizes a Triton op is bound by the host (launches, scratch, a Python backward)
while its arithmetic takes microseconds; plain PyTorch, a few large cuBLAS/SDPA calls,
then finishes first. Each rule says, for one op, one device class and one mode, the
largest size ``n`` (keys / tokens) at which ``auto`` prefers ``torch``; above it the
priority order holds (the kernels first). Rules are data: each entry carries the
command that measured it and a one-line reason. Re-measure with

    python benchmarks/small_structures.py --rules

which times every op's backends at N = 64 ... 1024, forward and forward+backward, bf16
and fp32, and prints the thresholds to paste here.

Device classes: ``"cuda-sm<major><minor>"`` (NVIDIA by compute capability, e.g.
``"cuda-sm90"`` for the H100), ``"rocm"``, or the device type (``"cpu"``, ``"xpu"``,
``"mps"``). A device class without an entry takes ``DEFAULT`` (no size rule: priority
order, as before rules existed), the conservative choice on hardware nobody measured.
Modes: ``"inference"`` (no gradient needed) and ``"training"``. A training rule must also
hold in a whole model: the torch backends keep their intermediates for the backward in
every layer, so a rule stops where that memory would add up (see triangle attention).

``backends.select`` asks ``preferred`` once per (op, device, mode, size) and caches the
answer; an explicit ``backend=`` or ``FOLDOPS_BACKEND*`` bypasses the rules.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import torch

from foldops.device import device_class as _device_class

MEASURE = "python benchmarks/small_structures.py --rules"
"""The command that measures the thresholds (on the device class it runs on)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """``auto`` prefers ``backend`` for sizes ``n <= at_most``."""

    at_most: int
    """Largest size at which ``backend`` wins (0: never)."""
    command: str
    """The command whose output set ``at_most``."""
    reason: str
    """One line: what was measured, where."""
    backend: str = "torch"


_H100_ISSUE = "H100 bf16, torch 2.11, Triton 3.6, foldops bench + 50-call throughput probe"
_H100_RULES = "H100, torch 2.11, Triton 3.6, direct launches; benchmarks/results/h100/small_structures_rules.csv"

RULES: Dict[str, Dict[str, Dict[str, Rule]]] = {
    "attention_pair_bias": {
        "cuda-sm90": {
            "inference": Rule(
                0, MEASURE,
                f"{_H100_RULES}: triton no slower in bf16 at every N, 64-1024 (0.255 vs 0.305 ms at 1024; "
                "both host-bound); fp32 measured at N = 64 only (0.468 vs 0.453)",
            ),
            "training": Rule(
                1024, MEASURE,
                f"{_H100_ISSUE}: torch fwd+bwd 0.7-1.1 ms vs triton 1.3-1.9 ms at every N, 128-1024",
            ),
        },
    },
    "triangle_attention": {
        "cuda-sm90": {
            # Inference: triton faster at every N, 64-1024, bf16 and fp32 (no rule).
            "training": Rule(
                256, MEASURE,
                f"{_H100_RULES}: bf16 torch fwd+bwd faster at N <= 256 (1.40 vs 1.69 ms at 128), triton "
                "from 384 (1.67 vs 4.27); fp32 torch faster at every N (145.6 vs 215.9 ms at 1024) but it "
                "keeps the O(N^3) attention weights for the backward, per layer (2.1 GB per 4 heads at "
                "N = 512 in fp32, 96 calls in a 48-block trunk), where the kernel keeps O(N^2)",
            ),
        },
    },
    # triangle_multiplication, cuda-sm90: no rule (priority order, the kernel). The op
    # benchmark on the H100 (benchmarks/results/h100/triangle_multiplication/
    # triangle_multiplication.csv, bf16) has triton ahead at every N it ran torch:
    # fwd 0.23 vs 2.28 ms at N = 256, 0.53 vs 3.24 at 512; fwd+bwd 1.41 vs 2.54 at 256,
    # 2.79 vs 10.08 at 512. N < 256 and fp32 are not measured (`--rules --ops
    # triangle_multiplication`).
    # pair_weighted_averaging, cuda-sm90: no rule. H100, bf16, 1024 MSA rows
    # (benchmarks/results/h100/pair_weighted_averaging/pair_weighted_averaging.csv):
    # the op (target "op", throughput) with triton ahead of torch at N = 256 and 512: fwd
    # 0.41 vs 1.26 ms at 256, fwd+bwd 1.88 vs 2.65; 1.81-1.90x / 1.31-1.41x over both N
    # with the module around it too. N < 256 and fp32 are not measured.
}
"""op -> device class -> mode -> Rule."""

DEFAULT = Rule(0, MEASURE, "device class not measured: priority order (kernels first where they run)")
"""The rule of every (op, device class, mode) without an entry."""


def device_class(device: torch.device) -> str:
    """``"cuda-sm90"``, ``"rocm"``, ``"cpu"``, ...: the key of ``RULES`` for ``device``
    (``foldops.device.device_class``)."""
    return _device_class(device)


def rule_for(op: str, device_cls: str, mode: str) -> Rule:
    """The rule of ``op`` on ``device_cls`` in ``mode`` (``DEFAULT`` if none)."""
    return RULES.get(op, {}).get(device_cls, {}).get(mode, DEFAULT)


@functools.lru_cache(maxsize=4096)
def _preferred(op: str, device: torch.device, training: bool, n: int, rules_id: int) -> Optional[Tuple[str, str]]:
    cls = device_class(device)
    mode = "training" if training else "inference"
    rule = rule_for(op, cls, mode)
    if n > rule.at_most:
        return None
    return rule.backend, f"{cls} {mode} N={n} <= {rule.at_most}: {rule.reason} (measured by: {rule.command})"


def preferred(op: str, device: Optional[torch.device] = None, training: Optional[bool] = None,
              n: Optional[int] = None, **_) -> Optional[Tuple[str, str]]:
    """``(backend name, reason)`` that ``auto`` should try first, or None (priority order).

    Reads ``device``, ``training`` and ``n`` from the op's selection context; an op that
    passes no size or mode gets None. Cached per (op, device, mode, n); replacing
    ``RULES`` (tests) starts a fresh cache.
    """
    if device is None or training is None or n is None:
        return None
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if torch.compiler.is_compiling():  # traced once per graph; Dynamo skips lru_cache wrappers
        return _preferred.__wrapped__(op, device, bool(training), int(n), 0)
    return _preferred(op, device, bool(training), int(n), id(RULES))
