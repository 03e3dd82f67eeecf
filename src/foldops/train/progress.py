"""A dependency-free progress bar: step, loss, throughput, ETA (rank 0 only).

On a terminal it redraws one line at most every ``refresh_s``; in a log file (not a TTY)
it prints a line every ``log_interval_s`` instead of filling the file with carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional, TextIO

import torch


def _fmt_time(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class ProgressBar:
    def __init__(self, total_steps: Optional[int], *, enabled: bool = True, stream: Optional[TextIO] = None,
                 refresh_s: float = 0.5, log_interval_s: float = 30.0, width: int = 24) -> None:
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.refresh_s = refresh_s if self.tty else log_interval_s
        self.width = width
        self._last_draw = 0.0
        self._rate_t0: Optional[float] = None
        self._rate_step0 = 0
        self._samples = 0
        self._samples_t0: Optional[float] = None
        self.steps_per_s = float("nan")
        self.samples_per_s = float("nan")
        self._drawn = False

    def start(self, step: int) -> None:
        now = time.perf_counter()
        self._rate_t0 = now
        self._rate_step0 = step
        self._samples_t0 = now
        self._samples = 0

    def add_samples(self, n: Optional[int]) -> None:
        if n:
            self._samples += n

    def _rates(self, step: int, now: float) -> None:
        if self._rate_t0 is None:
            self.start(step)
            return
        elapsed = now - self._rate_t0
        if elapsed > 0 and step > self._rate_step0:
            self.steps_per_s = (step - self._rate_step0) / elapsed
            self.samples_per_s = self._samples / (now - self._samples_t0)

    def update(self, step: int, epoch: int, loss: Any = None, extra: Optional[Dict[str, Any]] = None,
               force: bool = False) -> None:
        """Cheap unless a redraw is due; only then is ``loss`` read (a device sync)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < self.refresh_s:
            return
        self._rates(step, now)
        self._last_draw = now
        parts = [f"epoch {epoch}"]
        if self.total:
            frac = min(1.0, step / self.total)
            filled = int(frac * self.width)
            parts.append(f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{self.total}")
        else:
            parts.append(f"step {step}")
        if loss is not None:
            parts.append(f"loss {format_value(_scalar(loss))}")
        for k, v in (extra or {}).items():
            parts.append(f"{k} {format_value(_scalar(v))}")
        if self.steps_per_s == self.steps_per_s:
            parts.append(f"{self.steps_per_s:.2f} it/s")
        if self.samples_per_s == self.samples_per_s and self._samples:
            parts.append(f"{self.samples_per_s:.1f} samples/s")
        if self.total and self.steps_per_s == self.steps_per_s and self.steps_per_s > 0:
            parts.append(f"ETA {_fmt_time((self.total - step) / self.steps_per_s)}")
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def format_value(x: float) -> str:
    """Four decimals (``0.7330``, ``12.5000``), so that successive values line up; scientific
    notation with four decimals outside [1e-3, 1e5) (``3.2100e-05``)."""
    if x != x or x in (float("inf"), float("-inf")) or x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4f}"
    return f"{x:.4e}"


def _scalar(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item())
    return float(v)
