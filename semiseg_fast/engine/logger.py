"""Scalar logging: TensorBoard when it is installed, else a CSV file in the run directory."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..fileio import atomic_write_text


class ScalarLogger:
    def __init__(self, run_dir: str | os.PathLike, backend: str = "auto", after_step: int | None = None):
        """``after_step``: a resumed run continues ``metrics.csv`` from that iteration, dropping the
        rows a killed run wrote after its last checkpoint (they would be written again)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if backend not in ("auto", "tensorboard", "csv"):
            raise ValueError(f"log backend must be auto, tensorboard or csv, got {backend!r}")
        if backend in ("auto", "tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
            except (ImportError, ModuleNotFoundError):
                if backend == "tensorboard":
                    raise ImportError("log backend 'tensorboard' needs the tensorboard package") from None
        self.backend = "tensorboard" if self._tb is not None else "csv"
        # The CSV is written in both cases: it is what tests and scripts read back. It is opened per
        # call (every log_every iterations), so no handle outlives a crash or a finished run.
        self._csv_path = self.run_dir / "metrics.csv"
        if not self._csv_path.is_file() or self._csv_path.stat().st_size == 0:
            with open(self._csv_path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "tag", "value"])
        elif after_step is not None:
            with open(self._csv_path, newline="") as f:
                rows = list(csv.reader(f))
            kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= after_step]
            if len(kept) != len(rows):
                text = io.StringIO()
                csv.writer(text).writerows(kept)
                atomic_write_text(self._csv_path, text.getvalue())

    def log(self, step: int, scalars: dict[str, float]) -> None:
        with open(self._csv_path, "a", newline="") as f:
            writer = csv.writer(f)
            for tag, value in scalars.items():
                writer.writerow([step, tag, f"{float(value):.6g}"])
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, float(value), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
