"""Terminal output of the bench: a progress line, the results table, the summary file."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Dict, IO, List, Optional, Sequence, Tuple

from foldops.bench.harness import AUTO, MODES, Row

SLOWER = 1.2
"""auto's choice is reported as slower where another backend took under 1/SLOWER of its time."""


class ProgressLine:
    """One self-overwriting status line on a terminal; plain lines elsewhere.

    No dependency on rich or tqdm. On a non-terminal stream only every ``every``-th
    step (and the last) is written, so logs stay short.
    """

    def __init__(self, stream: Optional[IO[str]] = None, every: int = 10):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, every)
        self.start = time.perf_counter()
        self._width = 0

    def __call__(self, done: int, total: int, text: str) -> None:
        elapsed = time.perf_counter() - self.start
        line = f"[{done:>{len(str(total))}}/{total} {100 * done // max(total, 1):3d}% {elapsed:6.1f}s] {text}"
        if self.tty:
            columns = shutil.get_terminal_size((100, 20)).columns
            line = line[: columns - 1]
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
            self.stream.flush()
        elif done % self.every == 0 or done == total:
            self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line that stays (e.g. a skipped op), above the progress line."""
        self.finish()
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


# Table -----------------------------------------------------------------------------------

def _fmt(value: str, digits: int = 4) -> str:
    if value == "":
        return ""
    v = float(value)
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.{digits}g}"


def _status_cell(row: Row) -> str:
    return {"oom": "OOM", "error": "ERR", "unavailable": "n/a", "skipped": "skip"}.get(row["status"], "?")


KEY_COLUMNS = ("op", "backend", "shape", "dtype", "auto runs")
"""The left columns of the table; ``auto runs`` names the backend of each ``auto`` line."""


def _resolved_cell(by_mode: Dict[str, str], modes: Sequence[str]) -> str:
    """``torch``, or ``fwd triton, fwd+bwd torch`` where the modes resolve differently."""
    names = [by_mode.get(m, "") for m in modes if m in by_mode]
    if not names:
        return ""
    if len(set(names)) == 1:
        return names[0] or "?"
    return ", ".join(f"{m} {by_mode[m] or '?'}" for m in modes if m in by_mode)


def pivot(rows: Sequence[Row]) -> Tuple[List[str], List[List[str]], List[str]]:
    """(header, table rows, notes) with one line per op/backend/shape/dtype.

    ``auto`` lines (what ``backend="auto"`` gives) come after the backends of their size,
    with the backend they ran in the ``auto runs`` column.
    """
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    keys: List[Tuple[str, str, str, str]] = []
    cells: Dict[Tuple[str, str, str, str], Dict[Tuple[str, str], str]] = {}
    resolved: Dict[Tuple[str, str, str, str], Dict[str, str]] = {}
    notes: List[str] = []
    seen_notes = set()
    for r in rows:
        if not r["backend"]:
            note = f"{r['op']}{' ' + r['shape'] if r['shape'] else ''}: {r['status']}: {r['note']}"
            if note not in seen_notes:
                seen_notes.add(note)
                notes.append(note)
            continue
        key = (r["op"], r["backend"], r["shape"], r["dtype"])
        if key not in cells:
            keys.append(key)
            cells[key] = {}
        if r["backend"] == AUTO:
            resolved.setdefault(key, {}).setdefault(r["mode"], r.get("resolved", ""))
        if r["status"] == "ok":
            text = _fmt(r["value"])
        else:
            text = _status_cell(r)
            note = f"{r['op']} {r['backend']} {r['shape']} {r['mode']} {r['metric']}: {r['status']}: {r['note']}"
            first = f"{r['op']} {r['backend']} {r['status']}: {r['note']}"
            if first not in seen_notes:  # one note per backend and reason
                seen_notes.add(first)
                notes.append(note)
        metric = "peak" if r["metric"] == "peak_mib" else r["metric"]
        cells[key][(r["mode"], metric)] = text
    mem_label = "peak MiB"
    header = list(KEY_COLUMNS)
    columns: List[Tuple[str, str]] = []
    for mode in modes:
        columns.append((mode, "time_ms"))
        header.append(f"{mode} ms")
    for mode in modes:
        columns.append((mode, "peak"))
        header.append(f"{mode} {mem_label}")
    if "fwd" in modes:
        columns.append(("fwd", "rel_err"))
        header.append("out rel err")
    grad_mode = next((m for m in modes if m != "fwd"), None)
    if grad_mode is not None:
        columns.append((grad_mode, "rel_err"))
        header.append("grad rel err")
    table = []
    for key in keys:
        table.append(list(key) + [_resolved_cell(resolved.get(key, {}), modes)]
                     + [cells[key].get(c, "") for c in columns])
    # Drop columns that are empty everywhere (e.g. memory where nothing is measurable).
    keep = [i for i in range(len(header)) if i < 4 or any(line[i] for line in table)]
    header = [header[i] for i in keep]
    table = [[line[i] for i in keep] for line in table]
    return header, table, notes


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The results as an aligned text table (or a Markdown table), then the notes."""
    header, table, notes = pivot(rows)
    out: List[str] = []
    if table:
        if markdown:
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            for line in table:
                out.append("| " + " | ".join(line) + " |")
        else:
            widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(header)]
            out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
            out.append("  ".join("-" * w for w in widths))
            previous_op = None
            for line in table:
                shown = list(line)
                if line[0] == previous_op:
                    shown[0] = ""
                previous_op = line[0]
                out.append("  ".join(c.ljust(w) if h in KEY_COLUMNS else c.rjust(w)
                                     for h, c, w in zip(header, shown, widths)).rstrip())
    if notes:
        out.append("")
        out.append("Notes:")
        out.extend(f"- {note}" for note in notes)
    return "\n".join(out)


def auto_notes(rows: Sequence[Row]) -> List[str]:
    """Where ``auto`` measured slower than another backend, and why it is kept.

    One line per op, mode, the backend auto ran and the faster backend, listing the sizes.
    """
    times: Dict[Tuple[str, str, str, str], Dict[str, float]] = {}
    peaks: Dict[Tuple[str, str, str, str, str], float] = {}
    chosen: Dict[Tuple[str, str, str, str], str] = {}
    for r in rows:
        if r["status"] != "ok" or not r["backend"] or r["value"] == "":
            continue
        key = (r["op"], r["shape"], r["dtype"], r["mode"])
        if r["backend"] == AUTO:
            if r["metric"] == "time_ms":
                chosen[key] = r.get("resolved", "") or "?"
                times.setdefault(key, {})[AUTO] = float(r["value"])
            elif r["metric"] == "peak_mib":
                peaks[key + (AUTO,)] = float(r["value"])
            continue
        if r["metric"] == "time_ms":
            times.setdefault(key, {})[r["backend"]] = float(r["value"])
        elif r["metric"] == "peak_mib":
            peaks[key + (r["backend"],)] = float(r["value"])
    found: Dict[Tuple[str, str, str, str], List[str]] = {}
    for key, auto in chosen.items():
        own = times[key][AUTO]
        faster = [(t, b) for b, t in times[key].items() if b not in (AUTO, auto) and t * SLOWER < own]
        if not faster:
            continue
        t, other = min(faster)
        op, shape, dtype, mode = key
        cell = f"{shape} {dtype}: {own:.3g} vs {t:.3g} ms"
        pa, po = peaks.get(key + (AUTO,)), peaks.get(key + (other,))
        if pa is not None and po is not None:
            cell += f", peak {pa:.3g} vs {po:.3g} MiB"
        found.setdefault((op, mode, auto, other), []).append(cell)
    notes = []
    for (op, mode, auto, other), cells in found.items():
        if other == "reference":
            why = ("auto never picks `reference`: it is the plain, unchunked version kept to check the "
                   "others (any dtype, float64 included), with no bound on memory as N grows; at small "
                   "sizes one unchunked call can beat the memory-bounded `torch` path, and on a busy CPU "
                   "single timings of a few ms differ by more than that")
        else:
            why = (f"auto ranks backends by priority, not by a measurement on this machine; to use "
                   f"{other} here pass backend=\"{other}\" or set FOLDOPS_BACKEND_{op.upper()}={other}")
        notes.append(f"{op} {mode}: auto's choice `{auto}` measured slower than `{other}` "
                     f"({'; '.join(cells)}). {why}.")
    return notes


def write_summary(path, rows: Sequence[Row], context: Dict[str, str]) -> None:
    """summary.md: how the run was made, and the table."""
    lines = ["# foldops bench", ""]
    for key, value in context.items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "Times are medians in ms. `peak MiB` is the most memory allocated during one run above what "
        "was allocated before it (inputs excluded). Errors are max |x - fp64 reference| / max |fp64 reference|, for the output "
        "(fwd) and for the input gradients (fwd+bwd); the `reference` backend's own error in this "
        "dtype is the plain-PyTorch baseline. The `auto` lines are what `backend=\"auto\"` gives "
        "(what a user gets), per mode: `auto runs` names the backend it resolved to, whose "
        "measurement they repeat.",
        "",
        format_table(rows, markdown=True),
        "",
    ]
    slower = auto_notes(rows)
    if slower:
        lines += ["## Where auto's choice measured slower", ""]
        lines += [f"- {note}" for note in slower]
        lines += [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
