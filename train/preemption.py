"""Graceful stops: SIGUSR1 (the time limit is near) and SIGTERM (preemption, `scontrol requeue`, a plain `kill`).

Both are caught from the first moment of `addpipe train` (before torch is imported). A signal only sets a flag; the loop reads it at the next step boundary, where every rank agrees (one small
all-reduce on a CPU group, so no GPU sync), writes a complete checkpoint and ends with REQUEUE_EXIT. The batch
script (slurm/train.sbatch) requeues the job on that status, and the requeued job resumes from the checkpoint.
Because the handler never interrupts work, a signal that arrives during a checkpoint write lets the write finish;
checkpoints are renamed into place only when complete (train/checkpoint.py) in any case.

Once the training loop has ended (exported, checkpointed for a requeue, or failed) while the command line still
holds the request, the signals are ignored for the rest of the process: a time-limit SIGUSR1 that comes during
the exit (Python restores the default action, which kills, while it shuts down) must not turn a finished run into
a failed job (exit 138).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

logger = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "try again later". The batch script requeues on it; nothing else exits with it.
REQUEUE_EXIT = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint: not a failure, the job should be requeued."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint {checkpoint} written; "
                         "resume with --resume (the SLURM batch script requeues the job itself)")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class StopRequest:
    """The signals' flag while installed (a context manager); `agreed()` is collective."""

    def __init__(self, signals=SIGNALS):
        self.depth = 0
        self.signals = signals
        self.received: Optional[int] = None
        self.previous: dict[int, object] = {}
        self._group = None
        self.owner = os.getpid()
        self.finished = False

    def _handle(self, number: int, frame) -> None:
        if os.getpid() != self.owner:  # a forked child (a loader worker before its init ran): the trainer decides
            return
        if self.received is None:
            self.received = number
            # logging from a signal handler can deadlock on the handler's lock; a plain write cannot
            os.write(2, f"addpipe: {signal.Signals(number).name} received on rank {os.environ.get('RANK', '0')}: checkpointing "
                        "at the end of this step, then stopping\n".encode())

    def __enter__(self) -> "StopRequest":
        self.depth += 1
        if self.depth > 1:  # installed already (by the command line, before its imports): keep what it caught
            if self.finished and threading.current_thread() is threading.main_thread():
                for number in self.signals:  # a second run in the same process: catch them again
                    signal.signal(number, self._handle)
            self.finished = False
            return self
        self.owner = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        if self.depth:  # the run inside is over; the command line still holds the request until the process ends
            self.finished = True
            if threading.current_thread() is threading.main_thread():
                for number in self.signals:  # SIG_IGN, unlike a Python handler, survives the interpreter's exit
                    signal.signal(number, signal.SIG_IGN)
            return
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal"

    def agreed(self) -> bool:
        """Collective: True on every rank once any rank has received a signal. SLURM signals every task, but not
        at the same instant, and a rank alone on the signal would leave the others waiting in a collective."""
        import torch
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received is not None
        if self._group is None:  # a CPU group, so the check never waits on the GPU's queue
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        flag = torch.tensor([0 if self.received is None else self.received], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return bool(flag.item())


# One per process: `addpipe train` installs it before its heavy imports (a signal in the seconds of start-up would
# otherwise kill the task with SIGUSR1's default action), and the training loop enters it again.
STOP = StopRequest()
