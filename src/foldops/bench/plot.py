"""Plots of a bench CSV, drawn from the CSV alone (``foldops plot bench.csv``).

One PNG per op: time against N with one line per backend (and dtype), a panel per
mode (fwd, fwd+bwd, bwd), and a second row for memory where the CSV has it.
Needs matplotlib (``pip install foldops[bench]``); nothing else of foldops runs.
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

MODE_ORDER = ("fwd", "fwd+bwd", "bwd")
_MEMORY_METRICS = ("peak_mib",)
_MEMORY_LABELS = {"peak_mib": "peak memory above inputs (MiB)"}
_N = re.compile(r"(?:^|,)N=(\d+)(?:,|$)")


def read_csv(path: os.PathLike) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def size_of(shape: str) -> Optional[int]:
    """N from a shape string such as ``"B=1,N=64,H=4,D=32"``."""
    match = _N.search(shape or "")
    return int(match.group(1)) if match else None


def _fixed_dims(shape: str) -> str:
    """The shape without N: lines with other fixed dims are drawn separately."""
    return ",".join(part for part in shape.split(",") if not part.startswith("N="))


def series(rows: Sequence[Dict[str, str]], op: str, mode: str, metric: str) -> Dict[str, List[Tuple[int, float]]]:
    """{line label: [(N, value)]} of the ok rows of one op, mode and metric, sorted by N."""
    dtypes = {r["dtype"] for r in rows if r["op"] == op and r["status"] == "ok"}
    fixed = {_fixed_dims(r["shape"]) for r in rows if r["op"] == op and r["status"] == "ok"}
    lines: Dict[str, List[Tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["op"] != op or r["mode"] != mode or r["metric"] != metric or r["status"] != "ok":
            continue
        n = size_of(r["shape"])
        if n is None or r["value"] == "":
            continue
        label = r["backend"]
        if len(dtypes) > 1:
            label += f" {r['dtype']}"
        if len(fixed) > 1:
            label += f" [{_fixed_dims(r['shape'])}]"
        lines[label].append((n, float(r["value"])))
    return {label: sorted(points) for label, points in sorted(lines.items())}


def oom_sizes(rows: Sequence[Dict[str, str]], op: str, mode: str) -> Dict[str, List[int]]:
    """{backend: [N]} where the time of ``op``/``mode`` is recorded as out of memory."""
    found: Dict[str, List[int]] = defaultdict(list)
    for r in rows:
        if r["op"] == op and r["mode"] == mode and r["metric"] == "time_ms" and r["status"] == "oom":
            n = size_of(r["shape"])
            if n is not None:
                found[r["backend"]].append(n)
    return {backend: sorted(ns) for backend, ns in sorted(found.items())}


def _mark_oom(ax, rows, op, mode, colours) -> None:
    # An x at the top of the panel, in the backend's colour, where it ran out of memory.
    for backend, sizes in oom_sizes(rows, op, mode).items():
        colour = next((c for label, c in colours.items() if label.split()[0] == backend), "grey")
        ax.scatter(sizes, [0.97] * len(sizes), marker="x", color=colour, transform=ax.get_xaxis_transform(),
                   label=f"{backend} OOM", zorder=3)


def plot_csv(csv_path: os.PathLike, out_dir: Optional[os.PathLike] = None) -> List[Path]:
    """Draw ``<op>.png`` for each op in the CSV into ``out_dir`` (default: beside the CSV)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = read_csv(csv_path)
    out = Path(out_dir) if out_dir is not None else Path(csv_path).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    device = next((r["device"] for r in rows if r.get("device")), "")
    written: List[Path] = []
    ops = list(dict.fromkeys(r["op"] for r in rows if r["status"] == "ok" and r["metric"] == "time_ms"))
    for op in ops:
        modes = [m for m in MODE_ORDER if any(r["op"] == op and r["mode"] == m and r["status"] == "ok"
                                              and r["metric"] == "time_ms" for r in rows)]
        memory_metric = next((m for m in _MEMORY_METRICS if any(
            r["op"] == op and r["metric"] == m and r["status"] == "ok" for r in rows)), None)
        nrows = 2 if memory_metric else 1
        fig, axes = plt.subplots(nrows, len(modes), figsize=(5 * len(modes), 3.8 * nrows), squeeze=False)
        for col, mode in enumerate(modes):
            panels = [("time_ms", "median time (ms)")]
            if memory_metric:
                panels.append((memory_metric, _MEMORY_LABELS[memory_metric]))
            for row_index, (metric, ylabel) in enumerate(panels):
                ax = axes[row_index][col]
                colours = {}
                for label, points in series(rows, op, mode, metric).items():
                    xs, ys = zip(*points)
                    colours[label] = ax.plot(xs, ys, marker="o", label=label)[0].get_color()
                if metric == "time_ms":
                    _mark_oom(ax, rows, op, mode, colours)
                ax.set_xlabel("N")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{op} {mode}" if row_index == 0 else f"{mode} memory")
                if ax.lines or ax.collections:
                    sizes = sorted({x for line in ax.lines for x in line.get_xdata()}
                                   | {n for ns in oom_sizes(rows, op, mode).values() for n in ns})
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(sizes)
                    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
                    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
                    if ax.lines and all(y > 0 for line in ax.lines for y in line.get_ydata()):
                        ax.set_yscale("log")
                        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
                        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                    ax.legend(fontsize="small")
                ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"{op} ({device})" if device else op, fontsize="medium")
        fig.tight_layout()
        path = out / f"{op}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
