"""Observability: one `report(name, value)` API feeding metrics.jsonl and TensorBoard, and the NaN stop.

Values are accumulated between flushes and averaged over steps and over ranks (every rank flushes at
the same steps, so the all-reduce lines up). A tensor is accumulated where it lives, so a training step waits for
the device only at a flush (one host synchronisation per log window, not one per value per step); the NaN stop
is checked the same way, at every flush and before every checkpoint. A run that continues from step N first cuts metrics.jsonl
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
from addpipe.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
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
        self.sums: dict[str, float | torch.Tensor] = defaultdict(float)
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
        # a tensor stays on its device (float64, as Python's floats): no host synchronisation until the flush
        self.sums[name] = self.sums[name] + (value.detach().double() if isinstance(value, torch.Tensor) else float(value))
        self.counts[name] += 1

    def flush(self, step: int, device: torch.device) -> dict[str, float]:
        """Average what was reported since the last flush over steps and ranks; write it on rank 0."""
        names = sorted(self.sums)
        packed = torch.stack([torch.stack([torch.as_tensor(self.sums[n], dtype=torch.float64, device=device).reshape(()),
                                           torch.tensor(float(self.counts[n]), dtype=torch.float64, device=device)])
                              for n in names]) if names else torch.zeros((1, 2), dtype=torch.float64, device=device)
        distributed.all_reduce_sum(packed)
        rows = packed.tolist()  # the window's one host synchronisation
        means = {n: rows[i][0] / max(rows[i][1], 1.0) for i, n in enumerate(names)}
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
        return {"sums": {n: float(v) for n, v in self.sums.items()}, "counts": dict(self.counts)}

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


class FiniteGuard:
    """The NaN stop without a host synchronisation per step: each step's loss terms are kept on the device and
    checked together (`check`, collective) at every log flush and before every checkpoint, so a non-finite loss
    stops all ranks within one log window and never reaches a checkpoint. The error names the first step (counted
    from 1, as metrics are) and term that went non-finite on any rank."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, list[str], torch.Tensor]] = []

    def add(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        names = sorted(terms)
        if names:
            self.pending.append((step, names, torch.stack([terms[n].detach().float().reshape(()) for n in names])))

    def check(self, device: torch.device, last_checkpoint: Optional[Path]) -> None:
        found: Optional[tuple[int, str]] = None
        if self.pending:
            finite = torch.stack([torch.isfinite(values).all() for _, _, values in self.pending]).tolist()
            for (step, names, values), ok in zip(self.pending, finite):
                if not ok:
                    shown = [f"{n}={v:.4g}" for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
                    found = (step, ", ".join(shown))
                    break
        self.pending.clear()
        if not distributed.any_rank(found is not None, device):
            return
        seen = [f for f in distributed.all_gather_objects(found) if f is not None]
        step = min(f[0] for f in seen)
        names = (found[1] if found is not None and found[0] == step else "") or "on another rank"
        where = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else "; no checkpoint was written yet"
        raise NonFiniteLossError(f"non-finite loss at step {step} ({names}); stopping{where}")
