"""Plots of a bench CSV, drawn from the CSV alone (``foldops plot bench.csv``).

One PNG per op: time against N with one line per backend (and dtype), a panel per
mode (fwd, fwd+bwd, bwd), and a second row for memory where the CSV has it. ``auto``
(what ``backend="auto"`` gives) is a dashed black line over the backend it ran; where
that backend changes along the line, each point is labelled with it. The title
gives the dtype and the fixed dimensions; a footnote names each backend that is not
drawn (or not at every size) and why; an ``x`` marks an out-of-memory size.
Needs matplotlib (``pip install foldops[bench]``); nothing else of foldops runs.
"""

from __future__ import annotations

import csv
import math
import os
import re
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

MODE_ORDER = ("fwd", "fwd+bwd", "bwd")
_MEMORY_METRICS = ("peak_mib",)
_MEMORY_LABELS = {"peak_mib": "peak memory above inputs (MiB)"}
_N = re.compile(r"(?:^|,)N=(\d+)(?:,|$)")


REQUIRED_COLUMNS = ("op", "backend", "shape", "dtype", "mode", "metric", "value", "status")
_FOOTNOTE_WIDTH = 150


class NotABenchCsv(ValueError):
    """The file is not a CSV written by ``foldops bench``, or has nothing to plot."""


def read_csv(path: os.PathLike) -> List[Dict[str, str]]:
    """The rows of a bench CSV; :class:`NotABenchCsv` if its header is not one."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "") if columns else "nothing"
                raise NotABenchCsv(
                    f"{os.fspath(path)} is not a foldops bench CSV: expected the columns "
                    f"{', '.join(REQUIRED_COLUMNS)}, ...; its first line has {shown}")
            return list(reader)
    except UnicodeDecodeError as exc:
        raise NotABenchCsv(f"{os.fspath(path)} is not a foldops bench CSV (not text: {exc})") from None


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


AUTO = "auto"  # harness.AUTO; not imported, so that plotting needs only the CSV


def auto_resolved(rows: Sequence[Dict[str, str]], op: str, mode: str) -> Dict[str, Dict[int, str]]:
    """{auto line label: {N: backend auto ran}} of one op and mode (labels as :func:`series`)."""
    labels = {}
    for label, points in series(rows, op, mode, "time_ms").items():
        if label.split()[0] == AUTO:
            labels[label] = {n for n, _ in points}
    dtypes = {r["dtype"] for r in rows if r["op"] == op and r["status"] == "ok"}
    fixed = {_fixed_dims(r["shape"]) for r in rows if r["op"] == op and r["status"] == "ok"}
    found: Dict[str, Dict[int, str]] = defaultdict(dict)
    for r in rows:
        if (r["op"], r["backend"], r["mode"], r["metric"], r["status"]) != (op, AUTO, mode, "time_ms", "ok"):
            continue
        label = AUTO + (f" {r['dtype']}" if len(dtypes) > 1 else "")
        label += f" [{_fixed_dims(r['shape'])}]" if len(fixed) > 1 else ""
        n = size_of(r["shape"])
        if label in labels and n is not None:
            found[label][n] = r.get("resolved", "")
    return dict(found)


def oom_sizes(rows: Sequence[Dict[str, str]], op: str, mode: str) -> Dict[str, List[int]]:
    """{backend: [N]} where the time of ``op``/``mode`` is recorded as out of memory."""
    found: Dict[str, List[int]] = defaultdict(list)
    for r in rows:
        if r["op"] == op and r["mode"] == mode and r["metric"] == "time_ms" and r["status"] == "oom":
            n = size_of(r["shape"])
            if n is not None:
                found[r["backend"]].append(n)
    return {backend: sorted(ns) for backend, ns in sorted(found.items())}


def figure_title(rows: Sequence[Dict[str, str]], op: str, device: str = "") -> str:
    """``op: dtype, fixed dims (device)``: what every point of the figure shares."""
    own = [r for r in rows if r["op"] == op and r["status"] == "ok" and r["metric"] == "time_ms"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in own if r["dtype"]))
    fixed = list(dict.fromkeys(_fixed_dims(r["shape"]) for r in own if r["shape"]))
    parts = [", ".join(dtypes)] if dtypes else []
    if fixed:
        parts.append(" | ".join(f.replace(",", ", ") for f in fixed) + ", N varies")
    title = f"{op}: " + "; ".join(parts) if parts else op
    return f"{title} ({device})" if device else title


def not_drawn(rows: Sequence[Dict[str, str]], op: str) -> List[str]:
    """One line per backend of ``op`` missing from the figure, or missing at some sizes,
    with the status and reason (out of memory is drawn as an ``x`` and not repeated)."""
    lines: List[str] = []
    backends = list(dict.fromkeys(r["backend"] for r in rows if r["op"] == op and r["backend"]))
    for backend in backends:
        own = [r for r in rows if r["op"] == op and r["backend"] == backend and r["metric"] == "time_ms"]
        failed = [r for r in own if r["status"] not in ("ok", "oom")]
        if not failed:
            continue
        first = failed[0]
        reason = f"{first['status']}: {first['note']}".rstrip(": ")
        if not any(r["status"] == "ok" for r in own):
            lines.append(f"{backend} not drawn ({reason})")
        else:
            sizes = sorted({n for n in (size_of(r["shape"]) for r in failed) if n is not None})
            where = f" at N={','.join(map(str, sizes))}" if sizes else ""
            lines.append(f"{backend} missing{where} ({reason})")
    # Whole-op or whole-size failures (rows without a backend).
    for r in rows:
        if r["op"] == op and not r["backend"] and r["status"] != "ok":
            n = size_of(r["shape"])
            lines.append(f"all backends {'at N=' + str(n) + ' ' if n else ''}({r['status']}: {r['note']})")
    return list(dict.fromkeys(lines))


def log_ticks(low: float, high: float) -> List[float]:
    """Tick values for a log axis over [low, high] with at least three labels where the
    range allows: 1-2-5 per decade, or 1..9 per decade when that gives fewer than three."""
    if not (low > 0 and high > 0):
        return []
    low, high = min(low, high), max(low, high)
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for subs in ((1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [float(f"{m * 10.0 ** e:.6g}") for e in range(first, last + 1) for m in subs]
        ticks = [t for t in ticks if low * (1 - 1e-9) <= t <= high * (1 + 1e-9)]
        if len(ticks) >= 3:
            break
    if len(ticks) < 2:  # under a factor of ~1.2: label the ends
        ticks = sorted({float(f"{low:.2g}"), float(f"{high:.2g}")})
    if len(ticks) > 12:  # many decades: thin out to whole decades and their 1-2-5
        ticks = [t for t in ticks if round(t / 10.0 ** math.floor(math.log10(t))) in (1, 2, 5)]
        if len(ticks) > 12:
            ticks = [t for t in ticks if round(t / 10.0 ** math.floor(math.log10(t))) == 1]
    return ticks


def _tick_label(value: float, _=None) -> str:
    return f"{float(f'{value:.3g}'):g}"  # 3 significant digits, 1000 rather than 1e+03


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
    ops = list(dict.fromkeys(r["op"] for r in rows if r["status"] == "ok" and r["metric"] == "time_ms"))
    if not ops:
        raise NotABenchCsv(f"{os.fspath(csv_path)} has no successful time_ms rows: nothing to plot "
                           f"({len(rows)} rows)")
    out = Path(out_dir) if out_dir is not None else Path(csv_path).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    device = next((r["device"] for r in rows if r.get("device")), "")
    written: List[Path] = []
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
                resolved = auto_resolved(rows, op, mode)
                for label, points in series(rows, op, mode, metric).items():
                    xs, ys = zip(*points)
                    if label.split()[0] != AUTO:
                        colours[label] = ax.plot(xs, ys, marker="o", label=label)[0].get_color()
                        continue
                    # Over the line of the backend it ran: dashed, and drawn last.
                    colours[label] = ax.plot(xs, ys, linestyle=(0, (4, 3)), linewidth=2.2, color="black", alpha=0.7,
                                             label=label, zorder=4)[0].get_color()
                    names = resolved.get(label, {})
                    if len(set(names.values())) > 1:
                        for x, y in points:
                            ax.annotate(names.get(x, ""), (x, y), textcoords="offset points", xytext=(0, 6),
                                        ha="center", fontsize="x-small")
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
                    ys = [y for line in ax.lines for y in line.get_ydata()]
                    if ys and all(y > 0 for y in ys):
                        ax.set_yscale("log")
                        low, high = min(ys), max(ys)
                        if high / low < 1.5:  # a flat line: give it some room to show values
                            low, high = low / 1.25, high * 1.25
                            ax.set_ylim(low, high)
                        ax.yaxis.set_major_locator(ticker.FixedLocator(log_ticks(*ax.get_ylim())))
                        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_tick_label))
                        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                    ax.legend(fontsize="small")
                ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(figure_title(rows, op, device), fontsize="medium")
        footnote = not_drawn(rows, op)
        bottom = 0.0
        if footnote:
            text = "\n".join(textwrap.shorten(line, _FOOTNOTE_WIDTH, placeholder=" ...") for line in footnote[:6])
            fig.text(0.01, 0.005, text, fontsize="x-small", va="bottom", ha="left", color="dimgrey")
            bottom = min(0.4, (0.022 + 0.02 * min(len(footnote), 6)) / nrows)
        fig.tight_layout(rect=(0, bottom, 1, 1))
        path = out / f"{op}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
