"""Observability: one `report(name, value)` API feeding metrics.jsonl and TensorBoard, and the NaN stop.

Values are accumulated between flushes and averaged over steps and over ranks (every rank flushes at
the same steps, so the all-reduce lines up). A run that continues from step N first cuts metrics.jsonl
(and TensorBoard, by its purge step) back to step N, since what was logged after the checkpoint is about
to be logged again; the accumulator itself is part of the checkpoint, so a log window that spans the
interruption averages exactly the steps it would have without it.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

from addpipe.files import write_text_atomic
from addpipe.train import distributed
from addpipe.train.rundir import RunDirError, describe_write_error


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; the run stops and keeps its last good checkpoint."""


def trim_metrics(path: Path, last_step: int) -> int:
    """Keep the lines of a metrics.jsonl up to `last_step` (atomically); a torn last line goes too. -> lines kept."""
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a crash
            break
        if record.get("step", 0) > last_step:
            break
        kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return len(kept)


class Reporter:
    def __init__(self, run_dir: Path, tensorboard: bool = True, start_step: int = 0):
        """`start_step`: the step this run continues from (0 for a new run); what was logged after it is dropped."""
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.main = distributed.is_main()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if self.main:
            try:
                trim_metrics(self.path, start_step)
            except OSError as error:
                raise RunDirError(describe_write_error(self.path, error)) from None
        if self.main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)

    def report(self, name: str, value: float | torch.Tensor) -> None:
        if isinstance(value, torch.Tensor):
            value = float(value.detach().float().item())
        self.sums[name] += float(value)
        self.counts[name] += 1

    def flush(self, step: int, device: torch.device) -> dict[str, float]:
        """Average what was reported since the last flush over steps and ranks; write it on rank 0."""
        names = sorted(self.sums)
        packed = torch.tensor([[self.sums[n], self.counts[n]] for n in names] or [[0.0, 0.0]],
                              dtype=torch.float64, device=device)
        distributed.all_reduce_sum(packed)
        means = {n: packed[i, 0].item() / max(packed[i, 1].item(), 1.0) for i, n in enumerate(names)}
        self.sums.clear()
        self.counts.clear()
        if self.main and means:
            try:
                with self.path.open("a") as handle:
                    handle.write(json.dumps({"step": step, "time": time.time(), **means}) + "\n")
            except OSError as error:
                raise RunDirError(describe_write_error(self.path, error)) from None
            if self.writer is not None:
                for name, value in means.items():
                    self.writer.add_scalar(name, value, step)
                self.writer.flush()
        return means

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def state_dict(self) -> dict:
        """What was reported since the last flush, on this rank (saved in its checkpoint)."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def global_state(self, device: torch.device) -> dict:
        """Collective: the accumulator summed over all ranks. A checkpoint keeps this (rank 0 loads it back), so a
        run resumed on another number of ranks averages the same steps."""
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for part in distributed.all_gather_objects(self.state_dict()):
            for name, value in part["sums"].items():
                sums[name] += value
            for name, value in part["counts"].items():
                counts[name] += value
        return {"sums": dict(sums), "counts": dict(counts)}

    def load_state_dict(self, state: dict) -> None:
        self.sums = defaultdict(float, state["sums"])
        self.counts = defaultdict(int, state["counts"])


_current: Optional[Reporter] = None


def use(reporter: Optional[Reporter]) -> None:
    global _current
    _current = reporter


def report(name: str, value: float | torch.Tensor) -> None:
    """Record a scalar for the next flush; a no-op outside a training run."""
    if _current is not None:
        _current.report(name, value)


def check_finite(step: int, terms: dict[str, torch.Tensor], device: torch.device, last_checkpoint: Optional[Path]) -> None:
    """Stop every rank together when any rank sees a NaN/Inf loss term. `step` counts from 1, as metrics do."""
    bad = [name for name, value in terms.items() if not math.isfinite(float(value.detach().float().item()))]
    if distributed.any_rank(bool(bad), device):
        where = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else "; no checkpoint was written yet"
        names = ", ".join(f"{n}={float(terms[n].detach()):.4g}" for n in bad) or "on another rank"
        raise NonFiniteLossError(f"non-finite loss at step {step} ({names}); stopping{where}")
