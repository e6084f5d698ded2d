"""The training loop: a method's phases over a backend's models, with checkpoints, EMA, logs and export.

What is trained and how (losses, noise, models) is the method's (train/methods/); how it is distributed is the
backend's (train/backends/). The loop only runs each phase with the other models frozen, steps the model the
phase names, keeps the EMA, logs, stops on a non-finite loss, and saves and restores checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import yaml

from addpipe.config import differences, to_dict, to_yaml
from addpipe.devices import allow_tf32, resolve_precision, synchronize
from addpipe.train import checkpoint, distributed, logs, rundir
from addpipe.train.preemption import STOP, Preempted, StopRequest
from addpipe.train import backends
from addpipe.train.backends import Trained, build_backend
from addpipe.train.config import TrainConfig
from addpipe.train.data import TrainingData
from addpipe.train.ema import EMA
from addpipe.train.methods import method_class
from addpipe.train.report import FiniteGuard, Reporter, report, use

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def only_training(models: dict[str, Trained], name: str) -> Iterator[None]:
    """Inside: only `name`'s trainable parameters require gradients (a phase must not train the others)."""
    others = [p for other, model in models.items() if other != name for p in model.trainable]
    flags = [p.requires_grad for p in others]
    for parameter in others:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(others, flags):
            parameter.requires_grad_(flag)


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        distributed.prepare_environment()
        logs.configure(int(os.environ["RANK"]))
        self.run_dir = Path(config.run_dir)
        # One trainer per run directory, checked before anything is built, loaded or written (rank 0, from RANK);
        # held until the process ends.
        self.lock = rundir.RunDirLock(self.run_dir).acquire() if distributed.is_main() else None
        self.reporter: Optional[Reporter] = None
        self.data: Optional[TrainingData] = None
        try:
            self._start(config, resume)
        except BaseException:  # a refused start gives the run directory back (in-process callers live on)
            self.close()
            raise

    def _start(self, config: TrainConfig, resume: bool) -> None:
        self.device = backends.initialize(config.engine)
        self.dtype = resolve_precision(config.engine.precision, self.device)
        allow_tf32(self.device)
        distributed.barrier()
        torch.manual_seed(config.seed)  # identical initialisation of new parameters on every rank

        from addpipe.train.memory import gpu_memory_gib, resolve_checkpointing  # auto: decided before any model

        why = resolve_checkpointing(config, distributed.world_size(), gpu_memory_gib(self.device))
        if why and distributed.is_main():
            logger.info("model.gradient_checkpointing auto: %s", why)
        self.backend = build_backend(config, self.device, self.dtype)
        self.method = method_class(config.method)(config, self.device, self.dtype)
        self.models = self.method.build(self.backend)
        self.phases = self.method.phases()
        optim = config.optim
        self.ema = (EMA(self.models[self.method.ema_model].master_tensors(), optim.ema_decay,
                        optim.ema_halflife_kimg * 1000, optim.ema_rampup) if optim.ema_enabled else None)

        self.step = 0
        self.last_checkpoint: Optional[Path] = None
        state: dict[str, Any] = {}
        found = checkpoint.start_from(self.run_dir, self.models, self.method.ema_model if self.ema else None,
                                      self.device, resume)
        if found is not None:
            self.last_checkpoint, state, shadow = found
            self.step = int(state["step"])
            if self.ema is not None and shadow is not None:
                self.ema.load_shadow(shadow)
            self.apply_configured_optimizers(self.last_checkpoint, state)
            if distributed.is_main():
                logger.info("resumed from %s at step %d (written by %s on %s process(es), resumed on %d)",
                            self.last_checkpoint, self.step, state.get("backend"), state.get("world_size"),
                            distributed.world_size())
        self.data = TrainingData(config.data, distributed.rank(), distributed.world_size(), state.get("data"),
                                 self.method.sample_format())
        if distributed.is_main():  # only now: a refused start or resume leaves the recorded config as it was
            rundir.write_config(self.run_dir, to_yaml(config))
        self.reporter = Reporter(self.run_dir, config.log.tensorboard, start_step=self.step)
        self.finite = FiniteGuard()
        if state.get("reporter") is not None and distributed.is_main():  # the summed accumulator, once
            self.reporter.load_state_dict(state["reporter"])

    def apply_configured_optimizers(self, path: Path, state: dict[str, Any]) -> None:
        """A resumed run trains with the optimizer settings of its config, not the checkpoint's: learning rates,
        betas and weight decay changed for the continuation take effect from the first resumed step."""
        settings = self.method.optimizer_settings()
        for name, model in self.models.items():
            model.load_schedule_state(state["schedules"][name], settings[name])
        saved = path / "config.yaml"
        if distributed.is_main() and saved.is_file():
            changed = differences(yaml.safe_load(saved.read_text()) or {}, to_dict(self.config))
            for key, before, after in changed:
                logger.warning("resume: %s changed since %s: %s -> %s; the new value is used", key, path.name, before, after)

    # ----------------------------------------------------------------------------------------------
    def save(self) -> Path:
        self.finite.check(self.device, self.last_checkpoint)  # a NaN never reaches a checkpoint
        state = {"step": self.step, "backend": self.backend.name, "world_size": distributed.world_size(),
                 "method": self.method.name, "data": self.data.state_dict(), "reporter": self.reporter.global_state(self.device),
                 "schedules": {name: model.schedule_state() for name, model in self.models.items()},
                 "optimizer_steps": {name: model.optimizer_steps() for name, model in self.models.items()},
                 "ema": self.ema is not None}
        ema = (self.method.ema_model, self.ema.shadow) if self.ema is not None else None
        self.last_checkpoint = checkpoint.save(self.run_dir, self.step, self.models, state, self.config.checkpoint.keep_last,
                                               ema, to_yaml(self.config))
        return self.last_checkpoint

    def sample_grid(self) -> Optional[Path]:
        return self.method.sample_grid(self.run_dir / "samples" / f"step_{self.step:08d}.png", self.step)

    def export(self) -> Path:
        """run_dir/student; with the EMA on, the other set of weights beside it (student_raw or student_ema)."""
        out = self.run_dir / "student"
        if self.ema is None:
            return self.method.export(out)
        tensors = self.models[self.method.ema_model].local_tensors()
        with self.ema.applied(tensors):
            self.method.export(out if self.config.checkpoint.export_ema else self.run_dir / "student_ema")
        self.method.export(self.run_dir / "student_raw" if self.config.checkpoint.export_ema else out)
        return out

    def train_step(self) -> tuple[dict[str, torch.Tensor], int]:
        """The method's phases on the next batch, each stepping its model. Returns the loss terms and how many
        images all ranks together trained on."""
        state = self.method.begin_step(next(self.data), self.step)
        terms: dict[str, torch.Tensor] = {}
        for phase in self.phases:
            if self.step % phase.interval:
                continue
            model = self.models[phase.model]
            with only_training(self.models, phase.model):
                found = phase.run(state)
                model.backward(found[phase.total])
                model.step()
            terms.update(found)
        images = self.config.data.batch_size * distributed.world_size()
        if self.ema is not None:  # images counted from the step, so a resume on any number of ranks agrees
            self.ema.update(self.models[self.method.ema_model].master_tensors(), self.step * images, images)
        self.step += 1
        self.finite.add(self.step, terms)
        return terms, images

    def run(self, stop: Optional[StopRequest] = None) -> Path:
        """Train to config.steps, save and export. `stop`: an installed StopRequest; when any rank has received its
        signal, the run checkpoints at the end of the current step and raises Preempted."""
        config = self.config
        use(self.reporter)
        progress = logs.Progress(config.steps, self.step, self.method.name.upper(), distributed.is_main() and config.log.progress)
        window_started, window_images = time.perf_counter(), 0
        try:
            while self.step < config.steps:
                if stop is not None and stop.agreed():
                    self.stop_here(stop)
                terms, images = self.train_step()
                window_images += images
                for name, value in terms.items():
                    report(name, value)
                for name, model in self.models.items():
                    report(f"lr/{name}", model.learning_rate())
                report("data/skipped_samples", self.data.skipped)
                if self.step % config.log.every == 0 or self.step == config.steps:
                    self.finite.check(self.device, self.last_checkpoint)
                    synchronize(self.device)  # the window's throughput: what the device has really finished
                    now = time.perf_counter()
                    report("perf/images_per_second", window_images / (now - window_started))
                    window_started, window_images = now, 0
                    means = self.reporter.flush(self.step, self.device)
                    progress.losses(self.step, {k.split("/")[-1]: f"{v:.3g}" for k, v in means.items()
                                                if k.startswith("loss/")}, now)
                progress.update()
                if config.log.sample_every and self.step % config.log.sample_every == 0:
                    self.sample_grid()
                if self.step % config.checkpoint.every == 0 and self.step < config.steps:
                    self.save()
            if stop is not None and stop.agreed() and not self.saved_at_this_step():
                self.stop_here(stop)  # caught in the last step: checkpoint now, the requeued job only exports
            if not self.saved_at_this_step():
                self.save()
            self.sample_grid()
            return self.export()
        finally:
            progress.close()
            self.close()

    def saved_at_this_step(self) -> bool:
        return self.last_checkpoint is not None and self.last_checkpoint.name.endswith(f"{self.step:08d}")

    def stop_here(self, stop: StopRequest) -> None:
        """Collective: checkpoint this step boundary (unless just done) and end the run as Preempted."""
        if not self.saved_at_this_step():
            self.save()
        raise Preempted(stop.name, self.step, self.last_checkpoint)

    def close(self) -> None:
        """Flush the logs, end the data workers and give the run directory back (a process that dies gives it back
        anyway); after a refused start, whatever of these was made."""
        if self.reporter is not None:
            self.reporter.close()
        if self.data is not None:
            self.data.close()
        use(None)
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run (or continue) a training run; returns the exported student directory. SIGUSR1 or SIGTERM end it early
    with a checkpoint, as Preempted (train/preemption.py)."""
    from addpipe.train.preflight import check

    check(config)  # paths, offline models, shards, run directory: before the lock, DeepSpeed and any model load
    try:
        with STOP as stop:  # installed before the models load: a signal during start-up still counts
            return Trainer(config, resume=resume).run(stop)
    except OSError as error:
        if rundir.is_write_error(error):  # a full or read-only disk under a sample grid or the export
            raise rundir.RunDirError(rundir.describe_write_error(Path(error.filename or config.run_dir), error)) from None
        raise
