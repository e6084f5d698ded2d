"""Host synchronisations per training step: the calls that make the CPU wait for the device (.item(), float(),
bool(), .tolist(), .cpu(), .numpy() on a tensor), counted on the CPU while the trainer runs tiny models, with
the places that make them. On a GPU each one drains the launch queue, so a step with none keeps the GPU fed.

    .venv/bin/python benchmarks/host_syncs.py [--steps 12] [--log-every 6] [--backend deepspeed|fsdp2]

A CPU cannot time what a sync costs on a GPU; it can count them exactly, which is what this reports.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYNCING = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


class SyncCounter:
    """Wraps the syncing Tensor methods; counts calls (and their first caller outside torch) while `on`."""

    def __init__(self):
        self.on, self.calls, self.places = False, 0, collections.Counter()
        self.originals = {name: getattr(torch.Tensor, name) for name in SYNCING}
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def wrapped(tensor, *args, **kwargs):
            if self.on and not self._inside and not self._host_side():
                self.calls += 1
                self.places[f"{name} at {self._caller()}"] += 1
            self._inside = True
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._inside = False
        return wrapped

    _inside = False

    @staticmethod
    def _host_side() -> bool:
        """Reads of tensors that stay on the CPU on a GPU run too, so wait for nothing: torch.optim's AdamW step
        counters, and the step's noise, drawn on the CPU from (seed, step), which ADD's backward simulation reads to
        decide how many student forwards to run."""
        for frame in traceback.extract_stack()[:-2]:
            if "/torch/optim/" in frame.filename:
                return True
            if frame.filename.endswith("train/methods/add/method.py") and frame.name == "simulate":
                return True
        return False

    @staticmethod
    def _caller() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" not in frame.filename and "host_syncs.py" not in frame.filename:
                path = Path(frame.filename)
                parts = path.parts
                where = "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else \
                    str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
                return f"{where}:{frame.lineno}"
        return "torch"

    def restore(self):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=6)
    parser.add_argument("--backend", default="deepspeed")
    args = parser.parse_args()

    from addpipe.config import load
    from addpipe.dataprep.digits import write_digit_shards
    from addpipe.train.config import TrainConfig
    from addpipe.train.loop import Trainer
    from addpipe.train.tiny import build_tiny_dinov2, build_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="addpipe_syncs_"))
    shards = write_digit_shards(work / "shards", 100, 32, 25)
    teacher = build_tiny_pipeline(work / "teacher", "sd", latent_size=16)
    dino = build_tiny_dinov2(work / "dino", image_size=32)
    config = load(TrainConfig, REPO / "configs/tiny.yaml", [
        f"run_dir={work / 'run'}", f"steps={args.steps}", f"model.teacher={teacher}", f"discriminator.feature_network={dino}",
        f"data.shards={shards}", "data.num_workers=0", f"engine.backend={args.backend}", f"log.every={args.log_every}",
        "log.sample_every=0", "log.progress=false", "log.tensorboard=false", f"checkpoint.every={10**6}"])
    trainer = Trainer(config)
    counter = SyncCounter()
    step = trainer.train_step
    marks = []  # the count when each training step starts: an iteration of the loop is what lies between two

    def marked_step():
        marks.append(counter.calls)
        return step()

    def uncounted(method):  # checkpoints and the export copy everything to the host, by design
        def call(*args, **kwargs):
            counter.on = False
            try:
                return method(*args, **kwargs)
            finally:
                counter.on = True
        return call

    trainer.train_step, trainer.save, trainer.export = marked_step, uncounted(trainer.save), uncounted(trainer.export)
    counter.on = True
    trainer.run()  # the loop's iterations, then the final checkpoint and export
    counter.on = False
    counter.restore()
    per_iteration = [b - a for a, b in zip(marks, marks[1:])]  # iteration i: step i+1, its reports and any flush
    log_steps = [i for i in range(len(per_iteration)) if (i + 1) % args.log_every == 0]
    plain = [n for i, n in enumerate(per_iteration) if i not in log_steps]
    print(f"machine: {platform.node()}, python {platform.python_version()}, torch {torch.__version__}; "
          f"backend {args.backend}, {args.steps} steps, log every {args.log_every}")
    print(f"host synchronisations per loop iteration (step, reports, checks): {per_iteration}")
    print(f"  ordinary steps: max {max(plain[1:] or plain)}; steps that flush the log: "
          f"{[per_iteration[i] for i in log_steps]}")
    print("where, over the loop (checkpoint and export left out):")
    for place, count in counter.places.most_common(12):
        print(f"  {count:4d}  {place}")


if __name__ == "__main__":
    sys.exit(main())
