"""Metrics: one JSON record per line in `RUN_DIR/metrics.jsonl`, mirrored to TensorBoard.

    tensorboard --logdir RUN_DIR/tb
    python -c "import json; [print(json.loads(l)) for l in open('RUN_DIR/metrics.jsonl')]"

On resume, records past the checkpoint's step are dropped first, so the log of
a resumed run reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.fileio import atomic_write_text


class MetricsLogger:
    def __init__(self, run_dir: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill -9 mid-write
                if resume_step is not None and rec.get("step", 0) <= resume_step:
                    keep.append(line)
            atomic_write_text(self.path, "".join(f"{line}\n" for line in keep))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for the run; close() ends it)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=(resume_step + 1) if resume_step else None)
        except ImportError:  # tensorboard is optional at run time; the JSONL log is the record
            self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
