"""Metrics of a run: ``metrics.csv`` with the hosted API's columns, and ``loss.png``.

Rows are appended as training goes (one write per row, flushed, so a reader
sees whole rows); the file is rewritten atomically on resume (dropping rows
after the checkpoint) and at the end. Validation columns are empty on the
steps where no validation ran, as in the hosted API's result file.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from tunesmith.atomic import atomic_file

COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy", "tokens", "elapsed_s"]


class MetricsLog:
    """The run's metric rows, in memory and in ``metrics.csv``."""

    def __init__(self, path: Path, rows: list[dict] | None = None):
        self.path = Path(path)
        self.rows: list[dict] = list(rows or [])

    @classmethod
    def resume(cls, path: Path, up_to_step: int) -> "MetricsLog":
        """Reload ``path`` keeping rows up to ``up_to_step`` (later ones were never checkpointed)."""
        rows = [row for row in read_metrics(path) if row["step"] <= up_to_step]
        log = cls(path, rows)
        log.rewrite()
        return log

    def append(self, row: dict) -> None:
        """Add one step's row and append it to the CSV."""
        row = {column: row.get(column) for column in COLUMNS}
        self.rows.append(row)
        new_file = not self.path.exists()
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            handle.write(_render(row, header=new_file))
            handle.flush()

    def rewrite(self) -> None:
        """Write the whole CSV atomically."""
        with atomic_file(self.path, "w", encoding="utf-8", newline="") as handle:
            handle.write(",".join(COLUMNS) + "\r\n")
            for row in self.rows:
                handle.write(_render(row, header=False))

    def last(self, column: str) -> float | None:
        """The latest non-empty value of ``column``."""
        for row in reversed(self.rows):
            if row.get(column) is not None:
                return row[column]
        return None

    def plot(self, target: Path) -> None:
        """Draw train (and validation) loss by step into ``target`` (PNG, written atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
        steps = [r["step"] for r in self.rows if r["train_loss"] is not None]
        axis.plot(steps, [r["train_loss"] for r in self.rows if r["train_loss"] is not None],
                  label="train loss", linewidth=1)
        valid = [(r["step"], r["valid_loss"]) for r in self.rows if r["valid_loss"] is not None]
        if valid:
            axis.plot(*zip(*valid), marker="o", label="validation loss")
        axis.set_xlabel("step")
        axis.set_ylabel("loss (assistant tokens)")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        with atomic_file(target, "wb") as handle:
            handle.write(buffer.getvalue())


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.csv`` as dicts of numbers (None for empty cells)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8", newline="") as handle:
        for raw in csv.DictReader(handle):
            if not raw.get("step"):
                continue
            row = {column: _number(raw.get(column)) for column in COLUMNS}
            row["step"] = int(row["step"])
            rows.append(row)
    return rows


def _render(row: dict, *, header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if header:
        writer.writerow(COLUMNS)
    writer.writerow(["" if row.get(c) is None else _format(row[c]) for c in COLUMNS])
    return buffer.getvalue()


def _format(value) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def _number(text: str | None):
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)
