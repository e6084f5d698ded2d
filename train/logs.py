"""Readable logs from many ranks: rank 0 speaks, the others only warn, each warning once, libraries' noise off.

On 64 ranks every per-rank line becomes 64 lines: loading bars, a deprecation warning from inside DeepSpeed per
collective, torch's "no CUDA runtime" note on CPU ranks. What a person needs from the other ranks is what went
wrong on them, once.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Warnings about libraries' own internals (DeepSpeed calling a deprecated torch collective, and the like): they
# say nothing the user of addpipe can act on.
LIBRARY_NOISE = (DeprecationWarning, FutureWarning)
# Loggers that speak at import or load time on every rank.
CHATTY = {"torch.utils.cpp_extension": logging.ERROR, "torch.distributed.elastic": logging.WARNING}


class Once(logging.Filter):
    """Passes each distinct (logger, level, message) once."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def configure(rank: int) -> None:
    """Call once per process, before the models (and DeepSpeed) are imported."""
    for category in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", category=category)
    for name, level in CHATTY.items():
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:  # "Loading weights" / "Writing model shards" bars, per model, per rank
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    if rank == 0:
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    once = Once()
    for handler in root.handlers or [logging.StreamHandler(sys.stderr)]:
        handler.addFilter(once)
        if handler not in root.handlers:
            root.addHandler(handler)


class Progress:
    """Training progress for a person: a bar on a terminal; in a batch job's log file (not a terminal, where a bar's
    carriage returns make one endless line) a plain line at most every `every` seconds and at the end."""

    def __init__(self, total: int, initial: int, name: str, shown: bool, every: float = 30.0):
        from tqdm.auto import tqdm

        self.total, self.name, self.every = total, name, every
        self.terminal, self.shown, self.last_line = sys.stderr.isatty(), shown, 0.0
        self.bar = tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True, disable=not (shown and self.terminal))

    def losses(self, step: int, losses: dict[str, str], now: float) -> None:
        """The log window's mean losses, at `step` (time.perf_counter() `now`)."""
        self.bar.set_postfix(losses)
        if self.shown and not self.terminal and (now - self.last_line >= self.every or step == self.total):
            self.last_line = now
            logging.getLogger("addpipe.train.loop").info("%s step %d/%d: %s", self.name, step, self.total,
                                                          ", ".join(f"{k} {v}" for k, v in losses.items()))

    def update(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
