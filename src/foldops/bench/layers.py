"""The layer group of ``foldops bench``: whole layers per N, inference and training,
latency and throughput, with Boltz's layers beside foldops's when ``boltz`` imports.

    rows = run_layers(foldops.device.resolve_device("auto"), sizes=(256, 384), dtype=torch.bfloat16)

Layers: ``PairformerLayer`` and ``MSALayer`` at Boltz-2 widths (profile ``gpu``: token_s
384, token_z 128, MSA 64 channels and 1024 rows; profile ``cpu``: tiny widths). Modes:
``inference`` (eval, ``no_grad``) and ``training`` (train, forward + backward of a
scalar loss). Metrics: ``time_ms`` (median of device-timed calls: latency) and
``throughput_ms`` (``calls`` calls, then one sync, per call: what a deep model sees
when the host runs ahead). Implementations: ``foldops`` (backend auto), ``boltz``
(plain PyTorch) and ``boltz+cueq`` (``use_kernels=True``, when cuequivariance_torch
imports), all holding the same weights. Rows use ``harness.CSV_COLUMNS``
(``op`` = the layer, ``backend`` = the implementation).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

import foldops
from foldops import device as fdevice
from foldops.bench.harness import CSV_COLUMNS, Timer, dtype_name

WIDTHS = {
    "gpu": dict(token_s=384, token_z=128, heads=16, pw=32, ph=4, msa_s=64, msa_rows=1024),
    "cpu": dict(token_s=32, token_z=16, heads=2, pw=8, ph=2, msa_s=8, msa_rows=4),
}
LAYERS = ("PairformerLayer", "MSALayer")


def _boltz_class(layer: str):
    module = {"PairformerLayer": "boltz.model.layers.pairformer", "MSALayer": "boltz.model.modules.trunkv2"}[layer]
    try:
        return getattr(importlib.import_module(module), layer)
    except Exception:
        return None


def _build(layer: str, impl: str, w: Dict[str, int], device: torch.device):
    if impl == "foldops":
        from foldops.nn import MSALayer, PairformerLayer

        if layer == "PairformerLayer":
            return PairformerLayer(w["token_s"], w["token_z"], num_heads=w["heads"], dropout=0.25,
                                   pairwise_head_width=w["pw"], pairwise_num_heads=w["ph"], device=device)
        return MSALayer(w["msa_s"], w["token_z"], 0.15, 0.25, pairwise_head_width=w["pw"],
                        pairwise_num_heads=w["ph"], device=device)
    cls = _boltz_class(layer)
    if layer == "PairformerLayer":
        return cls(w["token_s"], w["token_z"], w["heads"], dropout=0.25, pairwise_head_width=w["pw"],
                   pairwise_num_heads=w["ph"], v2=True).to(device)
    return cls(w["msa_s"], w["token_z"], 0.15, 0.25, pairwise_head_width=w["pw"],
               pairwise_num_heads=w["ph"]).to(device)


def _inputs(layer: str, w: Dict[str, int], n: int, device: torch.device, float_masks: bool):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, n, n, w["token_z"], generator=gen).to(device)
    mask = torch.ones(1, n, device=device)
    pair = mask[:, :, None] * mask[:, None, :]
    if not float_masks:  # foldops's stacks hand their layers bool masks (no 0/1 check)
        mask, pair = mask.bool(), pair.bool()
    if layer == "PairformerLayer":
        return [torch.randn(1, n, w["token_s"], generator=gen).to(device), z, mask, pair]
    m = torch.randn(1, w["msa_rows"], n, w["msa_s"], generator=gen).to(device)
    msa_mask = torch.ones(1, w["msa_rows"], n, device=device)
    return [z, m, pair, msa_mask if float_masks else msa_mask.bool()]


def _step(module, args: List[torch.Tensor], training: bool, dtype: torch.dtype, device: torch.device,
          kwargs: Dict[str, object]) -> Callable[[], object]:
    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return fdevice.autocast(device, dtype=dtype)

    if not training:
        def infer():
            with torch.no_grad(), autocast():
                return module(*args, **kwargs)
        return infer
    leaf = args[0].clone().requires_grad_(True)

    def train():
        with autocast():
            outs = module(leaf, *args[1:], **kwargs)
            loss = sum(o.float().square().mean() for o in outs)
        loss.backward()
        return loss
    return train


def _throughput(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    fdevice.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    fdevice.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e3


def run_layers(
    device: torch.device,
    sizes: Sequence[int],
    dtype: torch.dtype = torch.bfloat16,
    layers: Sequence[str] = LAYERS,
    modes: Sequence[str] = ("inference", "training"),
    profile: Optional[str] = None,
    repeats: int = 10,
    calls: int = 50,
    with_boltz: bool = True,
) -> List[Dict[str, str]]:
    """Tidy rows (``harness.CSV_COLUMNS``) for every layer, implementation, size and mode."""
    profile = profile or ("cpu" if device.type == "cpu" else "gpu")
    w = WIDTHS[profile]
    timer = Timer(device)
    rows: List[Dict[str, str]] = []
    cueq = importlib.util.find_spec("cuequivariance_torch") is not None

    def row(layer, impl, n, mode, metric, value, status="ok", note=""):
        shape = f"B=1,N={n}" + (f",S={w['msa_rows']}" if layer == "MSALayer" else "")
        values = dict(op=layer, backend=impl, shape=shape, dtype=dtype_name(dtype), mode=mode, metric=metric,
                      value="" if value is None else f"{value:.4f}", status=status, note=note,
                      device=fdevice.device_name(device), torch_version=torch.__version__,
                      foldops_version=foldops.__version__)
        rows.append({column: values.get(column, "") for column in CSV_COLUMNS})

    for layer in layers:
        impls = [("foldops", {})]
        if with_boltz and _boltz_class(layer) is not None:
            impls.append(("boltz", {}))
            if cueq and fdevice.nvidia_capability(device) is not None:  # cuEquivariance: NVIDIA only
                impls.append(("boltz+cueq", {"use_kernels": True}))
        for n in sizes:
            ours = _build(layer, "foldops", w, device)
            for impl, kwargs in impls:
                module = ours
                if impl != "foldops":
                    module = _build(layer, impl, w, device)
                    module.load_state_dict(ours.state_dict(), strict=False)
                args = _inputs(layer, w, n, device, float_masks=impl != "foldops")
                for mode in modes:
                    module.train(mode == "training")
                    try:
                        step = _step(module, args, mode == "training", dtype, device, kwargs)
                        times = timer.measure(lambda _: step(), warmup=2, repeats=repeats)
                        row(layer, impl, n, mode, "time_ms", statistics.median(times))
                        row(layer, impl, n, mode, "throughput_ms", _throughput(step, device, calls))
                    except Exception as exc:  # OOM or a peer that cannot run here: a row, not a crash
                        status = "oom" if fdevice.is_out_of_memory(exc) else "error"
                        row(layer, impl, n, mode, "time_ms", None, status, f"{type(exc).__name__}: {exc}"[:200])
                    fdevice.empty_cache(device)
    return rows
