"""Metric loggers: JSONL and CSV built in; TensorBoard and W&B when installed.

A logger has ``log_hyperparams(dict)``, ``log_metrics(dict, step)``, ``flush()`` (called
before every checkpoint is written, so that the files hold every row the checkpoint
accounts for), ``truncate_after(step, keep_at_step=None)`` (a resumed run drops what the
interrupted run wrote after its checkpoint: rows of later steps, and rows of the
checkpoint's own step beyond the first ``keep_at_step``) and ``close()``. The Trainer calls
them on rank 0 only. Any object with these methods can be passed to
``Trainer(loggers=[...])``; ``flush`` and the ``keep_at_step`` argument are optional.
"""

from __future__ import annotations

import csv
import importlib.util
import inspect
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


class Logger:
    """Base class: every method is optional."""

    def log_hyperparams(self, params: Dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def truncate_after(self, step: int, keep_at_step: Optional[int] = None) -> None:
        pass

    def close(self) -> None:
        pass


class _RowFilter:
    """Keeps rows of steps before ``step`` and the first ``keep_at_step`` rows of ``step``."""

    def __init__(self, step: int, keep_at_step: Optional[int]) -> None:
        self.step, self.keep_at_step, self.seen_at_step = step, keep_at_step, 0

    def keep(self, row_step: float) -> bool:
        if row_step < self.step:
            return True
        if row_step > self.step:
            return False
        self.seen_at_step += 1
        return self.keep_at_step is None or self.seen_at_step <= self.keep_at_step


def flush_logger(lg: Any) -> None:
    fn = getattr(lg, "flush", None)
    if callable(fn):
        fn()


def truncate_logger(lg: Any, step: int, keep_at_step: Optional[int]) -> None:
    """``lg.truncate_after(step, keep_at_step=...)``, or ``(step)`` for loggers without that argument."""
    fn = getattr(lg, "truncate_after", None)
    if not callable(fn):
        return
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []
    if any(p.name == "keep_at_step" or p.kind is p.VAR_KEYWORD for p in params):
        fn(step, keep_at_step=keep_at_step)
    else:
        fn(step)


_FLUSH_S = 1.0  # a killed run loses at most this much of its rows; close() flushes


def _flush_due(logger: Any, now: float) -> bool:
    if now - logger._last_flush >= logger.flush_s:
        logger._last_flush = now
        return True
    return False


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no NaN/inf
    return x


class JSONLLogger(Logger):
    """One JSON object per line: ``{"step": ..., "<metric>": value, ...}`` in ``metrics.jsonl``.

    Rows are flushed to the file at most every ``flush_s`` seconds (and on ``close()``).
    """

    def __init__(self, log_dir: os.PathLike, filename: str = "metrics.jsonl", flush_s: float = _FLUSH_S) -> None:
        self.path = Path(log_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_s = flush_s
        self._last_flush = time.monotonic()
        self._file = None

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def log_hyperparams(self, params: Dict[str, Any]) -> None:
        with open(self.path.with_name("hparams.json"), "w", encoding="utf-8") as f:
            json.dump(params, f, indent=2, default=str)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        row = {"step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        f = self._open()
        f.write(json.dumps(row) + "\n")
        if _flush_due(self, time.monotonic()):
            f.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._last_flush = time.monotonic()

    def truncate_after(self, step: int, keep_at_step: Optional[int] = None) -> None:
        self.close()
        if not self.path.exists():
            return
        kept = []
        rows = _RowFilter(step, keep_at_step)
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    if rows.keep(json.loads(line).get("step", 0)):
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError, TypeError):
                    continue  # a line torn by a kill
        _rewrite(self.path, "".join(kept))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CSVLogger(Logger):
    """A wide ``metrics.csv`` (one column per metric, a row per logging step).

    When a new metric appears the file is rewritten with the wider header, as Lightning's
    CSVLogger does; cells a row did not log are empty. Rows are flushed at most every
    ``flush_s`` seconds (and on ``close()``).
    """

    def __init__(self, log_dir: os.PathLike, filename: str = "metrics.csv", flush_s: float = _FLUSH_S) -> None:
        self.path = Path(log_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_s = flush_s
        self._last_flush = time.monotonic()
        self.columns: List[str] = ["step"]
        self._file = None  # kept open between rows; closed before any read or rewrite
        self._writer = None
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            if header:
                self.columns = header

    def _rows(self) -> List[Dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def _write_all(self, rows: Sequence[Dict[str, Any]]) -> None:
        import io

        self.close()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        _rewrite(self.path, buf.getvalue())

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        row = {"step": step, **metrics}
        new = [k for k in row if k not in self.columns]
        if new or (self._file is None and not self.path.exists()):
            self.close()
            rows = self._rows()
            self.columns = self.columns + new
            self._write_all(rows + [row])
            return
        if self._file is None:
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            self._writer = csv.DictWriter(self._file, fieldnames=self.columns, restval="")
        self._writer.writerow(row)
        if _flush_due(self, time.monotonic()):
            self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._last_flush = time.monotonic()

    def truncate_after(self, step: int, keep_at_step: Optional[int] = None) -> None:
        self.close()
        keep = _RowFilter(step, keep_at_step)
        rows = [r for r in self._rows() if r.get("step") and keep.keep(int(float(r["step"])))]
        if self.path.exists():
            self._write_all(rows)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None


class TensorBoardLogger(Logger):
    """Scalars to TensorBoard event files (needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: os.PathLike) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ImportError("loggers: 'tensorboard' needs the tensorboard package: pip install tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(log_dir) / "tensorboard"))

    def log_hyperparams(self, params: Dict[str, Any]) -> None:
        self.writer.add_text("hparams", json.dumps(params, indent=2, default=str))

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()

    def truncate_after(self, step: int, keep_at_step: Optional[int] = None) -> None:
        # TensorBoard hides events past a restart step itself (purge_step); rows of the
        # checkpoint's own step are kept whole.
        self.writer.close()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=self.writer.log_dir, purge_step=step + 1)

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """Weights & Biases (needs the ``wandb`` package and a login or WANDB_MODE=offline)."""

    def __init__(self, log_dir: os.PathLike, run_name: Optional[str] = None, config: Optional[dict] = None) -> None:
        if importlib.util.find_spec("wandb") is None:
            raise ImportError("loggers: 'wandb' needs the wandb package: pip install wandb")
        import wandb

        self.run = wandb.init(dir=str(log_dir), name=run_name, config=config, resume="allow")

    def log_hyperparams(self, params: Dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def make_loggers(names: Sequence[str], log_dir: Optional[os.PathLike], run_name: Optional[str] = None,
                 config: Optional[dict] = None) -> List[Logger]:
    """The built-in loggers named in ``names`` (none of the file ones without a log_dir)."""
    if log_dir is None:
        return []
    out: List[Logger] = []
    for name in names:
        if name == "jsonl":
            out.append(JSONLLogger(log_dir))
        elif name == "csv":
            out.append(CSVLogger(log_dir))
        elif name == "tensorboard":
            out.append(TensorBoardLogger(log_dir))
        elif name == "wandb":
            out.append(WandbLogger(log_dir, run_name=run_name, config=config))
        else:
            raise ValueError(f"loggers: unknown logger {name!r}")
    return out


def available_loggers() -> List[str]:
    """Names usable on this machine."""
    names = ["jsonl", "csv"]
    for optional in ("tensorboard", "wandb"):
        if importlib.util.find_spec(optional) is not None:
            names.append(optional)
    return names


def _rewrite(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    # Atomic (a reader never sees half a file); no fsync: logs are not worth a disk flush.
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)
