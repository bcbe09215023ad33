"""Where the trainer reports to. herl_core returns and emits metrics; only flows/ talks to MLflow (style habit 11).

``MetricsSink`` is the small protocol; ``JsonlSink`` appends per-step metrics and experiences to files (the train
stage's DVC plots and outs); ``MultiSink`` fans out; flows/tracking.py supplies an MLflow sink.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import BaseModel

from herl_core.io import write_text_atomic


@runtime_checkable
class MetricsSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_records(self, name: str, records: Sequence[BaseModel], step: int) -> None: ...


class NullSink:
    """Discards everything."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None

    def log_records(self, name: str, records: Sequence[BaseModel], step: int) -> None:
        return None


class JsonlSink:
    """Appends ``{"step": s, **metrics}`` to ``<dir>/steps.jsonl`` and records to ``<dir>/<name>.jsonl``.

    Lines are appended and flushed per step; on resume, ``truncate_after(step)`` drops lines of steps that are
    about to be recomputed, so the files never hold a step twice. The folder is created at the first write, so a
    run that fails on bad input before its first step leaves nothing behind.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _append(self, name: str, rows: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"{name}.jsonl").open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._append("steps", [{"step": step, **metrics}])

    def log_records(self, name: str, records: Sequence[BaseModel], step: int) -> None:
        self._append(name, [r.model_dump(mode="json") for r in records])

    def truncate_after(self, step: int) -> None:
        """Keep only lines whose ``step`` is ≤ ``step`` (used when resuming from a checkpoint at ``step``)."""
        for path in self.folder.glob("*.jsonl"):
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row_step = json.loads(line).get("step")
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if row_step is None or row_step <= step:
                    kept.append(line)
            write_text_atomic(path, "".join(f"{k}\n" for k in kept))

    def reset(self) -> None:
        for path in self.folder.glob("*.jsonl"):
            path.unlink()


class MultiSink:
    def __init__(self, *sinks: MetricsSink):
        self.sinks = sinks

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for s in self.sinks:
            s.log_metrics(metrics, step)

    def log_records(self, name: str, records: Sequence[BaseModel], step: int) -> None:
        for s in self.sinks:
            s.log_records(name, records, step)
