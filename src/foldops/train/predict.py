"""The prediction-writer protocol.

A writer is any object with ``write(prediction, batch)``; the Trainer calls it once per
batch, on every rank (each rank writes its share, as Lightning's writers do), with the
prediction on the device and the batch as the loader gave it, moved to the device.
Optional ``setup(trainer)`` and ``close()`` are called around the loop.

Lightning ``BasePredictionWriter`` subclasses (Boltz's ``BoltzWriter`` and friends) work
unchanged: when an object has no ``write`` but a ``write_on_batch_end``, it is called as
Lightning calls it, and ``on_predict_epoch_end`` at the end.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable


@runtime_checkable
class PredictionWriter(Protocol):
    def write(self, prediction: Any, batch: Any) -> None: ...


def check_writer(writer: Any) -> None:
    if writer is None:
        return
    if not (callable(getattr(writer, "write", None)) or callable(getattr(writer, "write_on_batch_end", None))):
        raise TypeError(
            f"writer: expected an object with write(prediction, batch) (or a Lightning "
            f"BasePredictionWriter), got {type(writer).__name__}"
        )


def writer_setup(writer: Any, trainer: Any) -> None:
    setup = getattr(writer, "setup", None)
    if callable(setup) and callable(getattr(writer, "write", None)):
        setup(trainer)


def writer_write(writer: Any, prediction: Any, batch: Any, batch_idx: int, trainer: Any, model: Any) -> None:
    write = getattr(writer, "write", None)
    if callable(write):
        write(prediction, batch)
        return
    writer.write_on_batch_end(trainer, model, prediction, None, batch, batch_idx, 0)


def writer_close(writer: Any, trainer: Any, model: Any) -> None:
    if callable(getattr(writer, "write", None)):
        close = getattr(writer, "close", None)
        if callable(close):
            close()
        return
    end = getattr(writer, "on_predict_epoch_end", None)
    if callable(end):
        end(trainer, model)


def optional_writer(writer: Optional[Any]) -> Optional[Any]:
    check_writer(writer)
    return writer
