"""Run by test_distributed.py, under torchrun (a backend) or alone (the plain-PyTorch reference).

    python dist_worker.py train CONFIG REPORT [--resume] overrides...    # Trainer.run on any backend
    python dist_worker.py reference CONFIG REPORT overrides...            # the same ADD steps, no backend at all
    python dist_worker.py batch JOBS.json                                  # several train runs in one launch

A batch runs its jobs one after another in the same process group ({"config", "report", "overrides", "resume",
"copy": [from, to] before the run}): a torchrun launch costs about twenty seconds before the first step, so a test
module starts one for all of its two-rank runs.

Each writes a JSON report: world size, the student's local and full parameter counts, the losses of every step and,
after a resume, a digest of the student's parameters as loaded (before any further step).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from typing import Any

import torch
import torch.nn as nn

from addpipe.config import load
from addpipe.train import distributed
from addpipe.train.backends.base import Backend, OptimizerSettings, StateBytes, Trained
from addpipe.train.config import TrainConfig

ORIGINAL_LINEAR = torch.nn.functional.linear


def digest(state: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(state[k].float().numpy().tobytes() for k in sorted(state))).hexdigest()


class PlainTrained(Trained):
    """One module, AdamW, the schedule, global-norm clipping: what every backend must amount to on one process."""

    def __init__(self, name: str, module: nn.Module, trainable: list[nn.Parameter], settings: OptimizerSettings):
        self.name, self.module, self.trainable, self.settings = name, module, trainable, settings
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, settings.schedule)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        if self.settings.gradient_clipping > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.gradient_clipping)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def learning_rate(self):
        return self.optimizer.param_groups[0]["lr"]

    def local_tensors(self):
        return [p.data for p in self.module.parameters()]

    def full_state_dict(self):
        return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}

    def set_hyperparameters(self, settings): raise NotImplementedError("the reference never resumes")
    def checkpoint_state(self): raise NotImplementedError("the reference never checkpoints")
    def load_checkpoint_state(self, load): raise NotImplementedError("the reference never resumes")
    def parameter_entries(self, prefix, tensors): raise NotImplementedError("the reference never checkpoints")
    def load_parameter_entries(self, prefix, load): raise NotImplementedError("the reference never resumes")
    def optimizer_steps(self): return 0
    def set_optimizer_steps(self, steps): raise NotImplementedError("the reference never resumes")


class PlainBackend(Backend):
    name = "plain"

    @classmethod
    def create(cls, config, device, dtype):
        return cls()

    @staticmethod
    def shards_weights(engine):
        return False

    @staticmethod
    def state_bytes(engine, params, dtype, world, sharded, ema):  # replicated AdamW, as a one-process run holds it
        master = 4 if dtype.itemsize != 4 else 0
        return StateBytes(dtype.itemsize * params, dtype.itemsize * params, (master + 8) * params, 4 * params if ema else 0)

    def wrap(self, name: str, module: nn.Module, trainable: list[nn.Parameter], settings: OptimizerSettings,
             shard: bool) -> Trained:
        return PlainTrained(name, module, trainable, settings)

    def place_frozen(self, module: nn.Module, shard: bool) -> nn.Module:
        return module


def reference(config: TrainConfig) -> dict[str, Any]:
    """The ADD steps with no backend, no loop, no checkpoints: batch, phases, optimizer steps."""
    from addpipe.train.data import TrainingData
    from addpipe.train.methods.add.method import ADD

    torch.manual_seed(config.seed)
    method = ADD(config, torch.device("cpu"), torch.float32)
    models = method.build(PlainBackend())
    data = TrainingData(config.data, 0, 1)
    losses, times = [], []
    for step in range(config.steps):
        started = time.perf_counter()
        state = method.begin_step(next(data), step)
        terms = {}
        for phase in method.phases():
            if step % phase.interval:
                continue
            others = [p for name, m in models.items() if name != phase.model for p in m.trainable]
            for p in others:
                p.requires_grad_(False)
            found = phase.run(state)
            models[phase.model].backward(found[phase.total])
            models[phase.model].step()
            for p in others:
                p.requires_grad_(True)
            terms.update({k: float(v) for k, v in found.items()})
        times.append(time.perf_counter() - started)
        losses.append(terms)
    return {"losses": losses, "step_seconds": times, "peak_rss_mib": peak_rss_mib(),
            "student": {k: v.tolist() for k, v in models["student"].full_state_dict().items()}}


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(config: TrainConfig, resume: bool) -> dict[str, Any]:
    from addpipe.train.loop import Trainer

    trainer = Trainer(config, resume=resume)
    student = trainer.models["student"]
    local = sum(t.numel() for t in student.local_tensors())
    full = sum(p.numel() for p in student.module.parameters()) if not student.shards_parameters else None
    if full is None:  # sharded: the whole count, from the shapes every backend reports per parameter
        full = sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for p in student.module.parameters())
    names = [n for n, _ in student.module.named_parameters()]
    parameters = lambda state: {n: state[n] for n in names}  # noqa: E731 (parameters only: what checkpoints hold)
    loaded = student.full_state_dict()
    ema = None
    if trainer.ema is not None:  # the EMA as loaded, made whole
        with trainer.ema.applied(student.local_tensors()):
            ema_state = student.full_state_dict()
        ema = digest(parameters(ema_state)) if distributed.is_main() else None
    report = {"world_size": distributed.world_size(), "backend": config.engine.backend, "step_at_start": trainer.step,
              "local_numel": local, "full_numel": full, "lr_at_start": student.learning_rate(),
              "loaded_digest": digest(parameters(loaded)) if distributed.is_main() else None, "ema_at_start": ema,
              "linear_untouched": torch.nn.functional.linear is ORIGINAL_LINEAR}
    local_counts = distributed.all_gather_objects(local)
    report["local_numel_per_rank"] = local_counts
    trainer.run()
    report["peak_rss_mib_per_rank"] = distributed.all_gather_objects(peak_rss_mib())
    if distributed.is_main():  # each step's wall time, from the images/s the trainer logged
        lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        global_batch = config.data.batch_size * distributed.world_size()
        report["step_seconds"] = [global_batch / line["perf/images_per_second"] for line in lines]
    return report


def batch(jobs_path: str) -> None:
    import shutil

    jobs = json.loads(open(jobs_path).read())
    assert not jobs[0].get("copy"), "the first job starts the process group: a copy before it could race the other ranks"
    for job in jobs:
        if job.get("copy") and distributed.is_main():
            shutil.copytree(*job["copy"])
        distributed.barrier()
        main("train", job["config"], job["report"], *job["overrides"], *(["--resume"] if job.get("resume") else []))
        distributed.barrier()


def main(mode: str, config_path: str, report_path: str, *rest: str) -> None:
    resume = "--resume" in rest
    overrides = [r for r in rest if r != "--resume"]
    config = load(TrainConfig, config_path, overrides)
    result = reference(config) if mode == "reference" else train(config, resume)
    if distributed.is_main():
        with open(report_path, "w") as handle:
            json.dump(result, handle)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        batch(sys.argv[2]) if sys.argv[1] == "batch" else main(*sys.argv[1:])
